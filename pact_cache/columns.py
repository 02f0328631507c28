"""The cache's reference columns, and the codecs that store them (``q8``, ``f32``).

One table, :data:`REF_COLUMNS`, says what the reference gives per response step; everything else
is derived from it: the Parquet schema of a part and each blob's exact size (:mod:`pact_cache.format`),
encoding in the builder, decoding and value checks in the reader, ``CacheRow.ref`` and
``Batch.ref`` (keyed by the column's name), the Trainer collator's ``pact_<name>`` keys, and the
decoded Arrow/Polars views. A method (:mod:`pact_train.losses`) asks for columns by name.

Adding a column is one row here plus its producer (what the build computes, ``RowResult.ref``) and
its consumer (the method that reads ``Steps.ref[name]``); a stored column is a format change
(docs/format.md): new caches get a new format version.

Stored names are ``<name>_<suffix>``, as pact-cache/2 defines them (docs/format.md):

* ``f32``: ``<name>_f32``, float32 ``[n, width]``.
* ``q8``, a K-wide column: ``<name>_top`` uint16 ``[n]`` = ``round(-max_s v * top_scale)`` and
  ``<name>_q`` uint8 ``[n, K]`` = ``round(scale * log1p(min(top - v, floor)))``; decoded
  ``v = top - expm1(code / scale)``. A 1-wide column: ``<name>_q`` uint16 ``[n]`` =
  ``round(-v * target_scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CacheError
from .manifest import Encoding


@dataclass(frozen=True)
class Column:
    name: str  # the one name in memory: RowResult.ref, CacheRow.ref, Batch.ref, Steps.ref, collator key pact_<name>
    per_step: str  # "K": a value per safety token at each step; "1": one value per step
    decoded: str  # its name in the decoded Arrow / Polars views (Cache.to_arrow)
    meaning: str

    def width(self, K: int) -> int:
        return K if self.per_step == "K" else 1

    def shape(self, n: int, K: int) -> tuple[int, ...]:
        return (n, K) if self.per_step == "K" else (n,)


REF_COLUMNS: tuple[Column, ...] = (
    Column("full", "K", "full_logprobs", "log p_ref(s | input_ids[:rs+t]) for s in S (the full context)"),
    Column(
        "post", "K", "post_logprobs", "log p_ref(s | assistant header + response[:t]) for s in S (the prompt-free view)"
    ),
    Column(
        "target", "1", "target_logprob", "log p_ref(input_ids[rs+t] | input_ids[:rs+t]) (the response token itself)"
    ),
)
COLUMN_NAMES = tuple(c.name for c in REF_COLUMNS)


def stored(col: Column, enc: Encoding) -> dict[str, tuple[str, int | str]]:
    """The stored blob columns of ``col`` under ``enc``: ``{stored name: (little-endian numpy dtype,
    values per step: an int or "K")}``, in schema order."""
    if enc.name == "f32":
        return {f"{col.name}_f32": ("<f4", col.per_step if col.per_step == "K" else 1)}
    if col.per_step == "K":
        return {f"{col.name}_q": ("u1", "K"), f"{col.name}_top": ("<u2", 1)}
    return {f"{col.name}_q": ("<u2", 1)}


def blob_names(enc: Encoding) -> list[str]:
    """Every stored blob column, in schema order."""
    return [name for col in REF_COLUMNS for name in stored(col, enc)]


def blob_sizes(n: int, K: int, enc: Encoding) -> dict[str, int]:
    """Exact byte length of each blob column for a row with ``n`` steps."""
    out = {}
    for col in REF_COLUMNS:
        for name, (dtype, per) in stored(col, enc).items():
            out[name] = n * (K if per == "K" else per) * np.dtype(dtype).itemsize
    return out


def q8_bound(d: np.ndarray, enc: Encoding) -> np.ndarray:
    """Largest |decoded - true| allowed for values ``d`` nats below the step maximum (d <= floor)."""
    return (1.0 + d + 2.0**-10) * np.expm1(0.5 / enc.scale) + 2.0**-10


def encode(col: Column, v: np.ndarray, enc: Encoding) -> dict[str, bytes]:
    """Encode float32 log-probs of shape ``col.shape(n, K)`` into ``col``'s stored blobs."""
    v = np.asarray(v, dtype=np.float32)
    if enc.name == "f32":
        return {f"{col.name}_f32": v.astype("<f4").tobytes()}
    if col.per_step != "K":
        return {
            f"{col.name}_q": np.clip(np.round(-v.astype(np.float64) * enc.target_scale), 0, 65535)
            .astype("<u2")
            .tobytes()
        }
    top_q = np.clip(np.round(-v.max(axis=1).astype(np.float64) * enc.top_scale), 0, 65535).astype("<u2")
    top = -(top_q.astype(np.float64) / enc.top_scale)
    d = np.clip(top[:, None] - v.astype(np.float64), 0.0, enc.floor)
    code = np.round(enc.scale * np.log1p(d)).astype(np.uint8)
    return {f"{col.name}_q": code.tobytes(), f"{col.name}_top": top_q.tobytes()}


def decode(col: Column, blobs: dict[str, bytes], n: int, K: int, enc: Encoding) -> np.ndarray:
    """Inverse of :func:`encode`: ``blobs`` maps ``col``'s stored names to bytes; float32 ``col.shape(n, K)``."""
    if enc.name == "f32":
        return np.frombuffer(blobs[f"{col.name}_f32"], dtype="<f4").reshape(col.shape(n, K)).astype(np.float32)
    if col.per_step != "K":
        return (-(np.frombuffer(blobs[f"{col.name}_q"], dtype="<u2").astype(np.float64) / enc.target_scale)).astype(
            np.float32
        )
    top = -(np.frombuffer(blobs[f"{col.name}_top"], dtype="<u2").astype(np.float64) / enc.top_scale)
    code = np.frombuffer(blobs[f"{col.name}_q"], dtype=np.uint8).reshape(n, K)
    return (top[:, None] - np.expm1(code / enc.scale)).astype(np.float32)


def code_blobs(enc: Encoding) -> list[str]:
    """The stored q8 code blobs whose values are bounded by ``enc.max_code`` (K-wide columns' ``_q``)."""
    return [f"{c.name}_q" for c in REF_COLUMNS if c.per_step == "K"] if enc.name == "q8" else []


# ------------------------------------------------------------------- declared sizes (bounded work on hostile files)

DECLARED_SLACK = 1 << 16  # bytes per row group beside the payload: page headers, levels, statistics


def declared_bounds(rows: int, steps: int, K: int, enc: Encoding, max_length: int | None, input_tokens: int) -> dict:
    """The most each column of a part of ``rows`` rows and ``steps`` response steps can hold once
    decompressed (Parquet's PLAIN encoding: 4 length bytes per value), by column name."""
    tokens = rows * max_length if max_length else input_tokens
    bounds = {
        "example_id": rows * (4 + 256),
        "input_ids": 4 * min(tokens, input_tokens) + rows * 8,
        "response_start": rows * 4,
    }
    bounds.update({name: size + rows * 4 for name, size in blob_sizes(steps, K, enc).items()})
    return bounds


def check_declared(md, where: str, bounds: dict) -> None:
    """What a Parquet file's footer declares its columns decompress to, summed over its row
    groups, against ``bounds`` (what the manifest's rows and steps can hold): checked before
    anything is decompressed, so a small file that would inflate to gigabytes costs nothing."""
    totals: dict = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            name = col.path_in_schema.split(".")[0]
            totals[name] = totals.get(name, 0) + max(int(col.total_uncompressed_size), 0)
    slack = DECLARED_SLACK * max(md.num_row_groups, 1)
    for name, total in totals.items():
        limit = bounds.get(name, 0) + slack
        if total > limit:
            raise CacheError(
                f"{where}: column {name!r} declares {total:,} bytes once decompressed, more than the "
                f"manifest's "
                f"rows and steps can hold ({limit:,}); refused before decompressing: the file is not what "
                f"the "
                "manifest says, re-download or rebuild it"
            )
