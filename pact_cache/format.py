"""The cache format ``pact-cache/1``: encoding, manifest, atomic part writer, streaming reader, verify.

A cache is a folder (local path or fsspec URL) holding ``manifest.json`` and Parquet parts.
The rules below are enforced by :func:`open_cache`; each violation raises ``CacheError`` naming it.

Manifest (JSON object). It MUST have ``format == "pact-cache/1"``, ``cache_id`` (64 hex chars),
``tokens`` (a full tokens.json, ``pact-tokens/1``), ``encoding`` (below), ``counts`` and
``parts``. Every part entry MUST give ``name`` (a plain file name: no ``/``, ``\\``, no leading
``.``, ending in ``.parquet``), ``rows``, ``steps``, ``bytes`` and ``sha256``. A reader MUST
refuse a part whose size or sha256 differs, and MUST NOT read files the manifest does not list.

Part (Parquet, zstd). One row per example; columns:

==================  ==============  ==========================================================
column              arrow type      meaning
==================  ==============  ==========================================================
example_id          string          ``{index:08d}-{sha256(messages)[:12]}``
input_ids           list<int32>     full_ids after truncation
response_start      int32           index of the first response token; 1 <= rs < len(input_ids)
full_q / full_f32   binary          per step t: log p_ref(s | input_ids[:rs+t]) for s in S
post_q / post_f32   binary          same, context = assistant header + response[:t]
full_top, post_top  binary          (q8 only) per-step maximum over S, uint16
target_q/target_f32 binary          log p_ref(input_ids[rs+t] | input_ids[:rs+t])
==================  ==============  ==========================================================

Let ``n = len(input_ids) - response_start`` (the response steps, n >= 1) and K = len(S).
Blobs are little-endian, row-major, and MUST have exactly these lengths:

* ``f32``: ``*_f32`` views are float32 ``[n, K]`` (4nK bytes); ``target_f32`` float32 ``[n]``.
* ``q8`` (default): ``*_top`` is uint16 ``[n]`` holding ``round(-max_s v * 512)``, clamped to
  65535; ``*_q`` is uint8 ``[n, K]`` holding ``round(scale * log1p(min(top - v, floor)))``
  where ``top`` is the decoded maximum; ``target_q`` is uint16 ``[n]`` holding
  ``round(-v * 256)``, clamped to 65535. Decoding: ``v = top - expm1(code / scale)``.

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

Edge cases: a row with n = 0 is never written (the builder skips such rows and counts them);
K may be any size >= 1; parts MAY hold zero rows only when the whole cache is empty; part
order in the manifest is the row order of the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CacheError

FORMAT = "pact-cache/1"
MANIFEST = "manifest.json"
ENCODINGS = {
    "q8": {"name": "q8", "scale": 28.0, "floor": 40.0, "top_scale": 512.0, "target_scale": 256.0},
    "f32": {"name": "f32"},
}
ZSTD_LEVEL = 19  # build time is dominated by the model; level 19 buys ~10% over the default
_PART_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.parquet$")


# ----------------------------------------------------------------------------- encoding

def q8_bound(d: np.ndarray, enc: dict) -> np.ndarray:
    """Largest |decoded - true| allowed for values ``d`` nats below the step maximum (d <= floor)."""
    return (1.0 + d + 2.0**-10) * math.expm1(0.5 / enc["scale"]) + 2.0**-10


def encode_view(v: np.ndarray, enc: dict) -> dict[str, bytes]:
    """Encode log-probs ``v`` of shape ``(n, K)`` float32 into the blobs of one view."""
    v = np.asarray(v, dtype=np.float32)
    if enc["name"] == "f32":
        return {"f32": v.astype("<f4").tobytes()}
    top_q = np.clip(np.round(-v.max(axis=1).astype(np.float64) * enc["top_scale"]), 0, 65535).astype("<u2")
    top = -(top_q.astype(np.float64) / enc["top_scale"])
    d = np.clip(top[:, None] - v.astype(np.float64), 0.0, enc["floor"])
    code = np.round(enc["scale"] * np.log1p(d)).astype(np.uint8)
    return {"q": code.tobytes(), "top": top_q.tobytes()}


def decode_view(blobs: dict[str, bytes], n: int, K: int, enc: dict) -> np.ndarray:
    """Inverse of :func:`encode_view`: returns float32 ``(n, K)``."""
    if enc["name"] == "f32":
        return np.frombuffer(blobs["f32"], dtype="<f4").reshape(n, K).astype(np.float32)
    top = -(np.frombuffer(blobs["top"], dtype="<u2").astype(np.float64) / enc["top_scale"])
    code = np.frombuffer(blobs["q"], dtype=np.uint8).reshape(n, K)
    return (top[:, None] - np.expm1(code / enc["scale"])).astype(np.float32)


def encode_target(v: np.ndarray, enc: dict) -> bytes:
    v = np.asarray(v, dtype=np.float32)
    if enc["name"] == "f32":
        return v.astype("<f4").tobytes()
    return np.clip(np.round(-v.astype(np.float64) * enc["target_scale"]), 0, 65535).astype("<u2").tobytes()


def decode_target(blob: bytes, n: int, enc: dict) -> np.ndarray:
    if enc["name"] == "f32":
        return np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return (-(np.frombuffer(blob, dtype="<u2").astype(np.float64) / enc["target_scale"])).astype(np.float32)


def blob_sizes(n: int, K: int, enc: dict) -> dict[str, int]:
    """Exact byte length of each blob column for a row with ``n`` steps."""
    if enc["name"] == "f32":
        return {"full_f32": 4 * n * K, "post_f32": 4 * n * K, "target_f32": 4 * n}
    return {"full_q": n * K, "full_top": 2 * n, "post_q": n * K, "post_top": 2 * n, "target_q": 2 * n}


# ----------------------------------------------------------------------------- schema + writer

def part_schema(enc: dict):
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


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def write_part(path: Path, rows: list[RowResult], enc: dict) -> dict:
    """Encode rows and write one Parquet part atomically; returns its manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {name: [] for name in part_schema(enc).names}
    steps = 0
    for r in rows:
        n = len(r.input_ids) - r.response_start
        assert r.full.shape == r.post.shape and r.full.shape[0] == n == r.target.shape[0], "row shapes disagree"
        steps += n
        cols["example_id"].append(r.example_id)
        cols["input_ids"].append(r.input_ids)
        cols["response_start"].append(r.response_start)
        for view, values in (("full", r.full), ("post", r.post)):
            for kind, blob in encode_view(values, enc).items():
                cols[f"{view}_{kind}"].append(blob)
        cols["target_f32" if enc["name"] == "f32" else "target_q"].append(encode_target(r.target, enc))
    table = pa.table(cols, schema=part_schema(enc))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # One row group per part; dictionary encoding only pays for the ids; no statistics on blobs.
    pq.write_table(table, tmp, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False,
                   write_statistics=["response_start"], row_group_size=max(len(rows), 1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"name": path.name, "rows": len(rows), "steps": steps, "bytes": path.stat().st_size, "sha256": sha256_path(path)}


# ----------------------------------------------------------------------------- cache identity

def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def compute_cache_id(identity: dict) -> str:
    """sha256 of the sorted, type-tagged identity inputs plus the format version.

    ``identity`` must hold everything that changes a stored value; a missing piece is a bug, so
    ``None`` values are refused instead of silently hashed.
    """
    def tag(x):
        if x is None:
            raise CacheError("internal: cache identity has a missing value; refusing to make a cache id")
        if isinstance(x, dict):
            return {k: tag(v) for k, v in sorted(x.items())}
        if isinstance(x, (list, tuple)):
            return ["list", [tag(v) for v in x]]
        if isinstance(x, bool):
            return ["bool", x]
        if isinstance(x, int):
            return ["int", x]
        if isinstance(x, float):
            return ["float", repr(x)]
        return [type(x).__name__, str(x)]

    return hashlib.sha256(canonical_json({"format": FORMAT, "identity": tag(identity)})).hexdigest()


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

    @property
    def steps(self) -> int:
        return len(self.input_ids) - self.response_start


def _fs(url: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url))
    return fs, root.rstrip("/")


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CacheError(f"{where}: {msg}")


def check_manifest(m, where: str) -> None:
    """Enforce the manifest rules of the module docstring."""
    _require(isinstance(m, dict), where, "manifest is not a JSON object")
    _require(m.get("format") == FORMAT, where, f"format is {m.get('format')!r}, this reader reads {FORMAT!r}; upgrade pact-cache or rebuild the cache")
    _require(isinstance(m.get("cache_id"), str) and re.fullmatch(r"[0-9a-f]{64}", m["cache_id"]) is not None, where, "cache_id must be 64 hex characters")
    enc = m.get("encoding")
    _require(isinstance(enc, dict) and enc.get("name") in ENCODINGS, where, f"unknown encoding {enc!r}; known: {sorted(ENCODINGS)}")
    if enc["name"] == "q8":
        for key in ("scale", "floor", "top_scale", "target_scale"):
            _require(isinstance(enc.get(key), (int, float)) and enc[key] > 0, where, f"encoding.{key} must be a positive number")
    tokens = m.get("tokens")
    _require(isinstance(tokens, dict) and isinstance(tokens.get("ids"), list) and len(tokens["ids"]) >= 1, where, "tokens.ids must be a non-empty list")
    _require(all(isinstance(i, int) and i >= 0 for i in tokens["ids"]), where, "tokens.ids must be non-negative integers")
    parts = m.get("parts")
    _require(isinstance(parts, list), where, "parts must be a list")
    seen = set()
    for j, p in enumerate(parts):
        _require(isinstance(p, dict), where, f"parts[{j}] is not an object")
        name = p.get("name")
        _require(isinstance(name, str) and _PART_NAME.match(name) is not None and name != MANIFEST, where,
                 f"parts[{j}].name {name!r} is not a plain .parquet file name; the manifest may point outside the cache, refusing it")
        _require(name not in seen, where, f"parts[{j}].name {name!r} is listed twice")
        seen.add(name)
        for key in ("rows", "steps", "bytes"):
            _require(isinstance(p.get(key), int) and p[key] >= 0, where, f"parts[{j}].{key} must be a non-negative integer")
        _require(isinstance(p.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", p["sha256"]) is not None, where, f"parts[{j}].sha256 must be 64 hex characters")
    counts = m.get("counts")
    _require(isinstance(counts, dict), where, "counts must be an object")
    _require(counts.get("rows") == sum(p["rows"] for p in parts), where, "counts.rows differs from the sum of the parts' rows")
    _require(counts.get("response_steps") == sum(p["steps"] for p in parts), where, "counts.response_steps differs from the sum of the parts' steps")


class Cache:
    """A read-only view of a cache. Streams rows part by part; holds one part's row group at most.

    >>> cache = open_cache("cache/")
    >>> for row in cache.iter_rows(): ...
    """

    def __init__(self, url: str, manifest: dict, verify_checksums: bool = True):
        self.url = str(url)
        self.fs, self.root = _fs(url)
        self.manifest = manifest
        self.encoding = manifest["encoding"]
        self.tokens = manifest["tokens"]
        self.ids = list(self.tokens["ids"])
        self.K = len(self.ids)
        self.verify_checksums = verify_checksums
        self._checked: set[str] = set()

    # -- metadata
    @property
    def cache_id(self) -> str:
        return self.manifest["cache_id"]

    @property
    def num_rows(self) -> int:
        return self.manifest["counts"]["rows"]

    @property
    def num_steps(self) -> int:
        return self.manifest["counts"]["response_steps"]

    @property
    def parts(self) -> list[dict]:
        return self.manifest["parts"]

    def __len__(self) -> int:
        return self.num_rows

    def part_path(self, part: dict) -> str:
        return f"{self.root}/{part['name']}"

    # -- integrity
    def check_part(self, part: dict) -> None:
        """Size and sha256 of one part against the manifest (streamed, once per part per Cache)."""
        if part["name"] in self._checked:
            return
        where = f"{self.url}/{part['name']}"
        try:
            size = self.fs.size(self.part_path(part))
        except FileNotFoundError:
            raise CacheError(f"{where}: part listed in the manifest is missing; re-download or rebuild the cache") from None
        _require(size == part["bytes"], where, f"size is {size} bytes, manifest says {part['bytes']}; the part is truncated or replaced, re-download or rebuild it")
        h = hashlib.sha256()
        with self.fs.open(self.part_path(part), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _require(h.hexdigest() == part["sha256"], where, "sha256 differs from the manifest; the part is corrupt or was changed, re-download or rebuild it")
        self._checked.add(part["name"])

    def _check_schema(self, pf, part: dict, where: str) -> None:
        schema = pf.schema_arrow
        want = part_schema(self.encoding)
        for field in want:
            _require(field.name in schema.names, where, f"column {field.name!r} is missing (encoding {self.encoding['name']})")
            _require(schema.field(field.name).type == field.type, where, f"column {field.name!r} has type {schema.field(field.name).type}, expected {field.type}")
        _require(pf.metadata.num_rows == part["rows"], where, f"holds {pf.metadata.num_rows} rows, manifest says {part['rows']}")

    # -- rows
    def iter_part_rows(self, part: dict, batch_rows: int = 64) -> Iterator[CacheRow]:
        import pyarrow.parquet as pq

        where = f"{self.url}/{part['name']}"
        if self.verify_checksums:
            self.check_part(part)
        with self.fs.open(self.part_path(part), "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except Exception as err:
                raise CacheError(f"{where}: not a readable Parquet file ({err}); re-download or rebuild it") from None
            self._check_schema(pf, part, where)
            names = part_schema(self.encoding).names
            row_no = 0
            steps = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=names):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    yield self._decode(data, i, f"{where} row {row_no}")
                    steps += len(data["input_ids"][i]) - data["response_start"][i]
                    row_no += 1
            _require(steps == part["steps"], where, f"holds {steps} response steps, manifest says {part['steps']}")

    def _decode(self, data: dict, i: int, where: str) -> CacheRow:
        ids = data["input_ids"][i]
        rs = data["response_start"][i]
        _require(ids is not None and rs is not None and 1 <= rs < len(ids), where, f"response_start {rs} is outside 1..{len(ids or []) - 1}")
        n, K, enc = len(ids) - rs, self.K, self.encoding
        for name, size in blob_sizes(n, K, enc).items():
            blob = data[name][i]
            _require(blob is not None and len(blob) == size, where, f"{name} has {len(blob or b'')} bytes, expected {size} for {n} steps x K={K}")
        if enc["name"] == "f32":
            full = decode_view({"f32": data["full_f32"][i]}, n, K, enc)
            post = decode_view({"f32": data["post_f32"][i]}, n, K, enc)
            target = decode_target(data["target_f32"][i], n, enc)
        else:
            full = decode_view({"q": data["full_q"][i], "top": data["full_top"][i]}, n, K, enc)
            post = decode_view({"q": data["post_q"][i], "top": data["post_top"][i]}, n, K, enc)
            target = decode_target(data["target_q"][i], n, enc)
        return CacheRow(data["example_id"][i], np.asarray(ids, dtype=np.int64), int(rs), full, post, target)

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

    # -- sizes
    def reference_bytes(self) -> int:
        """Compressed bytes of the reference columns (both views, maxima, target) over all parts."""
        import pyarrow.parquet as pq

        ref_cols = set(blob_sizes(1, 1, self.encoding))
        total = 0
        for part in self.parts:
            with self.fs.open(self.part_path(part), "rb") as f:
                md = pq.ParquetFile(f).metadata
                for rg in range(md.num_row_groups):
                    for c in range(md.num_columns):
                        col = md.row_group(rg).column(c)
                        if col.path_in_schema in ref_cols:
                            total += col.total_compressed_size
        return total


def read_manifest(url: str) -> dict:
    fs, root = _fs(url)
    path = f"{root}/{MANIFEST}"
    if not fs.exists(root):
        raise CacheError(f"{url}: no such cache folder; pass the folder `pact-cache build` wrote (-o)")
    if not fs.exists(path):
        raise CacheError(f"{url}: has no {MANIFEST}; the build did not finish (rerun it with --resume) or this is not a cache")
    try:
        with fs.open(path, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{url}/{MANIFEST}: not valid JSON ({err}); re-download or rebuild the cache") from None
    check_manifest(m, f"{url}/{MANIFEST}")
    return m


def open_cache(url: str | Path, verify_checksums: bool = True) -> Cache:
    """Open a cache for reading. Checks the manifest now and each part's checksum before reading it."""
    return Cache(str(url), read_manifest(str(url)), verify_checksums=verify_checksums)
