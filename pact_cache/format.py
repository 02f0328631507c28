"""The cache format ``pact-cache/2``: encoding, manifest, atomic part writer, streaming reader.

A cache is a folder (local path or fsspec URL) holding ``manifest.json`` and Parquet parts. A cache
comes from elsewhere and is untrusted: :func:`open_cache` and the reader enforce every rule below
and raise ``CacheError`` naming the rule, the file and, where there is one, the row. MUST and MUST
NOT are requirements on writers and readers; MAY marks what a reader has to accept.

Manifest (``manifest.json``, a JSON object; parsed by :class:`pact_cache.manifest.Manifest`)

* It MUST be strict JSON: UTF-8, no ``NaN``/``Infinity``, at most 64 MiB, a regular file.
* ``format`` MUST be ``"pact-cache/2"``. A ``pact-cache/1`` cache has no content-derived id and no
  row digests; it is refused with a message saying to rebuild it or run ``pact-cache upgrade``.
* Every field has a type and a range, checked on open: ``tokens`` is a full ``pact-tokens/1`` object
  whose ``ids`` are distinct integers in ``[0, build.vocab_size)`` and whose ``weights`` are K
  finite numbers with at least one > 0; ``encoding`` parameters are finite and in range (q8:
  ``1 <= scale <= 255``, ``0 < floor <= 1000``, ``round(scale * log1p(floor)) <= 255``,
  ``1 <= top_scale, target_scale <= 65535``); counts are non-negative integers that equal the sums
  over the parts; sha256 fields are 64 lowercase hex characters.
* ``parts`` lists every part in row order; each entry gives ``name`` (a plain file name: no ``/``,
  ``\\``, no leading ``.``, ending in ``.parquet``, listed once), ``rows``, ``steps``, ``bytes``,
  ``sha256`` (of the file) and ``rows_sha256`` (of its rows, below).
* ``cache_id`` MUST equal the **content id**: sha256 over the sorted, type-tagged JSON of the
  identity (the format, the reference's weight-file digests, the tokenizer fingerprint and
  vocabulary size, the tokens' ids, weights, strings and method, the dataset fingerprint, the
  build parameters including ``build.algorithm``, the version of the code that computed the
  values, and the encoding), the counts (but ``skipped_rows``, which names source files) and every
  part entry. A reader recomputes it on open and refuses a mismatch, so an edited manifest or a
  swapped part no longer carries its old id. Provenance (model name and path, revision, dataset
  path, where skipped rows were, tool version) is not part of the id: the same cache built
  elsewhere has the same id. A user MAY pin an id (``--cache-id``, a prefix of at least 8
  characters): the reader then refuses any other cache, however consistent it is.

Parts (Parquet, zstd). One row per example:

==================  ==============  ==========================================================
column              arrow type      meaning
==================  ==============  ==========================================================
example_id          string          ``{index:08d}-{sha256(messages)[:12]}``
input_ids           list<int32>     full_ids after truncation; every id in [0, vocab_size)
response_start      int32           index of the first response token; 1 <= rs < len(input_ids)
full_q / full_f32   binary          per step t: log p_ref(s | input_ids[:rs+t]) for s in S
post_q / post_f32   binary          same, context = assistant header + response[:t]
full_top, post_top  binary          (q8 only) per-step maximum over S, uint16
target_q/target_f32 binary          log p_ref(input_ids[rs+t] | input_ids[:rs+t])
==================  ==============  ==========================================================

* A part MUST be a regular file (on object stores: a plain object) directly inside the cache
  folder; a reader MUST NOT follow a symbolic link that leaves the folder, and MUST refuse FIFOs,
  devices and folders without opening them (so nothing blocks). Its size MUST equal ``bytes``, and
  a reader MUST NOT read more than ``bytes`` bytes of it; its sha256 MUST equal ``sha256``.
* ``rows_sha256`` is the sha256 of ``b"pact-rows/1\\0"`` followed, for each row in order, by the
  UTF-8 ``example_id``, a zero byte, ``response_start`` and ``len(input_ids)`` as little-endian
  int32, and ``input_ids`` as little-endian int32. It ties the rows to the dataset they came from:
  ``pact-cache verify --dataset D`` re-tokenises D and recomputes it part by part.
* The footer's key-value metadata MAY hold ``pact_cache.build_key``, the hash of the identity; a
  resumed build accepts an existing part only when that key and the part's rows equal its own.
* Nulls are not allowed anywhere (not in ``input_ids``, not in a blob).
* A writer SHOULD cut a part into row groups of at most 16,384 response steps (a longer row is a
  group of its own), so that a reader, which holds one row group at a time, needs about 1.7 MB for
  q8 at K=50 (6.6 MB for f32) however large the part. A reader MUST accept any row-group layout.

Token scores (optional; ``pact-cache score``, TOSS). A manifest MAY hold ``scores``: ``algorithm``
(``toss/1``: ``log p_degraded(y_t) - log p_utility(y_t)`` per response step), ``degraded`` and
``utility`` (model fingerprints with ``weights_sha256``) and ``files``, one per part in part order:
``part`` (that part's name), ``name`` (a plain ``.parquet`` file name, not a part's), ``bytes``,
``sha256``. Each file holds one row per row of its part, in order: ``example_id`` string (equal to
the part's) and ``score`` binary (float32 ``[n]``, finite). The entry's content (algorithm, the
models' weight digests, the files) is part of the cache id, so a reader that does not know the
field refuses a scored cache as an id mismatch rather than reading it as another cache. A reader
MUST check each file's size and sha256 (4 bytes per step: it is read whole), its row count,
example ids and score lengths against the part's rows, and refuse non-finite scores.

Let ``n = len(input_ids) - response_start`` (the response steps, n >= 1) and K = len(S).
Blobs are little-endian, row-major, and MUST have exactly these lengths:

* ``f32``: ``*_f32`` views are float32 ``[n, K]`` (4nK bytes); ``target_f32`` float32 ``[n]``.
* ``q8`` (default): ``*_top`` is uint16 ``[n]`` holding ``round(-max_s v * top_scale)``, clamped to
  65535; ``*_q`` is uint8 ``[n, K]`` holding ``round(scale * log1p(min(top - v, floor)))``
  where ``top`` is the decoded maximum; ``target_q`` is uint16 ``[n]`` holding
  ``round(-v * target_scale)``, clamped to 65535. Decoding: ``v = top - expm1(code / scale)``.

Values. Every decoded value is a log-probability: finite and <= 0. A reader MUST refuse NaN,
infinities and positive values in f32 blobs, an f32 step whose K probabilities sum above 1 (beyond
float rounding: 1 + 1e-3), and q8 codes above ``round(scale * log1p(floor))``, which the
encoder never writes.

Error bound of ``q8`` (stated per value, d = max over S of the step minus v):

* if d <= floor: ``|decoded - v| <= (1 + d + 2**-10) * (exp(0.5 / scale) - 1) + 2**-10``;
* if d > floor: the value is stored as the floor, ``decoded = top - expm1(round(scale*log1p(floor))/scale)``,
  which is >= v - bound above (the reader returns a value no lower than the truth);
* the per-step maximum itself: ``|decoded - v| <= 2**-10`` when v >= -127.99;
* target: ``|decoded - v| <= 2**-9`` when v >= -255.99, else decoded = -255.99.

With the default ``scale = 28``, ``floor = 40``: 1.8% of (1 + d), e.g. 0.02 nats at the top,
0.09 at d = 4, and a floor 40 nats below the top, where softmax(v / 2) weights are below 2e-9.
Why 28: on 1024 real SST-2 rows, scales 16/24/28/32 cost about 38/44/46/48 bytes per step, and
the PACT KL's expected error (it is a positive bias, about sum_s q_s Var(error_s) / 2, from the
policy-independent entropy term) is 2.0/0.9/0.7/0.55% for a policy equal to the reference, where
the KL is smallest, and 0.06-0.08% for a policy 2 nats away; the loss CE + KL stays within 0.1%.

Edge cases: a log-prob of -inf (a token the reference masks out) is written as -10000, which
every softmax treats as zero; a row with n = 0 is never written (the builder skips such rows and counts them);
K may be any size >= 1; a cache MAY be empty (``parts == []``, zero rows; trainers refuse it), but
a part of a non-empty cache MUST hold at least one row; part order in the manifest is the row
order of the cache; a manifest MAY carry fields this spec does not name (they are ignored and
are not part of the id); files in the folder that the manifest does not list are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CacheError
from .manifest import ENCODINGS  # noqa: F401  (re-exported: the encodings are part of the format)
from .manifest import MANIFEST_MAX_BYTES, Encoding, Manifest, PartEntry, check_pin, load_json

from .storage import Location, is_local_fs

MANIFEST = "manifest.json"
ZSTD_LEVEL = 19  # build time is dominated by the model; level 19 buys ~10% over the default
BUILD_KEY_META = b"pact_cache.build_key"
F32_SUM_TOLERANCE = 1e-3  # slack for "K probabilities sum to at most 1" in f32 blobs (float rounding)
LOGPROB_MIN = -1e4  # what -inf (a token the reference masks out) is stored as
# Response steps per Parquet row group: what a reader holds at once (about 1.7 MB of q8 blobs at
# K=50, 6.6 MB of f32). Large enough that short-answer sets keep one group per part: on 512 SST-2
# rows (4.4 steps each), groups of 128 rows cost 6% more bytes than one group of 512.
ROW_GROUP_STEPS = 16384


# ----------------------------------------------------------------------------- encoding

def q8_bound(d: np.ndarray, enc: Encoding) -> np.ndarray:
    """Largest |decoded - true| allowed for values ``d`` nats below the step maximum (d <= floor)."""
    return (1.0 + d + 2.0**-10) * np.expm1(0.5 / enc.scale) + 2.0**-10


def encode_view(v: np.ndarray, enc: Encoding) -> dict[str, bytes]:
    """Encode log-probs ``v`` of shape ``(n, K)`` float32 into the blobs of one view."""
    v = np.asarray(v, dtype=np.float32)
    if enc.name == "f32":
        return {"f32": v.astype("<f4").tobytes()}
    top_q = np.clip(np.round(-v.max(axis=1).astype(np.float64) * enc.top_scale), 0, 65535).astype("<u2")
    top = -(top_q.astype(np.float64) / enc.top_scale)
    d = np.clip(top[:, None] - v.astype(np.float64), 0.0, enc.floor)
    code = np.round(enc.scale * np.log1p(d)).astype(np.uint8)
    return {"q": code.tobytes(), "top": top_q.tobytes()}


def decode_view(blobs: dict[str, bytes], n: int, K: int, enc: Encoding) -> np.ndarray:
    """Inverse of :func:`encode_view`: returns float32 ``(n, K)``."""
    if enc.name == "f32":
        return np.frombuffer(blobs["f32"], dtype="<f4").reshape(n, K).astype(np.float32)
    top = -(np.frombuffer(blobs["top"], dtype="<u2").astype(np.float64) / enc.top_scale)
    code = np.frombuffer(blobs["q"], dtype=np.uint8).reshape(n, K)
    return (top[:, None] - np.expm1(code / enc.scale)).astype(np.float32)


def encode_target(v: np.ndarray, enc: Encoding) -> bytes:
    v = np.asarray(v, dtype=np.float32)
    if enc.name == "f32":
        return v.astype("<f4").tobytes()
    return np.clip(np.round(-v.astype(np.float64) * enc.target_scale), 0, 65535).astype("<u2").tobytes()


def decode_target(blob: bytes, n: int, enc: Encoding) -> np.ndarray:
    if enc.name == "f32":
        return np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return (-(np.frombuffer(blob, dtype="<u2").astype(np.float64) / enc.target_scale)).astype(np.float32)


def blob_sizes(n: int, K: int, enc: Encoding) -> dict[str, int]:
    """Exact byte length of each blob column for a row with ``n`` steps."""
    if enc.name == "f32":
        return {"full_f32": 4 * n * K, "post_f32": 4 * n * K, "target_f32": 4 * n}
    return {"full_q": n * K, "full_top": 2 * n, "post_q": n * K, "post_top": 2 * n, "target_q": 2 * n}


def row_groups(steps: list[int], limit: int | None = None) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` row ranges holding at most ``limit`` response steps each (a row
    longer than that is a group of its own); one empty group for zero rows."""
    limit = limit or ROW_GROUP_STEPS
    out, a, acc = [], 0, 0
    for i, n in enumerate(steps):
        if i > a and acc + n > limit:
            out.append((a, i))
            a, acc = i, 0
        acc += n
    out.append((a, len(steps)))
    return out


def rows_digest(rows) -> str:
    """``rows_sha256`` of the spec over ``(example_id, input_ids, response_start)`` triples."""
    h = hashlib.sha256(b"pact-rows/1\0")
    for example_id, input_ids, response_start in rows:
        h.update(_row_bytes(example_id, input_ids, response_start))
    return h.hexdigest()


def _row_bytes(example_id: str, input_ids, response_start: int) -> bytes:
    ids = np.asarray(input_ids, dtype="<i4")
    return str(example_id).encode("utf-8") + b"\0" + np.array([response_start, len(ids)], dtype="<i4").tobytes() + ids.tobytes()


# ----------------------------------------------------------------------------- schema + writer

def part_schema(enc: Encoding):
    import pyarrow as pa

    fields = [("example_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("response_start", pa.int32())]
    fields += [(name, pa.binary()) for name in blob_sizes(1, 1, enc)]
    return pa.schema(fields)


@dataclass
class RowResult:
    """Everything the builder computed for one example, before encoding."""

    example_id: str
    input_ids: list[int]
    response_start: int
    full: np.ndarray  # (n, K) float32
    post: np.ndarray  # (n, K) float32
    target: np.ndarray  # (n,) float32


def sha256_stream(f, limit: int | None = None) -> tuple[str, int]:
    """sha256 and length of what an open binary file yields, 4 MiB at a time, never past ``limit`` bytes."""
    h, n = hashlib.sha256(), 0
    while limit is None or n < limit:
        block = f.read(1 << 22 if limit is None else min(1 << 22, limit - n))
        if not block:
            break
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def sha256_path(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)[0]


def json_bytes(obj) -> bytes:
    """How pact-cache writes JSON it publishes (manifests, states): sorted, indented, strict."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40] or "host"


def tmp_name(path: Path) -> Path:
    """Where to write ``path`` before renaming it into place: hidden, and named after this host
    and process, so that a later start can tell a dead writer's leftovers from a live one's."""
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}")


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`tmp_name`'s (a writer's file on its way)."""
    return name.startswith(".") and ".tmp-" in name


def stale_tmp(p: Path) -> bool:
    """Whether ``p`` is a temporary file or folder of :func:`tmp_name` whose process has died on this host."""
    name = p.name
    if not is_tmp_name(name):
        return False
    tail = name.rsplit(".tmp-", 1)[1]
    host, _, pid = tail.rpartition("-")
    if host != _host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers never see half a file."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def write_part(path: Path, rows: list[RowResult], enc: Encoding, build_key: str = "") -> PartEntry:
    """Encode rows and write one Parquet part atomically; returns its manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {name: [] for name in part_schema(enc).names}
    steps = 0
    for r in rows:
        n = len(r.input_ids) - r.response_start
        if not (r.full.shape == r.post.shape and r.full.shape[0] == n == r.target.shape[0]):
            raise CacheError(f"internal: row {r.example_id} has views of shape {r.full.shape}/{r.post.shape} for {n} steps")
        for name, values in (("full", r.full), ("post", r.post), ("target", r.target)):
            if np.isnan(values).any() or (values > 0).any():
                raise CacheError(f"{path.name}: the reference gave a log-prob that is NaN or positive ({name} view of {r.example_id}); "
                                 "the reference model's weights or --dtype overflow: try --dtype fp32")
        # a token the reference masks out has log-prob -inf: stored as LOGPROB_MIN, which softmax treats alike
        r = RowResult(r.example_id, r.input_ids, r.response_start, np.maximum(r.full, LOGPROB_MIN),
                      np.maximum(r.post, LOGPROB_MIN), np.maximum(r.target, LOGPROB_MIN))
        steps += n
        cols["example_id"].append(r.example_id)
        cols["input_ids"].append(r.input_ids)
        cols["response_start"].append(r.response_start)
        for view, values in (("full", r.full), ("post", r.post)):
            for kind, blob in encode_view(values, enc).items():
                cols[f"{view}_{kind}"].append(blob)
        cols["target_f32" if enc.name == "f32" else "target_q"].append(encode_target(r.target, enc))
    schema = part_schema(enc).with_metadata({BUILD_KEY_META: build_key.encode()})
    table = pa.table(cols, schema=schema)
    tmp = tmp_name(path)
    try:
        # Row groups of at most ROW_GROUP_STEPS steps: a reader holds one at a time, whatever the part's
        # size. Dictionary encoding only pays for the ids; no statistics on blobs.
        with pq.ParquetWriter(tmp, schema, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False,
                              write_statistics=["response_start"]) as writer:
            for a, b in row_groups([len(r.input_ids) - r.response_start for r in rows]):
                writer.write_table(table.slice(a, b - a), row_group_size=max(b - a, 1))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return PartEntry(path.name, len(rows), steps, path.stat().st_size, sha256_path(path),
                     rows_digest((r.example_id, r.input_ids, r.response_start) for r in rows))


# ----------------------------------------------------------------------------- safe file access

def check_regular_file(fs, root: str, path: str, where: str, size: int | None = None, max_size: int | None = None) -> int:
    """Refuse anything but a regular file (a plain object) inside ``root``, without opening it.

    Symbolic links are followed only when they stay inside ``root``. Returns the file's size.
    """
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise CacheError(f"{where}: part listed in the manifest is missing; re-download or rebuild the cache") from None
    except OSError as err:
        raise CacheError(f"{where}: cannot be read ({err.strerror or err})") from None
    if is_local_fs(fs):
        real_root = os.path.realpath(root)
        if os.path.dirname(os.path.realpath(path)) != real_root:
            raise CacheError(f"{where}: is a link that points outside the cache folder ({os.path.realpath(path)}); refusing to read it")
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise CacheError(f"{where}: is {kind}, not a regular file; refusing to read it")
    elif info.get("type") != "file":
        raise CacheError(f"{where}: is a {info.get('type')}, not a plain object; refusing to read it")
    got = int(info.get("size") or 0)
    if size is not None and got != size:
        raise CacheError(f"{where}: size is {got} bytes, manifest says {size}; the part is truncated or replaced, re-download or rebuild it")
    if max_size is not None and got > max_size:
        raise CacheError(f"{where}: is {got} bytes, more than the {max_size} a manifest may hold; refusing it")
    return got


# ----------------------------------------------------------------------------- reader

@dataclass
class CacheRow:
    """One decoded example. Arrays are float32; ``full_logprobs[t, k]`` is log p_ref(S[k] | ...)."""

    example_id: str
    input_ids: np.ndarray  # (L,) int64
    response_start: int
    full_logprobs: np.ndarray  # (n, K)
    post_logprobs: np.ndarray  # (n, K)
    target_logprob: np.ndarray  # (n,)
    score: np.ndarray | None = None  # (n,) TOSS token scores, when the cache has them (pact-cache score)

    @property
    def steps(self) -> int:
        return len(self.input_ids) - self.response_start


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CacheError(f"{where}: {msg}")


class Cache:
    """A read-only view of a cache. Streams rows part by part; holds one Parquet batch at most.

    >>> cache = open_cache("cache/")
    >>> for row in cache.iter_rows(): ...
    """

    def __init__(self, location: Location | str, manifest: Manifest, verify_checksums: bool = True):
        self.location = Location.of(location)
        self.url = self.location.display
        self.fs, self.root = self.location.fs, self.location.root
        self.manifest = manifest
        self.encoding = manifest.encoding
        self.tokens = manifest.tokens
        self.ids = list(self.tokens.ids)
        self.K = len(self.ids)
        self.vocab_size = manifest.build.vocab_size
        self.verify_checksums = verify_checksums
        self._checked: set[str] = set()
        self._score_files = {f.part: f for f in manifest.scores.files} if manifest.scores is not None else {}

    # -- metadata
    @property
    def cache_id(self) -> str:
        return self.manifest.cache_id

    @property
    def num_rows(self) -> int:
        return self.manifest.counts.rows

    @property
    def num_steps(self) -> int:
        return self.manifest.counts.response_steps

    @property
    def parts(self) -> tuple[PartEntry, ...]:
        return self.manifest.parts

    def __len__(self) -> int:
        return self.num_rows

    def part_path(self, part: PartEntry) -> str:
        return f"{self.root}/{part.name}"

    def _where(self, part: PartEntry) -> str:
        return f"{self.url.rstrip('/')}/{part.name}"

    # -- integrity
    def check_part(self, part: PartEntry) -> None:
        """Type, size and sha256 of one part against the manifest (once per part per Cache)."""
        if part.name in self._checked:
            return
        where = self._where(part)
        check_regular_file(self.fs, self.root, self.part_path(part), where, size=part.bytes)
        with self.fs.open(self.part_path(part), "rb") as f:
            digest, n = sha256_stream(f, limit=part.bytes)  # never more than the manifest states
        _require(n == part.bytes and digest == part.sha256, where,
                 "sha256 differs from the manifest; the part is corrupt or was changed, re-download or rebuild it")
        self._checked.add(part.name)

    def _parquet(self, f, part: PartEntry, where: str):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise CacheError(f"{where}: not a readable Parquet file ({type(err).__name__}: {str(err)[:120]}); re-download or rebuild it") from None
        for want in part_schema(self.encoding):
            _require(want.name in schema.names, where, f"column {want.name!r} is missing (encoding {self.encoding.name})")
            _require(schema.field(want.name).type == want.type, where, f"column {want.name!r} has type {schema.field(want.name).type}, expected {want.type}")
        _require(pf.metadata.num_rows == part.rows, where, f"holds {pf.metadata.num_rows} rows, manifest says {part.rows}")
        return pf

    # -- token scores (sidecars)
    def read_part_scores(self, part: PartEntry) -> tuple[list[str], list[np.ndarray]]:
        """The example ids and float32 ``(n,)`` token scores of one part's rows, from its score file,
        checked: regular file, size and sha256 (always: 4 bytes per step), schema, row count, finite
        values. Empty lists when the cache has no scores."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sf = self._score_files.get(part.name)
        if sf is None:
            return [], []
        where, path = f"{self.url.rstrip('/')}/{sf.name}", f"{self.root}/{sf.name}"
        check_regular_file(self.fs, self.root, path, where, size=sf.bytes)
        with self.fs.open(path, "rb") as f:
            data = f.read(sf.bytes)
        _require(len(data) == sf.bytes and hashlib.sha256(data).hexdigest() == sf.sha256, where,
                 "sha256 differs from the manifest; the score file is corrupt or was changed, re-download it or score the cache again")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as err:
            raise CacheError(f"{where}: not a readable Parquet file ({type(err).__name__}: {str(err)[:120]}); score the cache again") from None
        for name, typ in (("example_id", pa.string()), ("score", pa.binary())):
            _require(name in table.column_names and table.schema.field(name).type == typ, where, f"column {name!r} ({typ}) is missing")
        _require(table.num_rows == part.rows, where, f"holds {table.num_rows} rows, its part {part.name} {part.rows}")
        ids, blobs = table.column("example_id").to_pylist(), table.column("score").to_pylist()
        scores = []
        for j, blob in enumerate(blobs):
            _require(blob is not None and len(blob) % 4 == 0, where, f"row {j}: score is null or not float32")
            v = np.frombuffer(blob, dtype="<f4")
            _require(bool(np.isfinite(v).all()), where, f"row {j}: a score is not finite; score the cache again")
            scores.append(v)
        return ids, scores

    # -- rows
    def iter_part_rows(self, part: PartEntry, batch_rows: int = 64) -> Iterator[CacheRow]:
        """The rows of one part, decoded and checked; at the end, their digest against the manifest."""
        found: dict = {}
        yield from self.scan_part(part, found, batch_rows)
        _require(found["rows_sha256"] == part.rows_sha256, self._where(part),
                 "its rows (example ids, input ids, response starts) differ from the manifest's rows_sha256; "
                 "the part was replaced: re-download or rebuild the cache")

    def scan_part(self, part: PartEntry, found: dict, batch_rows: int = 64) -> Iterator[CacheRow]:
        """Every check of :meth:`iter_part_rows` but the rows digest, which is left in ``found``."""
        where = self._where(part)
        if self.verify_checksums:
            self.check_part(part)
        else:
            check_regular_file(self.fs, self.root, self.part_path(part), where, size=part.bytes)
        score_ids, scores = self.read_part_scores(part)
        with self.fs.open(self.part_path(part), "rb") as f:
            pf = self._parquet(f, part, where)
            names = part_schema(self.encoding).names
            row_no = steps = 0
            digest = hashlib.sha256(b"pact-rows/1\0")
            try:
                batches = pf.iter_batches(batch_size=batch_rows, columns=names)
                for batch in batches:
                    data = batch.to_pydict()
                    clean = self._batch_values_ok(batch, data)  # vectorised; the row-by-row checks name the row
                    for i in range(batch.num_rows):
                        row = self._decode(data, i, f"{where} row {row_no}", check_values=not clean)
                        if scores:
                            _require(score_ids[row_no] == row.example_id and len(scores[row_no]) == row.steps, f"{where} row {row_no}",
                                     f"its score file row is {score_ids[row_no]!r} with {len(scores[row_no])} scores, not this row's "
                                     f"{row.steps}; the scores belong to another cache, score it again")
                            row.score = scores[row_no]
                        digest.update(_row_bytes(row.example_id, row.input_ids, row.response_start))
                        steps += row.steps
                        row_no += 1
                        yield row
            except CacheError:
                raise
            except Exception as err:  # a damaged page inside a file whose checksum was not checked
                raise CacheError(f"{where}: cannot be decoded ({type(err).__name__}: {str(err)[:120]}); re-download or rebuild it") from None
            _require(steps == part.steps, where, f"holds {steps} response steps, manifest says {part.steps}")
            found["rows_sha256"] = digest.hexdigest()

    def _batch_values_ok(self, batch, data: dict) -> bool:
        """Whether every value of a batch passes the value rules (ids in the vocabulary; f32:
        finite, <= 0, K probabilities summing to at most 1; q8: codes the encoder can write). Any
        doubt (a null, a wrong length) answers False, and the row-by-row checks say what is wrong."""
        try:
            ids = batch.column("input_ids")
            if ids.null_count or batch.column("response_start").null_count:
                return False
            flat = ids.flatten()
            if flat.null_count:
                return False
            flat = flat.to_numpy(zero_copy_only=False)
            if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
                return False
            if self.encoding.name == "f32":
                for name in ("full_f32", "post_f32", "target_f32"):
                    v = np.frombuffer(b"".join(data[name]), dtype="<f4")
                    if not (np.isfinite(v).all() and (v <= 0).all()):
                        return False
                    if name != "target_f32" and (v.size % self.K or (np.exp(v).reshape(-1, self.K).sum(axis=1) > 1.0 + F32_SUM_TOLERANCE).any()):
                        return False
            else:
                for name in ("full_q", "post_q"):
                    code = np.frombuffer(b"".join(data[name]), dtype=np.uint8)
                    if code.size and int(code.max()) > self.encoding.max_code:
                        return False
            return True
        except (TypeError, ValueError):
            return False

    def _decode(self, data: dict, i: int, where: str, check_values: bool = True) -> CacheRow:
        eid, ids, rs = data["example_id"][i], data["input_ids"][i], data["response_start"][i]
        _require(isinstance(eid, str) and eid != "", where, "example_id is null or empty")
        _require(ids is not None, where, "input_ids is null")
        try:
            ids_arr = np.asarray(ids, dtype=np.int64)
        except (TypeError, ValueError):
            raise CacheError(f"{where}: input_ids holds a null") from None
        _require(ids_arr.ndim == 1 and len(ids_arr) >= 2, where, "input_ids must hold at least a prompt token and a response token")
        if check_values:
            lo, hi = int(ids_arr.min()), int(ids_arr.max())
            _require(lo >= 0 and hi < self.vocab_size, where, f"input_ids reach {lo if lo < 0 else hi}, outside the vocabulary [0, {self.vocab_size})")
        _require(rs is not None and 1 <= rs < len(ids_arr), where, f"response_start {rs} is outside 1..{len(ids_arr) - 1}")
        n, K, enc = len(ids_arr) - rs, self.K, self.encoding
        for name, size in blob_sizes(n, K, enc).items():
            blob = data[name][i]
            _require(blob is not None and len(blob) == size, where, f"{name} has {len(blob or b'')} bytes, expected {size} for {n} steps x K={K}")
        if enc.name == "f32":
            full = decode_view({"f32": data["full_f32"][i]}, n, K, enc)
            post = decode_view({"f32": data["post_f32"][i]}, n, K, enc)
            target = decode_target(data["target_f32"][i], n, enc)
            for name, v in (("full_f32", full), ("post_f32", post), ("target_f32", target)) if check_values else ():
                _require(bool(np.isfinite(v).all()), where, f"{name} holds a non-finite value (NaN or infinity); the cache is damaged, rebuild it")
                _require(bool((v <= 0).all()), where, f"{name} holds a positive log-probability ({float(v.max()):g}); the cache is damaged, rebuild it")
            for name, v in (("full_f32", full), ("post_f32", post)) if check_values else ():
                mass = np.exp(v).sum(axis=1)  # v <= 0 (checked above), so no overflow
                _require(bool((mass <= 1.0 + F32_SUM_TOLERANCE).all()), where, f"{name}: the K probabilities of a step sum to {float(mass.max()):.4f} > 1; the cache is damaged, rebuild it")
        else:
            for name in ("full_q", "post_q") if check_values else ():
                code = np.frombuffer(data[name][i], dtype=np.uint8)
                _require(int(code.max()) <= enc.max_code, where, f"{name} holds code {int(code.max())}, above {enc.max_code}, which the q8 encoder never writes; the cache is damaged, rebuild it")
            full = decode_view({"q": data["full_q"][i], "top": data["full_top"][i]}, n, K, enc)
            post = decode_view({"q": data["post_q"][i], "top": data["post_top"][i]}, n, K, enc)
            target = decode_target(data["target_q"][i], n, enc)
        return CacheRow(eid, ids_arr, int(rs), full, post, target)

    def iter_rows(self) -> Iterator[CacheRow]:
        """Every row, in cache order, decoded; memory stays at one Parquet batch."""
        for part in self.parts:
            yield from self.iter_part_rows(part)

    def iter_batches(self, batch_size: int) -> Iterator[list[CacheRow]]:
        """Consecutive rows in cache order, ``batch_size`` at a time (the last batch may be short)."""
        buf: list[CacheRow] = []
        for row in self.iter_rows():
            buf.append(row)
            if len(buf) == batch_size:
                yield buf
                buf = []
        if buf:
            yield buf

    # -- decoded views for analysis (the q8 decoding done once, here)
    def decoded_schema(self):
        import pyarrow as pa

        step = pa.list_(pa.float32(), self.K)
        return pa.schema([("example_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("response_start", pa.int32()),
                          ("full_logprobs", pa.list_(step)), ("post_logprobs", pa.list_(step)),
                          ("target_logprob", pa.list_(pa.float32()))],
                         metadata={b"pact_cache.cache_id": self.cache_id.encode(),
                                   b"pact_cache.token_ids": json.dumps(self.ids).encode()})

    def iter_arrow_batches(self, batch_rows: int = 256):
        """Arrow record batches of decoded rows, in cache order: ``full_logprobs`` and
        ``post_logprobs`` are ``list<fixed_size_list<float32, K>>`` (steps x S in the order of
        ``cache.ids``), ``target_logprob`` is ``list<float32>``. Memory: ``batch_rows`` rows."""
        rows: list[CacheRow] = []
        for row in self.iter_rows():
            rows.append(row)
            if len(rows) == batch_rows:
                yield self._arrow_batch(rows)
                rows = []
        if rows:
            yield self._arrow_batch(rows)

    def _arrow_batch(self, rows: list[CacheRow]):
        import pyarrow as pa

        schema = self.decoded_schema()

        def steps_k(views):
            offsets = np.cumsum([0] + [v.shape[0] for v in views]).astype(np.int32)
            flat = pa.array(np.concatenate([v.reshape(-1) for v in views]).astype(np.float32))
            return pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(flat, self.K))

        offsets = np.cumsum([0] + [r.steps for r in rows]).astype(np.int32)
        cols = [pa.array([r.example_id for r in rows], pa.string()),
                pa.array([r.input_ids.astype(np.int32) for r in rows], pa.list_(pa.int32())),
                pa.array([r.response_start for r in rows], pa.int32()),
                steps_k([r.full_logprobs for r in rows]), steps_k([r.post_logprobs for r in rows]),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate([r.target_logprob for r in rows]).astype(np.float32)))]
        return pa.RecordBatch.from_arrays(cols, schema=schema)

    def to_arrow(self):
        """The whole cache, decoded, as one ``pyarrow.Table`` (see :meth:`iter_arrow_batches`;
        it holds every row: for large caches, iterate the batches instead)."""
        import pyarrow as pa

        return pa.Table.from_batches(list(self.iter_arrow_batches()), schema=self.decoded_schema())

    def to_polars(self):
        """The whole cache, decoded, as a ``polars.DataFrame`` (same columns as :meth:`to_arrow`)."""
        import polars as pl

        return pl.from_arrow(self.to_arrow())

    # -- sizes
    def reference_bytes(self) -> int:
        """Compressed bytes of the reference columns (both views, maxima, target) over all parts."""
        ref_cols = set(blob_sizes(1, 1, self.encoding))
        total = 0
        for part in self.parts:
            where = self._where(part)
            check_regular_file(self.fs, self.root, self.part_path(part), where, size=part.bytes)
            with self.fs.open(self.part_path(part), "rb") as f:
                md = self._parquet(f, part, where).metadata
                for rg in range(md.num_row_groups):
                    for c in range(md.num_columns):
                        col = md.row_group(rg).column(c)
                        if col.path_in_schema in ref_cols:
                            total += col.total_compressed_size
        return total


def read_manifest(location: Location | str) -> Manifest:
    """Read and check ``manifest.json``: a regular file (a plain object) of bounded size, strict
    JSON, every rule of the spec, and a ``cache_id`` equal to the content id."""
    loc = Location.of(location)
    url, fs, root = loc.display, loc.fs, loc.root
    path, where = loc.path(MANIFEST), loc.where(MANIFEST)
    try:
        root_info = fs.info(root)
    except FileNotFoundError:
        root_info = None
    except OSError as err:
        raise CacheError(f"{url}: cannot be read ({err.strerror or err})") from None
    if root_info is None and not loc.is_local:
        root_info = {"type": "directory"} if fs.exists(path) else None  # object stores may have no folder entries
    if root_info is None:
        raise CacheError(f"{url}: no such cache folder; pass the folder `pact-cache build` wrote (-o)")
    if root_info.get("type") != "directory":
        raise CacheError(f"{url}: is a file, not a cache folder; pass the folder that holds manifest.json")
    if not fs.exists(path):
        raise CacheError(f"{url}: has no {MANIFEST}; the build did not finish (rerun it with --resume) or this is not a cache")
    check_regular_file(fs, root, path, where, max_size=MANIFEST_MAX_BYTES)
    obj = load_json(loc.read_bytes(MANIFEST, MANIFEST_MAX_BYTES), where, CacheError, "manifest",
                    fix="the manifest is damaged or was edited: re-download or rebuild the cache")
    return Manifest.parse(obj, where)


def open_cache(url: str | Path | Location, verify_checksums: bool = True, cache_id: str | None = None,
               storage_options: dict | None = None) -> Cache:
    """Open a cache (a folder or any fsspec URL) for reading. Checks the manifest and its content id
    now (and the pinned ``cache_id``, if given), and each part's type, size, sha256 and rows before
    using its rows. ``storage_options`` go to the filesystem (endpoint, credentials)."""
    loc = Location.of(url, storage_options)
    manifest = read_manifest(loc)
    check_pin(manifest.cache_id, cache_id, loc.display)
    return Cache(loc, manifest, verify_checksums=verify_checksums)
