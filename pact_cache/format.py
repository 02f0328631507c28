"""The cache format ``pact-cache/2``: the part writer and the streaming reader.

The normative spec (MUST / MAY, every column, the q8 error bound, the version history) is
``docs/format.md``; this module implements it. A cache comes from elsewhere and is untrusted:
:func:`open_cache` and the reader enforce every rule of the spec and raise ``CacheError`` naming
the rule, the file and, where there is one, the row. The reference columns and their codecs are
:mod:`pact_cache.columns`; the manifest is :mod:`pact_cache.manifest`; file and object helpers
(temporary names, atomic writes, sha256, regular-file checks) are :mod:`pact_cache.storage`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .columns import REF_COLUMNS, blob_names, blob_sizes, check_declared, code_blobs, declared_bounds, decode, encode
from .columns import stored as blob_names_of
from .errors import CacheError
from .manifest import (
    ENCODINGS,  # noqa: F401  (re-exported: the encodings are part of the format)
    MANIFEST_MAX_BYTES,
    Encoding,
    Manifest,
    PartEntry,
    check_pin,
)
from .storage import COPY_BLOCK, Location, check_regular_file, sha256_path, sha256_stream, tmp_name
from .typedjson import load_json

ROWS_PER_PART = 1024  # rows per Parquet part by default: the unit of resume, sharding and reuse

MANIFEST = "manifest.json"
ZSTD_LEVEL = 19  # build time is dominated by the model; level 19 buys ~10% over the default
BUILD_KEY_META = b"pact_cache.build_key"
F32_SUM_TOLERANCE = 1e-3  # slack for "K probabilities sum to at most 1" in f32 blobs (float rounding)
LOGPROB_MIN = -1e4  # what -inf (a token the reference masks out) is stored as
# Response steps per Parquet row group: what a reader holds at once (about 1.7 MB of q8 blobs at
# K=50, 6.6 MB of f32). Large enough that short-answer sets keep one group per part: on 512 SST-2
# rows (4.4 steps each), groups of 128 rows cost 6% more bytes than one group of 512.
ROW_GROUP_STEPS = 16384


# ----------------------------------------------------------------------------- rows and row groups


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
    return (
        str(example_id).encode("utf-8")
        + b"\0"
        + np.array([response_start, len(ids)], dtype="<i4").tobytes()
        + ids.tobytes()
    )


# ----------------------------------------------------------------------------- schema + writer


def part_schema(enc: Encoding):
    import pyarrow as pa

    fields = [("example_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("response_start", pa.int32())]
    fields += [(name, pa.binary()) for name in blob_names(enc)]
    return pa.schema(fields)


@dataclass
class RowResult:
    """Everything the builder computed for one example, before encoding: ``ref`` maps each column of
    :data:`pact_cache.columns.REF_COLUMNS` to its float32 values, ``(n, K)`` or ``(n,)``."""

    example_id: str
    input_ids: list[int]
    response_start: int
    ref: dict


def write_part(path: Path, rows: list[RowResult], enc: Encoding, build_key: str = "") -> PartEntry:
    """Encode rows and write one Parquet part atomically; returns its manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {name: [] for name in part_schema(enc).names}
    steps = 0
    for r in rows:
        n = len(r.input_ids) - r.response_start
        K = r.ref["full"].shape[1]
        for col in REF_COLUMNS:
            values = r.ref[col.name]
            if values.shape != col.shape(n, K):
                raise CacheError(f"internal: row {r.example_id} has {col.name} of shape {values.shape} for {n} steps")
            if np.isnan(values).any() or (values > 0).any():
                raise CacheError(
                    f"{path.name}: the reference gave a log-prob that is NaN or positive ({col.name} view "
                    f"of {r.example_id}); "
                    "the reference model's weights or --dtype overflow: try --dtype fp32"
                )
        steps += n
        cols["example_id"].append(r.example_id)
        cols["input_ids"].append(r.input_ids)
        cols["response_start"].append(r.response_start)
        for col in REF_COLUMNS:
            # a token the reference masks out has log-prob -inf: stored as LOGPROB_MIN, which softmax treats alike
            for name, blob in encode(col, np.maximum(r.ref[col.name], LOGPROB_MIN), enc).items():
                cols[name].append(blob)
    schema = part_schema(enc).with_metadata({BUILD_KEY_META: build_key.encode()})
    table = pa.table(cols, schema=schema)
    tmp = tmp_name(path)
    try:
        # Row groups of at most ROW_GROUP_STEPS steps: a reader holds one at a time, whatever the part's
        # size. Dictionary encoding only pays for the ids; no statistics on blobs.
        with pq.ParquetWriter(
            tmp,
            schema,
            compression="zstd",
            compression_level=ZSTD_LEVEL,
            use_dictionary=False,
            write_statistics=["response_start"],
        ) as writer:
            for a, b in row_groups([len(r.input_ids) - r.response_start for r in rows]):
                writer.write_table(table.slice(a, b - a), row_group_size=max(b - a, 1))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return PartEntry(
        path.name,
        len(rows),
        steps,
        path.stat().st_size,
        sha256_path(path),
        rows_digest((r.example_id, r.input_ids, r.response_start) for r in rows),
    )


# ----------------------------------------------------------------------------- reader


@dataclass
class CacheRow:
    """One decoded example. ``ref`` maps each column of :data:`pact_cache.columns.REF_COLUMNS` to its
    float32 values: ``ref["full"][t, k]`` is log p_ref(S[k] | input_ids[:rs+t]), ``ref["target"][t]``
    the log-prob of the response token."""

    example_id: str
    input_ids: np.ndarray  # (L,) int64
    response_start: int
    ref: dict = field(default_factory=dict)  # name -> (n, K) or (n,) float32
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
        _require(
            n == part.bytes and digest == part.sha256,
            where,
            "sha256 differs from the manifest; the part is corrupt or was changed, re-download or rebuild it",
        )
        with self.fs.open(self.part_path(part), "rb") as f:  # what its footer declares, before anything is decompressed
            self._parquet(f, part, where)
        self._checked.add(part.name)

    def _parquet(self, f, part: PartEntry, where: str):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise CacheError(
                f"{where}: not a readable Parquet file ({type(err).__name__}: {str(err)[:120]}); "
                f"re-download or rebuild it"
            ) from None
        for want in part_schema(self.encoding):
            _require(
                want.name in schema.names, where, f"column {want.name!r} is missing (encoding {self.encoding.name})"
            )
            _require(
                schema.field(want.name).type == want.type,
                where,
                f"column {want.name!r} has type {schema.field(want.name).type}, expected {want.type}",
            )
        _require(
            pf.metadata.num_rows == part.rows, where, f"holds {pf.metadata.num_rows} rows, manifest says {part.rows}"
        )
        check_declared(
            pf.metadata,
            where,
            declared_bounds(
                part.rows,
                part.steps,
                self.K,
                self.encoding,
                self.manifest.build.max_length,
                self.manifest.counts.input_tokens,
            ),
        )
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
        _require(
            len(data) == sf.bytes and hashlib.sha256(data).hexdigest() == sf.sha256,
            where,
            "sha256 differs from the manifest; the score file is corrupt or was changed, re-download it or score "
            "the cache again",
        )
        try:
            md = pq.ParquetFile(pa.BufferReader(data)).metadata
        except Exception as err:
            raise CacheError(
                f"{where}: not a readable Parquet file ({type(err).__name__}: {str(err)[:120]}); score the cache again"
            ) from None
        check_declared(md, where, {"example_id": part.rows * (4 + 256), "score": 4 * part.steps + part.rows * 4})
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as err:
            raise CacheError(
                f"{where}: not a readable Parquet file ({type(err).__name__}: {str(err)[:120]}); score the cache again"
            ) from None
        for name, typ in (("example_id", pa.string()), ("score", pa.binary())):
            _require(
                name in table.column_names and table.schema.field(name).type == typ,
                where,
                f"column {name!r} ({typ}) is missing",
            )
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
        _require(
            found["rows_sha256"] == part.rows_sha256,
            self._where(part),
            "its rows (example ids, input ids, response starts) differ from the manifest's rows_sha256; "
            "the part was replaced: re-download or rebuild the cache",
        )

    def _check_before_reading(self, part: PartEntry) -> None:
        """A part's checksum (or, without checksums, that it is a regular file of its declared size)."""
        if self.verify_checksums:
            self.check_part(part)
        else:
            check_regular_file(self.fs, self.root, self.part_path(part), self._where(part), size=part.bytes)

    def longest_row(self) -> tuple[int, int]:
        """``(tokens, response steps)`` of the cache's longest row and of its longest response, from the
        ``input_ids`` lengths and ``response_start`` columns alone (nothing decoded); each part checked as
        :meth:`scan_part` checks it before it is read. What a run's memory estimate sizes its worst
        micro-batch with (:mod:`pact_cache.memory`)."""
        import pyarrow.compute as pc

        longest = steps = 0
        for part in self.parts:
            where = self._where(part)
            self._check_before_reading(part)
            with self.fs.open(self.part_path(part), "rb") as f:
                pf = self._parquet(f, part, where)
                try:
                    t = pf.read(columns=["input_ids", "response_start"])
                    lengths = pc.list_value_length(t.column("input_ids"))
                    resp = pc.subtract(lengths.cast("int64"), t.column("response_start").cast("int64"))
                except Exception as err:
                    raise CacheError(
                        f"{where}: cannot be decoded ({type(err).__name__}: {str(err)[:120]}); re-download or "
                        "rebuild it"
                    ) from None
                longest = max(longest, int(pc.max(lengths).as_py() or 0))
                steps = max(steps, int(pc.max(resp).as_py() or 0))
        return longest, steps

    def scan_part(self, part: PartEntry, found: dict, batch_rows: int = 64) -> Iterator[CacheRow]:
        """Every check of :meth:`iter_part_rows` but the rows digest, which is left in ``found``."""
        where = self._where(part)
        self._check_before_reading(part)
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
                            _require(
                                score_ids[row_no] == row.example_id and len(scores[row_no]) == row.steps,
                                f"{where} row {row_no}",
                                f"its score file row is {score_ids[row_no]!r} with {len(scores[row_no])} scores, "
                                f"not this row's "
                                f"{row.steps}; the scores belong to another cache, score it again",
                            )
                            row.score = scores[row_no]
                        digest.update(_row_bytes(row.example_id, row.input_ids, row.response_start))
                        steps += row.steps
                        row_no += 1
                        yield row
            except CacheError:
                raise
            except Exception as err:  # a damaged page inside a file whose checksum was not checked
                raise CacheError(
                    f"{where}: cannot be decoded ({type(err).__name__}: {str(err)[:120]}); re-download or rebuild it"
                ) from None
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
                for col in REF_COLUMNS:
                    v = np.frombuffer(b"".join(data[f"{col.name}_f32"]), dtype="<f4")
                    if not (np.isfinite(v).all() and (v <= 0).all()):
                        return False
                    if col.per_step == "K" and (
                        v.size % self.K or (np.exp(v).reshape(-1, self.K).sum(axis=1) > 1.0 + F32_SUM_TOLERANCE).any()
                    ):
                        return False
            else:
                for name in code_blobs(self.encoding):
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
        _require(
            ids_arr.ndim == 1 and len(ids_arr) >= 2,
            where,
            "input_ids must hold at least a prompt token and a response token",
        )
        if check_values:
            lo, hi = int(ids_arr.min()), int(ids_arr.max())
            _require(
                lo >= 0 and hi < self.vocab_size,
                where,
                f"input_ids reach {lo if lo < 0 else hi}, outside the vocabulary [0, {self.vocab_size})",
            )
        _require(
            rs is not None and 1 <= rs < len(ids_arr), where, f"response_start {rs} is outside 1..{len(ids_arr) - 1}"
        )
        n, K, enc = len(ids_arr) - rs, self.K, self.encoding
        for name, size in blob_sizes(n, K, enc).items():
            blob = data[name][i]
            _require(
                blob is not None and len(blob) == size,
                where,
                f"{name} has {len(blob or b'')} bytes, expected {size} for {n} steps x K={K}",
            )
        for name in code_blobs(enc) if check_values else ():
            code = np.frombuffer(data[name][i], dtype=np.uint8)
            _require(
                int(code.max()) <= enc.max_code,
                where,
                f"{name} holds code {int(code.max())}, above "
                f"{enc.max_code}, which the q8 encoder never writes; the "
                f"cache is damaged, rebuild it",
            )
        ref = {
            col.name: decode(col, {b: data[b][i] for b in blob_names_of(col, enc)}, n, K, enc) for col in REF_COLUMNS
        }
        if enc.name == "f32" and check_values:
            for col in REF_COLUMNS:
                v, name = ref[col.name], f"{col.name}_f32"
                _require(
                    bool(np.isfinite(v).all()),
                    where,
                    f"{name} holds a non-finite value (NaN or infinity); the cache is damaged, rebuild it",
                )
                _require(
                    bool((v <= 0).all()),
                    where,
                    f"{name} holds a positive log-probability ({float(v.max()):g}); the cache is damaged, rebuild it",
                )
                if col.per_step == "K":
                    mass = np.exp(v).sum(axis=1)  # v <= 0 (checked above), so no overflow
                    _require(
                        bool((mass <= 1.0 + F32_SUM_TOLERANCE).all()),
                        where,
                        f"{name}: the K probabilities of a "
                        f"step sum to {float(mass.max()):.4f} > 1; the cache is damaged, rebuild it",
                    )
        return CacheRow(eid, ids_arr, int(rs), ref)

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
        return pa.schema(
            [("example_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("response_start", pa.int32())]
            + [(c.decoded, pa.list_(step if c.per_step == "K" else pa.float32())) for c in REF_COLUMNS],
            metadata={
                b"pact_cache.cache_id": self.cache_id.encode(),
                b"pact_cache.token_ids": json.dumps(self.ids).encode(),
            },
        )

    def iter_arrow_batches(self, batch_rows: int = 256):
        """Arrow record batches of decoded rows, in cache order, one column per reference column under
        its decoded name: ``full_logprobs`` and ``post_logprobs`` are ``list<fixed_size_list<float32, K>>``
        (steps x S in the order of ``cache.ids``), ``target_logprob`` is ``list<float32>``. Memory:
        ``batch_rows`` rows."""
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

        def per_step(col, views):
            offsets = np.cumsum([0] + [v.shape[0] for v in views]).astype(np.int32)
            flat = pa.array(np.concatenate([v.reshape(-1) for v in views]).astype(np.float32))
            values = pa.FixedSizeListArray.from_arrays(flat, self.K) if col.per_step == "K" else flat
            return pa.ListArray.from_arrays(pa.array(offsets), values)

        cols = [
            pa.array([r.example_id for r in rows], pa.string()),
            pa.array([r.input_ids.astype(np.int32) for r in rows], pa.list_(pa.int32())),
            pa.array([r.response_start for r in rows], pa.int32()),
        ]
        cols += [per_step(c, [r.ref[c.name] for r in rows]) for c in REF_COLUMNS]
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
        ref_cols = set(blob_names(self.encoding))
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
        raise CacheError(
            f"{url}: has no {MANIFEST}; the build did not finish (rerun it with --resume) or this is not a cache"
        )
    check_regular_file(fs, root, path, where, max_size=MANIFEST_MAX_BYTES)
    obj = load_json(
        loc.read_bytes(MANIFEST, MANIFEST_MAX_BYTES),
        where,
        CacheError,
        "manifest",
        fix="the manifest is damaged or was edited: re-download or rebuild the cache",
    )
    return Manifest.parse(obj, where)


def open_cache(
    url: str | Path | Location,
    verify_checksums: bool = True,
    cache_id: str | None = None,
    storage_options: dict | None = None,
) -> Cache:
    """Open a cache (a folder or any fsspec URL) for reading. Checks the manifest and its content id
    now (and the pinned ``cache_id``, if given), and each part's type, size, sha256 and rows before
    using its rows. ``storage_options`` go to the filesystem (endpoint, credentials)."""
    loc = Location.of(url, storage_options)
    manifest = read_manifest(loc)
    check_pin(manifest.cache_id, cache_id, loc.display)
    return Cache(loc, manifest, verify_checksums=verify_checksums)


def copy_part(cache, part, dst: Location, scratch, bar=None) -> None:
    """Stream one file of ``cache`` listed in its manifest (a part, or a score file: anything with
    ``name``, ``bytes`` and ``sha256``) into a local scratch file, hashing it, and publish it at
    ``dst`` only when its sha256 is the manifest's."""
    check_regular_file(cache.fs, cache.root, cache.part_path(part), cache._where(part), size=part.bytes)
    h = hashlib.sha256()
    local = scratch / part.name
    with cache.fs.open(cache.part_path(part), "rb") as fin, open(local, "wb") as fout:
        left = part.bytes
        while left > 0:
            block = fin.read(min(COPY_BLOCK, left))
            if not block:
                break
            h.update(block)
            fout.write(block)
            left -= len(block)
            if bar is not None:
                bar.update(len(block))
    if left != 0 or h.hexdigest() != part.sha256:
        raise CacheError(
            f"{cache._where(part)}: sha256 differs from the manifest while copying; the source is corrupt "
            f"or "
            "changed: nothing of it was published, re-download or rebuild the source"
        )
    dst.put_file(local, part.name)
