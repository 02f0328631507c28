"""``pact-cache``: a thin command line over the library. Errors become one line and exit 1."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cliutil import (
    OneLineParser,
    _shard,
    add_cache_id,
    add_dtype_device,
    add_json,
    add_no_progress,
    add_output,
    add_quantize,
    add_storage_option,
    add_version,
    new_file,
    positive_int,
    run_command,
)
from .errors import OutputExistsError, PactError
from .format import ROWS_PER_PART
from .models import DEFAULT_MODEL
from .replay import BORDERLINE_KEEP
from .storage import parse_storage_options

# ----------------------------------------------------------------------------- commands
#
# Each command is its options (a function of the subparser) and its handler, registered together by
# @command. ``locations`` names the arguments that are caches (a path or an fsspec URL): they reach
# the handler as :class:`pact_cache.storage.Location` objects, built once here with --storage-option.


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    options: Callable
    handler: Callable
    locations: tuple = ()


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, description: str, options: Callable, locations: tuple = ()):
    def register(handler):
        COMMANDS[name] = Command(name, help, description, options, handler, locations)
        return handler

    return register


def _tokens_options(t):
    t.add_argument(
        "--aligned", required=True, metavar="MODEL", help=f"aligned chat model (folder, hub id or {DEFAULT_MODEL})"
    )
    t.add_argument(
        "--base",
        metavar="MODEL",
        help="base model: the paper's aligned-vs-base discrepancy weights; "
        "without it the "
        "refusals after their harmful prompts are contrasted with the same refusals after benign prompts",
    )
    t.add_argument(
        "--refusals", metavar="FILE", help="harmful prompts with refusals (any dataset format; default: built-in set)"
    )
    t.add_argument(
        "--benign",
        metavar="FILE",
        help="benign prompts, after which the refusals are also teacher-forced "
        "when there "
        "is no --base (any dataset format, answers optional and unused; default: built-in set)",
    )
    t.add_argument(
        "--contrast-steps",
        type=positive_int,
        default=4,
        metavar="N",
        help="without --base: the refusals' first N tokens are compared (default 4; a refusal is decided in "
        "its opening words)",
    )
    t.add_argument("--top-k", type=positive_int, default=50, help="number of safety tokens K (default 50)")
    t.add_argument(
        "--max-resp-len",
        type=positive_int,
        default=64,
        help="with --base: refusal tokens teacher-forced per sample (default 64, the paper's)",
    )
    t.add_argument("--limit", type=positive_int, help="use only the first N refusals")
    add_dtype_device(t)
    add_output(t, "FILE", "where to write tokens.json")


@command(
    "tokens",
    "select the safety tokens S and their weights -> tokens.json",
    "Select the safety-token set S: teacher-force refusals through the aligned model and compare, the paper's "
    "way, with the base model (--base), or by default with the aligned model itself after benign "
    "prompts.",
    _tokens_options,
)
def cmd_tokens(a) -> int:
    from .models import load_model, load_tokenizer, model_fingerprint, resolve_model
    from .storage import atomic_write_json
    from .tokens import load_benign, load_refusals, select_tokens

    out = new_file(a.output, "tokens.json")
    pairs = load_refusals(a.refusals)[: a.limit]
    ra = resolve_model(a.aligned)
    tok_a = load_tokenizer(ra)
    model_a, device, _ = load_model(ra, a.dtype, a.device)
    base = base_tok = base_fp = None
    if a.base:
        from transformers import AutoTokenizer

        rb = resolve_model(a.base)
        # the base model sees a plain "User: ...\n\nAssistant: " prompt, so its tokenizer needs no chat template
        base_tok = AutoTokenizer.from_pretrained(str(rb.path))
        base, _, _ = load_model(rb, a.dtype, device)
        base_fp = model_fingerprint(rb)
    src = str(Path(a.refusals).resolve()) if a.refusals else "builtin"
    benign = None if a.base else load_benign(a.benign)
    tokens = select_tokens(
        model_a,
        tok_a,
        pairs,
        base,
        base_tok,
        top_k=a.top_k,
        max_resp_len=a.max_resp_len,
        device=device,
        aligned_fp=model_fingerprint(ra),
        base_fp=base_fp,
        source=src,
        benign=benign,
        benign_source=str(Path(a.benign).resolve()) if a.benign else "builtin",
        contrast_steps=a.contrast_steps,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, tokens.to_json())
    print(f"wrote {out}: K={tokens.K} ({tokens.method}, {tokens.params['samples']} refusals)")
    print("by weight: " + tokens.describe())
    return 0


def _build_options(b):
    b.add_argument(
        "dataset", metavar="DATASET", help=".jsonl/.json/.parquet file, a folder of them, or a save_to_disk folder"
    )
    b.add_argument(
        "--ref", required=True, metavar="MODEL", help=f"reference (aligned) model: folder, hub id or {DEFAULT_MODEL}"
    )
    b.add_argument(
        "--tokens",
        metavar="FILE",
        help="tokens.json from `pact-cache tokens` (default: select from --ref with built-in refusals)",
    )
    add_output(b, "CACHE", "output folder (must be new, empty, or this build to --resume)")
    b.add_argument(
        "--max-length", type=positive_int, default=2048, help="truncate full sequences to N tokens (default 2048)"
    )
    b.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass (default 8)")
    b.add_argument(
        "--rows-per-part",
        type=positive_int,
        default=ROWS_PER_PART,
        help=f"rows per Parquet part, the unit of resume and sharding (default {ROWS_PER_PART})",
    )
    add_dtype_device(b)
    add_quantize(
        b,
        "load the reference's linear layers in 4 bits (nf4) or 8 bits (int8): a reference larger than the card in "
        "16 bits fits on it; part of the cache's identity (another cache id than the same weights in 16 bits)",
    )
    b.add_argument(
        "--dry-run", action="store_true", help="print the build's estimated peak memory and exit, writing nothing"
    )
    b.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="a reference larger than one GPU: spread its layers over this machine's GPUs and CPU memory "
        "(accelerate's big-model placement); one process per machine",
    )
    b.add_argument(
        "--encoding",
        default="q8",
        choices=["q8", "f32"],
        help="q8: ~46 B/step at K=50 with a stated error bound (default); f32: exact float32",
    )
    b.add_argument("--resume", action="store_true", help="finish an interrupted build in the same folder")
    b.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="OLD",
        help="copy the rows OLD (a cache built with the same reference, tokenizer, tokens, encoding, max "
        "length and "
        "dtype and --quantize; folder or URL) already holds instead of computing them; repeatable",
    )
    b.add_argument(
        "--shard",
        type=_shard,
        metavar="i/n",
        help="compute only parts i, i+n, ... (torchrun sets this from RANK/WORLD_SIZE)",
    )
    add_no_progress(b)
    b.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the model folder/hub (off by default)"
    )
    add_storage_option(b)


@command(
    "build",
    "run the reference over DATASET and write the cache",
    "Run the reference once over DATASET and write the cache (manifest.json + zstd Parquet parts).",
    _build_options,
    ("output", "reuse"),
)
def cmd_build(a) -> int:
    from .build import BuildConfig, build, build_estimate

    cfg = BuildConfig(
        dataset=a.dataset,
        ref=a.ref,
        out=a.output,
        tokens=a.tokens,
        max_length=a.max_length,
        batch_size=a.batch_size,
        dtype=a.dtype,
        device=a.device,
        device_map=a.device_map,
        quantize=a.quantize,
        encoding=a.encoding,
        rows_per_part=a.rows_per_part,
        resume=a.resume,
        shard=a.shard,
        progress=not a.no_progress,
        trust_remote_code=a.trust_remote_code,
        storage_options=parse_storage_options(a.storage_option),
        reuse=a.reuse,
    )
    if a.dry_run:
        print("\n".join(build_estimate(cfg)))
        return 0
    res = build(cfg)
    if res.manifest is None:
        print(
            f"{res.out}: wrote {len(res.parts_written)} part(s) for this shard; the manifest comes when every shard "
            f"is done"
        )
        return 0
    c = res.manifest.counts
    print(
        f"{res.out}: cache {res.cache_id[:12]}: {c.rows:,} rows, {c.response_steps:,} response steps, "
        f"{sum(p.bytes for p in res.manifest.parts):,} bytes in {len(res.manifest.parts)} part(s), {res.seconds:.1f}s"
        + (f"; {res.rows_reused:,} rows reused, {res.rows_computed:,} computed" if a.reuse else "")
    )
    return 0


def _replay_options(r):
    r.add_argument(
        "--ref",
        required=True,
        metavar="MODEL",
        help=f"the reference (aligned) model, the one the "
        f"fine-tuning cache was "
        f"built with: folder, hub id or {DEFAULT_MODEL}",
    )
    r.add_argument(
        "--tokens",
        metavar="FILE",
        help="the fine-tuning cache's tokens.json (default: selected from --ref "
        "as `build` "
        "selects them without --tokens)",
    )
    r.add_argument(
        "--prompts",
        metavar="FILE",
        help="harmful prompts (any dataset format; answers ignored; default: "
        "the package's "
        "300 prompts, resources/harmful_prompts.jsonl)",
    )
    r.add_argument(
        "--borderline",
        metavar="FILE",
        help="benign prompts that only look risky, whose answers the reference gives *without* refusing join the "
        "cache too, so the replay also teaches where refusing stops ('default': the package's 161, "
        "resources/borderline_prompts.jsonl; default: none)",
    )
    r.add_argument(
        "--borderline-keep",
        choices=BORDERLINE_KEEP,
        default="helpful",
        help="which --borderline answers join: 'helpful' (default) those without a refusal, finished; 'all' every "
        "one, the reference's refusals too and those cut off at --max-new-tokens as their prefix, for pact-train "
        "--replay-term term (rows trained on the anchor alone hold the policy at the reference's refusal odds on "
        "look-alikes; trained on their words they would teach the refusals)",
    )
    r.add_argument(
        "--judge",
        metavar="GUARD",
        help="a guard model (e.g. meta-llama/Llama-Guard-3-8B): a refusal is "
        "kept only if it "
        "also calls it safe (default: the keyword judge alone)",
    )
    r.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=128,
        help="longest answer (default 128); an answer cut off there is dropped, since a row teaches its answer up "
        "to the end of the turn (a look-alike answer under --borderline-keep all is kept as its prefix)",
    )
    r.add_argument("--batch-size", type=positive_int, default=16, help="prompts per generation batch (default 16)")
    r.add_argument("--limit", type=positive_int, help="only the first N prompts (of each set, with --borderline)")
    r.add_argument(
        "--max-length", type=positive_int, default=2048, help="truncate full sequences to N tokens (default 2048)"
    )
    r.add_argument(
        "--answers",
        metavar="FILE",
        help="also write every answer and its verdict (kept, or why not) as JSONL to FILE (a new file)",
    )
    add_dtype_device(r)
    add_quantize(r, "load the reference as the fine-tuning cache's was (pact-cache build --quantize)")
    add_output(r, "CACHE", "the replay cache: a new folder or URL")
    add_json(r, "print the summary as JSON")
    add_no_progress(r)
    add_storage_option(r)


@command(
    "replay",
    "the reference's own refusals to harmful prompts -> a replay cache (pact-train --replay)",
    "The reference answers harmful prompts (the package's default set, or --prompts) greedily; the answers a "
    "judge calls "
    "refusals are cached with the same reference and tokens as the fine-tuning cache, for pact-train --replay. A "
    "reference that refuses fewer than half of the prompts is warned about: it does not look aligned.",
    _replay_options,
    ("output",),
)
def cmd_replay(a) -> int:
    from .replay import ReplayConfig, make_replay

    res = make_replay(
        ReplayConfig(
            ref=a.ref,
            out=a.output,
            tokens=a.tokens,
            prompts=a.prompts,
            borderline=a.borderline,
            borderline_keep=a.borderline_keep,
            judge=a.judge,
            max_new_tokens=a.max_new_tokens,
            batch_size=a.batch_size,
            limit=a.limit,
            max_length=a.max_length,
            dtype=a.dtype,
            device=a.device,
            quantize=a.quantize,
            answers=a.answers,
            progress=not a.no_progress,
            storage_options=parse_storage_options(a.storage_option),
        )
    )
    if a.json:
        print(json.dumps(res.to_json(), indent=2))
        return 0
    why = ", ".join(f"{n} {k}" for k, n in res.dropped.items()) or "none"
    print(
        f"{res.out}: replay cache {res.cache_id[:12]}: {res.kept} of {res.prompts} prompts kept ({res.refusals} "
        f"refusals; "
        f"dropped: {why})"
        + (
            f"; borderline: {res.borderline_kept} of {res.borderline_prompts} look-alike prompts kept (answered "
            + ("with or without a refusal)" if a.borderline_keep == "all" else "without a refusal)")
            if res.borderline_prompts
            else ""
        )
        + f" in {res.seconds:.0f}s"  # a warning was said on stderr as it was found
    )
    return 0


def _info_options(i):
    i.add_argument("cache", metavar="CACHE", help="cache folder (local path or fsspec URL)")
    add_json(i)
    add_storage_option(i)


@command(
    "info", "what a cache holds: rows, steps, bytes per step, tokens", "Summarise a cache.", _info_options, ("cache",)
)
def cmd_info(a) -> int:
    from .format import open_cache
    from .report import cache_info, format_info

    info = cache_info(open_cache(a.cache, verify_checksums=False))
    print(json.dumps(info, indent=2, ensure_ascii=False) if a.json else format_info(info))
    return 0


def _verify_options(v):
    v.add_argument("cache", metavar="CACHE", help="cache folder (local path or fsspec URL)")
    v.add_argument("--dataset", metavar="DATASET", help="also check the cache was built from this dataset")
    v.add_argument(
        "--model",
        metavar="MODEL",
        help="also check the reference weights and tokenizer, and recompute a sample of rows with it",
    )
    v.add_argument(
        "--recompute",
        type=int,
        default=8,
        metavar="N",
        help="with --model: rows (spread over the cache) whose values are recomputed and compared (default 8; 0 skips)",
    )
    add_quantize(
        v,
        "with --model: how it is loaded to recompute rows; default: as the cache's reference was (its manifest's "
        "build.quantization); another way is refused",
        default=None,
    )
    add_cache_id(v)
    add_storage_option(v)


@command(
    "verify",
    "check schema, checksums and (optionally) fingerprints",
    "Verify a cache; exit 1 at the first mismatch.",
    _verify_options,
    ("cache",),
)
def cmd_verify(a) -> int:
    from .report import verify_cache

    if a.recompute < 0:
        raise PactError(f"--recompute {a.recompute}: must be >= 0")
    if a.quantize is not None and a.model is None:
        raise PactError(f"--quantize {a.quantize}: says how --model is loaded to recompute rows; give --model too")
    res = verify_cache(
        a.cache, dataset=a.dataset, model=a.model, cache_id=a.cache_id, recompute=a.recompute, quantize=a.quantize
    )
    print(
        f"{a.cache.display}: OK, cache {res['cache_id'][:12]}, {res['rows']:,} rows, {res['response_steps']:,} "
        f"steps; checked " + ", ".join(res["checked"])
    )
    return 0


def _stats_options(st):
    st.add_argument("cache", metavar="CACHE", help="cache folder or URL")
    add_json(st, "print JSON (every position, quantiles, histogram, top rows)")
    st.add_argument(
        "--plot", metavar="DIR", help="also write mass_by_position.png and step0_mass.png into DIR (never overwritten)"
    )
    st.add_argument(
        "--top", type=positive_int, default=20, help="rows with the highest step-0 mass to list (default 20)"
    )
    st.add_argument(
        "--flag-at",
        type=float,
        default=0.9,
        metavar="MASS",
        help="count rows whose step-0 mass is above MASS as refusal-like (default 0.9)",
    )
    add_cache_id(st)
    add_storage_option(st)


@command(
    "stats",
    "the reference's safety-token mass by position; refusal-like rows (an audit)",
    "Per response position: the reference's mass on the safety tokens and its entropy over them; per "
    "example: the step-0 refusal mass, which flags harmful-looking rows of a fine-tuning "
    "set.",
    _stats_options,
    ("cache",),
)
def cmd_stats(a) -> int:
    from .format import open_cache
    from .stats import cache_stats, format_stats, plot_stats

    if a.plot is not None and not a.plot.strip():
        raise PactError("--plot '': give the folder the plots go into (e.g. --plot plots/)")
    if a.plot:
        for name in ("mass_by_position.png", "step0_mass.png"):
            if (Path(a.plot) / name).exists():
                raise OutputExistsError(
                    f"{Path(a.plot) / name}: exists; choose another --plot folder (nothing is overwritten)"
                )
    cache = open_cache(a.cache, cache_id=a.cache_id)
    if cache.num_rows == 0:
        raise PactError(f"{a.cache.display}: the cache holds no rows; there is nothing to describe")
    if not 0.0 <= a.flag_at <= 1.0:
        raise PactError(f"--flag-at {a.flag_at}: must be a probability mass in [0, 1]")
    s = cache_stats(cache, top=a.top, flag_at=a.flag_at)
    print(json.dumps(s.to_json(), indent=2) if a.json else format_stats(s))
    if a.plot:
        for p in plot_stats(s, Path(a.plot)):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def _merge_options(mg):
    mg.add_argument("caches", nargs="+", metavar="CACHE", help="two or more caches (folders or URLs)")
    add_output(mg, "OUT", "new cache (must not exist or be empty)")
    mg.add_argument("--rows-per-part", type=positive_int, help="rows per part of OUT (default: the first cache's)")
    add_no_progress(mg)
    add_storage_option(mg)


@command(
    "merge",
    "concatenate caches built alike into a new cache",
    "Concatenate caches built with the same reference, tokenizer, safety tokens, encoding, max length "
    "and dtype, in the order given, into a new cache (rows renumbered; values copied as stored).",
    _merge_options,
    ("caches", "output"),
)
def cmd_merge(a) -> int:
    from .combine import merge_caches

    m = merge_caches(a.caches, a.output, a.rows_per_part, progress=not a.no_progress)
    print(
        f"{a.output.display}: cache {m.cache_id[:12]}: {m.counts.rows:,} rows from {len(a.caches)} caches in "
        f"{len(m.parts)} part(s)"
    )
    return 0


def _filter_options(f):
    f.add_argument("cache", metavar="CACHE", help="the cache to filter (folder or URL)")
    f.add_argument(
        "--above",
        type=float,
        required=True,
        metavar="MASS",
        help="leave out the rows whose step-0 refusal mass (see `pact-cache stats`) is above MASS, e.g. 0.9",
    )
    add_output(f, "OUT", "new cache (must not exist or be empty)")
    f.add_argument("--rows-per-part", type=positive_int, help="rows per part of OUT (default: the source's)")
    add_no_progress(f)
    add_storage_option(f)


@command(
    "filter",
    "the rows the reference would not refuse, as a new cache (the data-filter baseline)",
    "Keep the rows whose step-0 refusal mass (the reference's mass on the safety tokens before the first response "
    "token; `pact-cache stats` ranks rows by it) is at most --above, renumbered, as a new cache with its own id: "
    "the first defence a practitioner tries against harmful rows in a fine-tuning "
    "set.",
    _filter_options,
    ("cache", "output"),
)
def cmd_filter(a) -> int:
    from .combine import filter_cache

    m, dropped = filter_cache(a.cache, a.output, a.above, a.rows_per_part, progress=not a.no_progress)
    print(
        f"{a.output.display}: cache {m.cache_id[:12]}: {m.counts.rows:,} rows kept, {dropped:,} left out "
        f"(step-0 refusal mass above {a.above:g})"
    )
    return 0


def _diff_options(df):
    df.add_argument("a", metavar="A", help="first cache")
    df.add_argument("b", metavar="B", help="second cache")
    add_json(df)
    add_storage_option(df)


@command(
    "diff",
    "rows added, removed and changed between two caches",
    "Match rows by their tokenised input; report identity fields that differ, rows added, removed "
    "and changed, and the largest value difference per column.",
    _diff_options,
    ("a", "b"),
)
def cmd_diff(a) -> int:
    from .combine import diff_caches, diff_json, format_diff

    d = diff_caches(a.a, a.b)
    print(diff_json(d) if a.json else format_diff(d))
    return 0


def _cp_options(c):
    c.add_argument("src", metavar="SRC", help="the cache to copy (folder or URL)")
    c.add_argument("dst", metavar="DST", help="where to put it (new, empty, or a copy of this cache under way)")
    add_cache_id(c, "SRC")
    add_no_progress(c)
    add_storage_option(c)


@command(
    "cp",
    "copy a cache between two locations (folder, s3://, gs://, hf://, ...), checking it",
    "Copy a cache, verifying every part's sha256 on the way; the manifest is published last. "
    "A stopped copy resumes; a destination holding a different cache is refused.",
    _cp_options,
    ("src", "dst"),
)
def cmd_cp(a) -> int:
    from .copy import copy_cache

    res = copy_cache(a.src, a.dst, cache_id=a.cache_id, progress=not a.no_progress)
    print(
        f"{a.dst.display}: cache {res.cache_id[:12]}: {res.parts_copied} part(s) copied ({res.bytes_copied:,} bytes, "
        f"every sha256 checked), "
        f"{res.parts_kept} already there and checked"
        + (
            f"; {res.parts_replaced} of the copied were damaged or missing at the destination and replaced"
            if res.parts_replaced
            else ""
        )
    )
    return 0


def _upgrade_options(u):
    u.add_argument("cache", metavar="OLD", help="the pact-cache/1 cache folder")
    add_output(u, "NEW", "new folder for the upgraded cache (must not exist)")


@command(
    "upgrade",
    "copy a pact-cache/1 cache into a new pact-cache/2 folder",
    "Check a pact-cache/1 cache (every part's sha256 and rows) and write it as pact-cache/2 into a new "
    "folder: content-derived id and row digests. The values are not recomputed, so upgrade only a "
    "cache you trust; rebuilding is the other way.",
    _upgrade_options,
)
def cmd_upgrade(a) -> int:
    from .upgrade import upgrade

    m = upgrade(a.cache, a.output)
    print(
        f"{a.output}: pact-cache/2 cache {m.cache_id[:12]}: {m.counts.rows:,} rows in {len(m.parts)} part(s), "
        f"checked and re-identified"
    )
    return 0


def _score_options(sc):
    sc.add_argument("cache", metavar="CACHE", help="cache folder (local path or fsspec URL)")
    sc.add_argument(
        "--degraded", required=True, metavar="MODEL", help="the safety-degraded model (same tokenizer as the reference)"
    )
    sc.add_argument(
        "--utility", required=True, metavar="MODEL", help="the utility-oriented model (same tokenizer as the reference)"
    )
    add_output(sc, "OUT", "new folder (or URL) for the scored cache; must be empty or absent")
    add_cache_id(sc, "CACHE")
    sc.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass (default 8)")
    add_dtype_device(sc)
    add_no_progress(sc)
    add_storage_option(sc)


@command(
    "score",
    "TOSS token scores from two models, added to a copy of the cache",
    "Run a safety-degraded and a utility-oriented model (both fine-tuned for the purpose, e.g. with "
    "pact-train on harmful and on utility data) once over every cached row: score_t = log p_degraded(y_t) "
    "- log p_utility(y_t). The scores are written beside a checked copy of the cache in OUT (a new "
    "cache id); pact-train --token-mask FRACTION then leaves the highest-scoring tokens out.",
    _score_options,
    ("cache", "output"),
)
def cmd_score(a) -> int:
    from .score import score_cache

    m = score_cache(
        a.cache,
        a.degraded,
        a.utility,
        a.output,
        batch_size=a.batch_size,
        dtype=a.dtype,
        device=a.device,
        cache_id=a.cache_id,
        progress=not a.no_progress,
    )
    extra = sum(f.bytes for f in m.scores.files)
    print(
        f"{a.output.display}: cache {m.cache_id[:12]}: {m.counts.response_steps:,} response tokens scored "
        f"({m.scores.algorithm}), "
        f"{extra:,} bytes of scores ({extra / max(m.counts.response_steps, 1):.1f} B/step) beside {len(m.parts)} "
        f"part(s)"
    )
    return 0


def _direction_options(dr):
    dr.add_argument(
        "--aligned", required=True, metavar="MODEL", help=f"aligned chat model (folder, hub id or {DEFAULT_MODEL})"
    )
    dr.add_argument(
        "--base", required=True, metavar="MODEL", help="the base model it was aligned from (same architecture)"
    )
    dr.add_argument(
        "--modules",
        default="q_proj,v_proj",
        help="comma-separated layer names: the LoRA targets of the "
        "runs "
        "(default q_proj,v_proj, pact-train's and AsFT's)",
    )
    dr.add_argument(
        "--rank",
        type=positive_int,
        help="keep a rank-r factor of each V (smaller file; the relative "
        "error of V V^T is "
        "printed and stored); default: the full V",
    )
    add_dtype_device(dr, "how the models are loaded (V is float32)")
    add_output(dr, "FILE", "where to write the direction (.safetensors; must not exist)")


@command(
    "direction",
    "AsFT's alignment direction V = W_aligned - W_base per LoRA module -> .safetensors",
    "Compute, once, what pact-train --method asft needs: for every linear layer named in "
    "--modules, V = W_aligned - W_base (or a rank-r factor of it, with the error stated) and "
    "||V||_F, so that training holds neither model.",
    _direction_options,
)
def cmd_direction(a) -> int:
    from .direction import compute_direction, save_direction
    from .models import load_model, model_fingerprint, resolve_model

    out = new_file(a.output, "direction.safetensors")
    modules = [m.strip() for m in a.modules.split(",") if m.strip()]
    if not modules:
        raise PactError("--modules: give at least one layer name, e.g. q_proj,v_proj")
    ra, rb = resolve_model(a.aligned), resolve_model(a.base)
    aligned, device, _ = load_model(ra, a.dtype, a.device)
    base, _, _ = load_model(rb, a.dtype, device)
    from tqdm.auto import tqdm

    direction = compute_direction(
        aligned,
        base,
        modules,
        a.rank,
        model_fingerprint(ra),
        model_fingerprint(rb),
        progress=lambda xs: tqdm(xs, desc="direction", unit="layer", file=sys.stderr),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_direction(direction, out)
    worst = max(direction.errors.values())
    print(
        f"wrote {out}: {len(direction.factors)} layers ({', '.join(modules)}), "
        + (f"rank {a.rank}, largest relative error of V V^T {worst:.3g}" if a.rank else "full V (exact)")
        + f", {out.stat().st_size / 1e6:.1f} MB"
    )
    return 0


# ----------------------------------------------------------------------------- the edge


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="pact-cache",
        description="Run an aligned reference model once over a fine-tuning set and "
        "cache the safety-token log-probs PACT needs.",
    )
    add_version(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS.values():
        c.options(sub.add_parser(c.name, help=c.help, description=c.description))
    return p


def _run(args) -> int:
    """The edge: every cache argument becomes a Location (with the storage options), once."""
    from .storage import Location

    cmd = COMMANDS[args.command]
    opts = parse_storage_options(getattr(args, "storage_option", None))
    for name in cmd.locations:
        value = getattr(args, name)
        setattr(
            args, name, [Location.of(v, opts) for v in value] if isinstance(value, list) else Location.of(value, opts)
        )
    return cmd.handler(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        f"pact-cache {args.command}", _run, args, "interrupted; finished parts are kept, rerun with --resume"
    )


if __name__ == "__main__":
    sys.exit(main())
