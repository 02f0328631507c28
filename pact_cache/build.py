"""The batch job: run the reference once over a dataset and write the cache.

Work is split into *parts* of ``rows_per_part`` consecutive dataset rows. A part is computed
in batches of similar length (to limit padding), encoded, and written atomically, so a killed
build resumes by computing the parts that are missing, and the result is byte-identical to an
uninterrupted build. Parts are dealt round-robin to shards (``--shard i/n`` or torchrun's
RANK/WORLD_SIZE); whoever sees every part present writes the manifest.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__
from .card import publish
from .data import Example, assistant_header_ids, dataset_fingerprint, scan_dataset, tokenize_dataset
from .errors import CacheError, DatasetError, OutputExistsError, PactError
from .format import (
    BUILD_KEY_META,
    MANIFEST,
    ROWS_PER_PART,
    RowResult,
    read_manifest,
    rows_digest,
    write_part,
)
from .manifest import (
    ALGORITHM,
    ALGORITHM_SCALED_HEAD,
    ENCODINGS,
    FORMAT,
    BuildParams,
    Counts,
    DatasetInfo,
    Identity,
    Manifest,
    PartEntry,
    Reference,
    SafetyTokens,
    Tokenizer,
)
from .models import (
    check_placement,
    load_model,
    load_tokenizer,
    model_fingerprint,
    placement,
    resolve_model,
    tokenizer_fingerprint,
)
from .projection import check_projection, compute_rows
from .rows import Reuse
from .storage import Location, check_regular_file, is_tmp_name, json_bytes, sha256_stream, stale_tmp
from .tokens import builtin_benign_path, builtin_refusals_path, load_benign, load_refusals, read_tokens, select_tokens
from .typedjson import load_json

BUILD_STATE = ".pact-build.json"  # written first; says which cache this folder is becoming


@dataclass
class BuildConfig:
    dataset: str
    ref: str
    out: str | Location  # a folder or URL (with storage_options), or a Location
    tokens: str | None = None
    max_length: int | None = 2048
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None  # "auto": the reference spread over this machine's GPUs and CPU (accelerate)
    quantize: str = "none"  # nf4 / int8: the reference's linear layers in 4 or 8 bits (bitsandbytes); in the cache id
    encoding: str = "q8"
    rows_per_part: int = ROWS_PER_PART
    resume: bool = False
    shard: tuple[int, int] | None = None  # (index, count); None = from torchrun env or (0, 1)
    storage_options: dict = field(default_factory=dict, repr=False)  # for -o on an object store; never printed
    progress: bool = True
    trust_remote_code: bool = False
    reuse: list = field(
        default_factory=list
    )  # caches (paths, URLs or Locations) whose matching rows are copied instead of computed
    source: str | None = None  # the rows' source as the manifest and card name it (default: the dataset's path)


@dataclass
class BuildResult:
    out: str  # the cache's folder or URL
    cache_id: str  # the content id; the build key while other shards still have parts to write
    manifest: Manifest | None  # None when other shards still have parts to write
    parts_written: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rows_computed: int = 0  # by this process
    rows_reused: int = 0  # copied from --reuse caches by this process


def _log(msg: str) -> None:
    print(f"pact-cache: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- rows: computed or reused


def rows_for_part(
    model,
    examples: list[Example],
    ids,
    header,
    batch_size: int,
    device,
    reuse: Reuse | None,
    found: dict[int, tuple[int, int, int]],
    on_tokens=None,
) -> tuple[list[RowResult], int]:
    """The rows of one part: copied from ``reuse`` where ``found`` (position -> old row, from
    :meth:`Reuse.find`) says an old cache has them, computed otherwise. Returns the rows in order
    and how many were copied."""
    todo = [ex for j, ex in enumerate(examples) if j not in found]
    computed = iter(compute_rows(model, todo, ids, header, batch_size, device, on_tokens=on_tokens) if todo else [])
    old = reuse.fetch(found) if found else {}
    rows = []
    for j, ex in enumerate(examples):
        if j in old:
            o = old[j]
            rows.append(RowResult(ex.example_id, ex.input_ids, ex.response_start, o.ref))
        else:
            rows.append(next(computed))
    return rows, len(old)


# ----------------------------------------------------------------------------- the job


def _shard_from_env(cfg: BuildConfig) -> tuple[int, int]:
    if cfg.shard is not None:
        i, n = cfg.shard
        if not (n >= 1 and 0 <= i < n):
            raise PactError(f"--shard {i}/{n}: need 0 <= i < n")
        return i, n
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise PactError("RANK/WORLD_SIZE in the environment are not integers; unset them or use --shard i/n") from None
    if not (world >= 1 and 0 <= rank < world):
        raise PactError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world


def _occupied(loc: Location) -> bool:
    """Whether the output holds anything besides temp files (another shard may be mid-write)."""
    if loc.is_local:
        out = loc.local_path()
        return out.is_dir() and any(not is_tmp_name(p.name) for p in out.iterdir())
    return any(not is_tmp_name(n) for n in loc.names())


def _clean_stale_tmp(loc: Location) -> None:
    """Remove temp files and folders that a killed build on this host left behind (live writers' are kept)."""
    if loc.is_local and loc.local_path().is_dir():
        for p in loc.local_path().iterdir():
            if stale_tmp(p) and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _read_json_object(loc: Location, name: str) -> dict | None:
    """A small JSON object written by a build (state, part entries), or None if absent or unreadable."""
    try:
        obj = load_json(loc.read_bytes(name, 1 << 20), loc.where(name), PactError, "build record")
    except (OSError, PactError):
        return None
    return obj if isinstance(obj, dict) else None


def _prepare_out(loc: Location, build_key: str, cfg: BuildConfig, sharded: bool) -> tuple[str, Manifest | None]:
    """Make sure the output is empty, or is this very build. Returns ('new'|'resume'|'done', manifest)."""
    out = loc.display
    if loc.exists() and not loc.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; choose another -o")
    if _occupied(loc):
        if loc.exists(MANIFEST) or (loc.is_local and loc.local_path(MANIFEST).is_symlink()):
            try:
                other = read_manifest(loc)
            except CacheError as err:
                raise OutputExistsError(
                    f"{out}: holds a cache that does not pass its checks ({err}); choose another -o"
                ) from None
            if other.identity.key() == build_key:
                return "done", other
            raise OutputExistsError(
                f"{out}: already holds a different cache (id {other.cache_id[:12]}); choose "
                f"another -o or delete that folder"
            )
        if loc.exists(BUILD_STATE):
            other = (_read_json_object(loc, BUILD_STATE) or {}).get("build_key")
            if other != build_key:
                raise OutputExistsError(
                    f"{out}: holds an unfinished build of a different cache (build key "
                    f"{str(other)[:12]}); choose another -o or delete that folder"
                )
            if not (cfg.resume or sharded):
                raise OutputExistsError(f"{out}: holds an unfinished build of this cache; pass --resume to finish it")
            return "resume", None
        raise OutputExistsError(f"{out}: folder is not empty and is not a pact-cache build; choose another -o")
    if cfg.resume and not sharded:
        raise OutputExistsError(f"{out}: --resume, but there is no build here to resume; drop --resume to start one")
    loc.makedirs()
    return "new", None


def _entry_name(part: str) -> str:
    """Where the writer of a part leaves its manifest entry (sizes, sha256, rows digest) for the
    one who publishes the manifest; removed once the manifest is out."""
    return f".{part}.entry.json"


def _prove_part(loc: Location, name: str, build_key: str, examples: list[Example]) -> str | None:
    """Why ``name`` is not a part this build wrote for ``examples``, or None when it is (a regular
    file or plain object whose footer carries our build key and whose rows are exactly ``examples``)."""
    import pyarrow.parquet as pq

    try:
        check_regular_file(loc.fs, loc.root, loc.path(name), loc.where(name))
    except CacheError:
        return "it is not a regular file"
    try:
        with loc.open(name) as f:
            pf = pq.ParquetFile(f)
            key = (pf.schema_arrow.metadata or {}).get(BUILD_KEY_META, b"").decode("utf-8", "replace")
            if key != build_key:
                return "it was written by a different build (its footer has another build key)"
            t = pf.read(columns=["example_id", "input_ids", "response_start"])
        got = rows_digest(
            zip(
                t.column("example_id").to_pylist(),
                t.column("input_ids").to_pylist(),
                t.column("response_start").to_pylist(),
            )
        )
    except Exception as err:  # a damaged or foreign file (pyarrow raises several types; nulls do not hash)
        return f"it is not a readable part ({type(err).__name__})"
    if got != rows_digest((ex.example_id, ex.input_ids, ex.response_start) for ex in examples):
        return "its rows are not the rows this build puts there"
    left = _read_json_object(loc, _entry_name(name)) or {}
    if left.get("build_key") == build_key:  # its writer recorded its size and sha256: the file must still have them
        with loc.open(name) as f:
            sha, size = sha256_stream(f)
        if left.get("bytes") != size or left.get("sha256") != sha:
            return "it changed after this build wrote it (its size or sha256 is not the one recorded)"
    return None


def _refuse_unproven(loc: Location, names: list[str], plan: list[list[Example]], build_key: str, which) -> None:
    for i in which:
        why = _prove_part(loc, names[i], build_key, plan[i])
        if why is not None:
            raise OutputExistsError(
                f"{loc.where(names[i])}: {why}; this build will not adopt it. Delete that file and rerun with --resume"
            )


def _part_entry(
    loc: Location, name: str, build_key: str, examples: list[Example], rec: dict | None = None
) -> PartEntry:
    """The manifest entry of a proven part: from ``rec`` when this process wrote the part; a part
    adopted from an earlier run is hashed again (:func:`_prove_part` refused it if its writer's entry
    records another size or sha256)."""
    size = check_regular_file(loc.fs, loc.root, loc.path(name), loc.where(name))
    digest = rows_digest((ex.example_id, ex.input_ids, ex.response_start) for ex in examples)
    steps = sum(ex.steps for ex in examples)
    if (
        rec is not None
        and rec.get("build_key") == build_key
        and rec.get("bytes") == size
        and isinstance(rec.get("sha256"), str)
    ):
        return PartEntry(name, len(examples), steps, size, rec["sha256"], digest)
    with loc.open(name) as f:  # adopted: hashed again (_prove_part compared it with its writer's entry)
        return PartEntry(name, len(examples), steps, size, sha256_stream(f)[0], digest)


def build_estimate(cfg: BuildConfig, resolved=None, longest: int | None = None) -> list[str]:
    """What a build of ``cfg`` will need at its peak (:func:`pact_cache.memory.estimate_build`), from the
    reference's config alone, as printed lines; ``longest``: the dataset's longest tokenized row, when known
    (else --max-length)."""
    from .memory import ModelShape, estimate_build
    from .models import check_placement, pick_dtype

    resolved = resolved or resolve_model(cfg.ref)
    device = check_placement(cfg.device, cfg.device_map)
    bytes_ = {"float32": 4}.get(str(pick_dtype(cfg.dtype, device)).replace("torch.", ""), 2)
    seq = longest or cfg.max_length or 2048
    shape = ModelShape.of_model_dir(resolved.path)
    est = estimate_build(
        shape, device=device, dtype_bytes=bytes_, quantize=cfg.quantize, batch_size=cfg.batch_size, seq_len=seq
    )
    head = (
        f"memory estimate: --ref {cfg.ref}, {shape.linear + shape.other:,} parameters, batches of {cfg.batch_size} "
        f"rows of up to {seq} tokens"
    )
    return [head, *est.lines()]


def build(cfg: BuildConfig) -> BuildResult:
    """The build, stage by stage: the output checked, the dataset's rows, the reference loaded and proven to
    project as its own forward does, the safety tokens, the cache's identity, then this shard's parts written
    and, once every part is present, the manifest published."""
    t_start = time.time()
    loc = _check_output(cfg)
    rank, world = _shard_from_env(cfg)
    resolved = resolve_model(cfg.ref)
    tok = load_tokenizer(resolved, cfg.trust_remote_code)
    examples, skipped = _dataset_rows(cfg, tok, rank)
    header = assistant_header_ids(tok)
    ref = _open_reference(cfg, resolved, rank, longest=max(len(e.input_ids) for e in examples))
    tokens = _safety_tokens(cfg, ref, tok, rank)
    identity, dataset, reuse = _identity(cfg, ref, tok, tokens, header)
    build_key = identity.key()
    state, done = _prepare_out(loc, build_key, cfg, world > 1)
    if state == "done":
        _log(f"{loc.display} already holds this cache (id {done.cache_id[:12]}); nothing to do")
        return BuildResult(loc.display, done.cache_id, done, [], time.time() - t_start)
    _clean_stale_tmp(loc)
    if not loc.exists(BUILD_STATE):
        loc.put_bytes(
            BUILD_STATE, json_bytes({"format": FORMAT, "build_key": build_key, "identity": identity.to_json()})
        )
    plan = _plan_parts(cfg, loc, examples, build_key, reuse, rank, world, resumed=state == "resume")
    written, n_computed, n_reused = _write_parts(cfg, loc, plan, ref, tokens, header, build_key, reuse, rank, world)

    def partial(key: str) -> BuildResult:  # other shards still have parts to write
        return BuildResult(loc.display, key, None, list(written), time.time() - t_start, n_computed, n_reused)

    if world > 1 and os.environ.get("MASTER_ADDR") and cfg.shard is None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
        if rank != 0:
            return partial(build_key)
    have = set(loc.names())
    missing = [n for n in plan.names if n not in have]
    if missing:
        _log(
            f"shard {rank}/{world} done; {len(missing)} part(s) of other shards missing, the last shard to finish "
            f"writes the manifest"
        )
        return partial(build_key)
    manifest = _publish_manifest(cfg, loc, examples, skipped, plan, written, identity, dataset, ref)
    return BuildResult(
        loc.display, manifest.cache_id, manifest, list(written), time.time() - t_start, n_computed, n_reused
    )


def _check_output(cfg: BuildConfig) -> Location:
    """The options that need no model, and OUT: empty, or a build of pact-cache (this one is decided later)."""
    if cfg.batch_size < 1 or cfg.rows_per_part < 1:
        raise PactError("--batch-size and --rows-per-part must be at least 1")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise PactError(f"--max-length {cfg.max_length}: must be at least 2")
    if cfg.encoding not in ENCODINGS:
        raise PactError(f"--encoding {cfg.encoding}: unknown; use one of {sorted(ENCODINGS)}")
    loc = (
        cfg.out
        if isinstance(cfg.out, Location)
        else Location(
            str(Path(cfg.out).expanduser()) if "://" not in str(cfg.out) else str(cfg.out), cfg.storage_options
        )
    )
    out = loc.display
    if loc.exists() and not loc.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; choose another -o")
    if _occupied(loc) and not loc.exists(MANIFEST) and not loc.exists(BUILD_STATE):
        raise OutputExistsError(f"{out}: folder is not empty and is not a pact-cache build; choose another -o")
    return loc


def _dataset_rows(cfg: BuildConfig, tok, rank: int) -> tuple[list[Example], dict[str, list]]:
    """The dataset's rows, tokenized with the reference's chat template; the skipped ones by reason. Refuses a
    dataset of which no row fits."""
    if rank == 0:
        ignored = scan_dataset(cfg.dataset)[1]
        if ignored:
            _log(
                f"{cfg.dataset}: ignoring {len(ignored)} file(s) that are not .jsonl/.json/.parquet (first: "
                f"{ignored[0]})"
            )
    examples, skipped = tokenize_dataset(cfg.dataset, tok, cfg.max_length, progress=cfg.progress and rank == 0)
    if not examples:
        n = sum(len(v) for v in skipped.values())
        first = next(iter(skipped.values()))[0]
        raise DatasetError(
            f"{first}: all {n} rows were skipped (prompt does not fit --max-length {cfg.max_length}); "
            f"raise --max-length"
        )
    if skipped and rank == 0:
        for reason, rows in skipped.items():
            _log(f"skipping {len(rows)} row(s), {reason.replace('_', ' ')} (first: {rows[0]}); counted in the manifest")
    return examples, skipped


@dataclass
class _Reference:
    """The loaded reference and what the cache records of it."""

    model: object
    device: object
    dtype: object  # torch.dtype
    projection: object  # pact_cache.projection.Projection
    fingerprint: dict  # model_fingerprint
    vocab_rows: int  # rows of its output layer


def _open_reference(cfg: BuildConfig, resolved, rank: int, longest: int) -> _Reference:
    """The reference, after its memory estimate, proven to project as its own forward does (the cached values are
    the model's own log-probs, or nothing)."""
    check_placement(cfg.device, cfg.device_map)  # before the estimate: a bad pair is the one line the user sees
    if rank == 0:
        try:
            _log("\n  ".join(build_estimate(cfg, resolved, longest)))
        except PactError as err:
            _log(f"no memory estimate: {err}")
    model, device, torch_dtype = load_model(
        resolved, cfg.dtype, cfg.device, cfg.trust_remote_code, cfg.device_map, quantize=cfg.quantize
    )
    projection = check_projection(model, device, f"--ref {cfg.ref}")
    vocab_rows = int(model.get_output_embeddings().weight.shape[0])
    return _Reference(model, device, torch_dtype, projection, model_fingerprint(resolved), vocab_rows)


def _safety_tokens(cfg: BuildConfig, ref: _Reference, tok, rank: int) -> SafetyTokens:
    """``--tokens``' file, checked against the tokenizer and the output layer, or a selection from the reference
    (its built-in refusals after harmful prompts against the same refusals after benign ones)."""
    if cfg.tokens:
        tokens = read_tokens(cfg.tokens, tok)
    else:
        if rank == 0:
            _log(
                "no --tokens: selecting the safety tokens from the reference, its built-in refusals after their "
                "harmful prompts against the same refusals after built-in benign prompts"
            )
        tokens = select_tokens(
            ref.model,
            tok,
            load_refusals(None),
            device=ref.device,
            aligned_fp=ref.fingerprint,
            source="builtin:" + builtin_refusals_path().name,
            benign=load_benign(None),
            benign_source="builtin:" + builtin_benign_path().name,
        )
    if max(tokens.ids) >= ref.vocab_rows:
        raise PactError(
            f"{cfg.tokens}: ids reach {max(tokens.ids)} but the model's output layer has {ref.vocab_rows} rows"
        )
    return tokens


def _identity(
    cfg: BuildConfig, ref: _Reference, tok, tokens: SafetyTokens, header: list[int]
) -> tuple[Identity, DatasetInfo, Reuse | None]:
    """What the cache's values depend on (its id and build key come from it), and the ``--reuse`` caches whose
    rows may be copied (they join the identity)."""
    ds_fp = dataset_fingerprint(cfg.dataset)
    params = BuildParams(
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        rows_per_part=cfg.rows_per_part,
        dtype=str(ref.dtype).replace("torch.", ""),
        device=placement(ref.model, ref.device),
        assistant_header_ids=tuple(header),
        vocab_size=max(ref.vocab_rows, len(tok)),
        algorithm=ALGORITHM_SCALED_HEAD if ref.projection.kind == "scale" else ALGORITHM,
        quantization=None if cfg.quantize in (None, "none") else cfg.quantize,
    )
    tok_fp = tokenizer_fingerprint(tok)
    tokenizer = Tokenizer(tok_fp["sha256"], tok_fp["vocab_size"], tok_fp["chat_template_sha256"])
    identity = Identity(
        ref.fingerprint["weights_sha256"], tokenizer, tokens, ds_fp["sha256"], params, ENCODINGS[cfg.encoding]
    )
    dataset = DatasetInfo(ds_fp["sha256"], cfg.source or ds_fp["source"], tuple(ds_fp["files"]))
    if not cfg.reuse:
        return identity, dataset, None
    reuse = Reuse.open(cfg.reuse, identity, cfg.storage_options)
    params = replace(params, reused=tuple(sorted({c.cache_id for c in reuse.caches})))
    return replace(identity, build=params), dataset, reuse


@dataclass
class _Plan:
    """The cache's parts and this shard's share of them."""

    parts: list[list[Example]]  # the rows of each part, in order
    names: list[str]
    mine: list[int]  # this shard's parts still to write
    found: dict[int, dict[int, tuple[int, int, int]]]  # {part: {position: old row}}: rows --reuse copies


def _plan_parts(
    cfg: BuildConfig, loc: Location, examples: list[Example], build_key: str, reuse, rank: int, world: int, resumed
) -> _Plan:
    """The parts, each of ``rows_per_part`` consecutive rows; those already in OUT proven this build's (or
    refused), the rest dealt round-robin to the shards; the rows of this shard's parts that ``--reuse`` copies."""
    parts = [examples[i : i + cfg.rows_per_part] for i in range(0, len(examples), cfg.rows_per_part)]
    names = [f"part-{i:05d}.parquet" for i in range(len(parts))]
    have = set(loc.names())
    if loc.is_local:  # anything under a part's name counts (a FIFO, a link): it is proven or refused, never replaced
        have |= {n for n in names if loc.local_path(n).exists() or loc.local_path(n).is_symlink()}
    present = [i for i in range(len(parts)) if names[i] in have]
    _refuse_unproven(loc, names, parts, build_key, [i for i in present if i % world == rank])
    mine = [i for i in range(len(parts)) if i % world == rank and i not in present]
    if resumed and rank == 0:
        _log(
            f"resuming: {len(present)}/{len(names)} parts already written (each checked: this build's key, the "
            f"expected rows)"
        )
    found = {
        i: {j: at for j, ex in enumerate(parts[i]) if reuse is not None and (at := reuse.find(ex)) is not None}
        for i in mine
    }
    if reuse is not None:
        _log(
            f"--reuse: {sum(len(f) for f in found.values()):,} of {sum(len(parts[i]) for i in mine):,} rows are "
            f"copied from {len(reuse.caches)} earlier cache(s); the rest are computed"
        )
    return _Plan(parts, names, mine, found)


def _write_parts(
    cfg: BuildConfig, loc: Location, plan: _Plan, ref: _Reference, tokens, header, build_key: str, reuse, rank, world
) -> tuple[dict[str, dict], int, int]:
    """This shard's parts: rows computed (or copied), encoded, finished in scratch and moved or uploaded whole,
    each with its entry for whoever publishes the manifest. Returns ``(entries written, rows computed, rows
    reused)``."""
    import torch
    from tqdm.auto import tqdm

    ids = torch.tensor(tokens.ids, dtype=torch.long)
    enc = ENCODINGS[cfg.encoding]
    total_tokens = sum(
        2 * len(ex.input_ids) + len(header) - ex.response_start - 1
        for i in plan.mine
        for j, ex in enumerate(plan.parts[i])
        if j not in plan.found[i]
    )
    bar = tqdm(
        total=total_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"building{f' shard {rank}/{world}' if world > 1 else ''}",
        disable=not cfg.progress,
        dynamic_ncols=True,
        position=rank if world > 1 else None,
    )
    written: dict[str, dict] = {}  # part name -> the entry this process wrote for it
    n_reused = n_computed = 0
    scratch = loc.scratch()  # parts are finished here, then moved (a folder) or uploaded (a store) whole
    try:
        for i in plan.mine:
            name = plan.names[i]
            rows, k = rows_for_part(
                ref.model, plan.parts[i], ids, header, cfg.batch_size, ref.device, reuse, plan.found[i], bar.update
            )
            n_reused, n_computed = n_reused + k, n_computed + len(rows) - k
            entry = write_part(scratch / name, rows, enc, build_key)
            loc.put_file(scratch / name, name)
            written[name] = {"build_key": build_key, **entry.to_json()}
            loc.put_bytes(_entry_name(name), json_bytes(written[name]))
    finally:
        Location.drop_scratch(scratch)
    bar.close()
    return written, n_computed, n_reused


def _publish_manifest(
    cfg: BuildConfig, loc: Location, examples, skipped, plan: _Plan, written, identity: Identity, dataset, ref
) -> Manifest:
    """Every part, other shards' included, proven this build's; then the card and the manifest, last: readers
    see all of the cache or none. The build's own records are removed after."""
    build_key = identity.key()
    _refuse_unproven(
        loc, plan.names, plan.parts, build_key, [i for i in range(len(plan.parts)) if plan.names[i] not in written]
    )
    parts = [_part_entry(loc, name, build_key, plan.parts[i], written.get(name)) for i, name in enumerate(plan.names)]
    counts = Counts(
        rows=len(examples),
        response_steps=sum(ex.steps for ex in examples),
        input_tokens=sum(len(ex.input_ids) for ex in examples),
        truncated_rows=sum(1 for ex in examples if cfg.max_length and len(ex.input_ids) == cfg.max_length),
        skipped={reason: len(rows) for reason, rows in skipped.items()},
        skipped_rows={reason: rows[:20] for reason, rows in skipped.items()},
    )
    fp = ref.fingerprint
    manifest = Manifest(
        FORMAT,
        "",
        __version__,
        Reference(fp["name"], fp["weights_sha256"], fp["path"], fp["revision"]),
        identity.tokenizer,
        identity.tokens,
        dataset,
        identity.build,
        identity.encoding,
        counts,
        tuple(parts),
    ).with_content_id()
    publish(loc, manifest)  # card, then the manifest last
    for name in plan.names:
        loc.remove(_entry_name(name))
    loc.remove(BUILD_STATE)
    return manifest
