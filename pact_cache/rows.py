"""What is computed from a cache's rows, below the commands that use it: the key that makes two rows the same
computation (:func:`row_key`) and the index of earlier caches' rows by it (:class:`Reuse`, ``build --reuse``,
``merge``, ``diff``); the reference's step-0 refusal mass (:func:`step0_refusal_mass`: ``filter``, ``stats``, row
gates); TOSS's token mask over a scored cache (:class:`TokenMask`: ``pact-train --token-mask``); right-padding a
batch of token-id rows (:func:`right_pad`: the build, the trainer's batches, the online reference)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .data import Example
from .errors import CacheError, PactError
from .format import Cache, CacheRow, open_cache
from .manifest import Identity


def right_pad(rows, pad_id: int = 0, multiple: int = 1, device=None):
    """Token-id rows (lists, numpy arrays or 1-D tensors) -> ``(input_ids (B, L) long, attention_mask (B, L) long)``,
    right-padded with ``pad_id`` to the longest row rounded up to ``multiple``; on ``device`` (default: the rows'
    own when they are tensors, else the CPU)."""
    import torch

    rows = [r if torch.is_tensor(r) else torch.as_tensor(np.asarray(r, dtype=np.int64)) for r in rows]
    device = device if device is not None else rows[0].device
    B, L = len(rows), max(len(r) for r in rows)
    L = -(-L // multiple) * multiple
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    return ids, mask


def row_key(input_ids, response_start: int) -> bytes:
    """What makes two rows' reference values the same computation: the tokens and the response start."""
    import numpy as np

    return hashlib.sha256(np.array([response_start], "<i4").tobytes() + np.asarray(input_ids, "<i4").tobytes()).digest()


class Reuse:
    """Rows of earlier caches, found by their tokenised input, for ``build --reuse``.

    Each old cache is opened with every check, and must have been built with the same reference
    weights, tokenizer, tokens, encoding, max length, dtype and algorithm (its reuse key); batch size,
    part size and device may differ. The index holds 32 bytes per old row; values are read part by
    part, when a new part needs them.
    """

    def __init__(self, caches: list[Cache]):
        import pyarrow.parquet as pq

        self.caches = caches
        self.index: dict[bytes, tuple[int, int, int]] = {}
        for c, cache in enumerate(caches):
            for p, part in enumerate(cache.parts):
                cache.check_part(part)
                with cache.fs.open(cache.part_path(part), "rb") as f:
                    t = pq.ParquetFile(f).read(columns=["input_ids", "response_start"])
                for r, (ids, rs) in enumerate(
                    zip(t.column("input_ids").to_pylist(), t.column("response_start").to_pylist())
                ):
                    self.index.setdefault(row_key(ids, rs), (c, p, r))

    @classmethod
    def open(cls, urls: list, identity: Identity, storage_options: dict) -> "Reuse":
        caches = []
        want = identity.reuse_key()
        for url in urls:
            cache = open_cache(url, storage_options=storage_options)
            if cache.manifest.identity.reuse_key() != want:
                raise PactError(
                    f"--reuse {cache.url}: that cache was built with another reference, tokenizer, safety "
                    f"tokens, encoding, "
                    "max length, dtype or --quantize, so its rows are not this build's rows; reuse a cache built "
                    "like this one"
                )
            caches.append(cache)
        return cls(caches)

    def find(self, ex: Example) -> tuple[int, int, int] | None:
        return self.index.get(row_key(ex.input_ids, ex.response_start))

    def fetch(self, wanted: dict[int, tuple[int, int, int]]) -> dict[int, CacheRow]:
        """``{new position: (cache, part, row)}`` -> ``{new position: decoded old row}``."""
        by_part: dict[tuple[int, int], dict[int, list[int]]] = {}
        for j, (c, p, r) in wanted.items():
            by_part.setdefault((c, p), {}).setdefault(r, []).append(j)
        out: dict[int, CacheRow] = {}
        for (c, p), rows in sorted(by_part.items()):
            cache = self.caches[c]
            for r, row in enumerate(cache.iter_part_rows(cache.parts[p])):
                for j in rows.get(r, ()):
                    out[j] = row
        return out


def step0_refusal_mass(row, keep: np.ndarray) -> float:
    """The reference's probability mass on the safety tokens with positive weight (``keep``, (K,)
    bool) before the row's first response token: high when the prompt looks harmful to it."""
    return float(np.exp(row.ref["full"][0].astype(np.float64)[keep]).sum())


@dataclass(frozen=True)
class TokenMask:
    """TOSS's global selection: the ``dropped`` highest-scoring tokens of the whole cache are left out.

    ``threshold`` is the score of the last dropped token; every token scoring above it is dropped,
    and of the tokens scoring exactly ``threshold`` the first ``ties[example_id]`` of each listed row
    (cache order, then step order) are, so that exactly ``dropped`` tokens go whatever the ties."""

    fraction: float
    total: int
    dropped: int
    threshold: float
    ties: dict

    def keep(self, example_id: str, score: np.ndarray) -> np.ndarray:
        """bool ``(n,)``: True where the token stays in the loss."""
        keep = score < self.threshold if self.dropped else np.ones(len(score), dtype=bool)
        if self.dropped:
            at = np.flatnonzero(score == self.threshold)
            keep[at[self.ties.get(example_id, 0) :]] = True
        return keep


def token_mask(rows, fraction: float) -> TokenMask:
    """The global top-``fraction`` selection over ``rows``, an iterable of ``(example_id, scores)`` in
    cache order: ``round(fraction * total)`` tokens with the highest scores, ties at the boundary
    taken in cache order."""
    if not 0.0 <= fraction < 1.0:
        raise PactError(f"--token-mask {fraction}: the fraction of tokens to leave out must be in [0, 1)")
    rows = [(eid, np.asarray(s, dtype=np.float32)) for eid, s in rows]
    allv = np.concatenate([s for _, s in rows]) if rows else np.zeros(0, np.float32)
    total = int(allv.size)
    dropped = int(round(fraction * total))
    if dropped == 0:
        return TokenMask(fraction, total, 0, float("inf"), {})
    threshold = float(np.partition(allv, total - dropped)[total - dropped])  # the dropped-th largest
    quota = dropped - int((allv > threshold).sum())
    ties = {}
    for eid, s in rows:
        if quota <= 0:
            break
        n = min(int((s == threshold).sum()), quota)
        if n:
            ties[eid] = n
            quota -= n
    return TokenMask(fraction, total, dropped, threshold, ties)


def cache_token_mask(cache: Cache, fraction: float) -> TokenMask:
    """:func:`token_mask` over a scored cache, reading its score files only."""
    if cache.manifest.scores is None:
        raise CacheError(
            f"{cache.url}: has no token scores for --token-mask; add them with "
            "`pact-cache score CACHE --degraded M1 --utility M2 -o SCORED` and train from SCORED"
        )
    rows = []
    for part in cache.parts:
        ids, scores = cache.read_part_scores(part)
        rows.extend(zip(ids, scores))
    return token_mask(rows, fraction)
