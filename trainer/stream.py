"""Batches from a cache, streamed: memory is bounded by the shuffle buffer, not the cache size.

Order is a pure function of (seed, epoch): parts are visited in a seeded permutation and rows go
through a bounded shuffle buffer. A position ``(epoch, rows taken in that epoch)`` is enough to
resume exactly: the same order is replayed and the rows already taken are skipped.
``shuffle=False`` yields rows in cache order, batch after batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Iterator

import numpy as np
import torch

from pact_cache.columns import REF_COLUMNS
from pact_cache.errors import PactError
from pact_cache.format import Cache, CacheRow


@dataclass
class Batch:
    """A training batch. B rows, L = longest sequence, T = most response steps, K safety tokens."""

    input_ids: torch.Tensor  # (B, L) long, right-padded
    attention_mask: torch.Tensor  # (B, L) long
    response_start: torch.Tensor  # (B,) long
    step_mask: torch.Tensor  # (B, T) bool, True at real response steps
    targets: torch.Tensor  # (B, T) long, the response tokens (0 where masked)
    ref: dict  # name -> the cached reference column (pact_cache.columns.REF_COLUMNS): (B, T, K) or (B, T) float32
    example_ids: list[str]
    loss_mask: torch.Tensor | None = None  # (B, T) bool: steps whose token stays in the CE (--token-mask); None: all
    row_gate: torch.Tensor | None = None  # (B,) float32 in [0, 1]: how much of the method's term each row gets (--row-gate, --replay); None: all
    ce_weight: torch.Tensor | None = None  # (B,) float32: how much of the cross-entropy each row gets (--replay-term term: 0); None: all

    def reference(self, columns) -> dict:
        """The cached reference columns a method reads, by name."""
        return {c: self.ref[c] for c in columns}

    @property
    def num_tokens(self) -> int:
        return int(self.step_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(*(x.to(device) for x in (self.input_ids, self.attention_mask, self.response_start, self.step_mask, self.targets)),
                     {k: v.to(device) for k, v in self.ref.items()}, self.example_ids,
                     *(None if x is None else x.to(device) for x in (self.loss_mask, self.row_gate, self.ce_weight)))


def pad_id_for(tok) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token (many chat
    tokenizers have no pad token), else 0. Padding is masked out of attention and loss, so any id of
    the vocabulary gives the same result."""
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(tok.eos_token_id) if tok.eos_token_id is not None else 0


def collate(rows: list[CacheRow], pad_id: int, pad_to_multiple: int = 1, token_mask=None, row_gate=None,
            replay_term: str = "both") -> Batch:
    """Right-padded batch. ``pad_to_multiple`` rounds the sequence length up (8 on CUDA: fewer
    distinct shapes for the GPU libraries to plan for, and tensor-core-friendly sizes).
    ``token_mask`` (a :class:`pact_cache.score.TokenMask`) sets ``loss_mask`` from the rows' scores;
    ``row_gate`` (a :class:`RowGate`) sets ``row_gate`` from the rows' cached values. Rows of a
    replay cache (:class:`ReplayRow`) get the terms ``replay_term`` names (:data:`REPLAY_TERMS`)
    and no gate; with none among the rows, nothing changes."""
    B, K = len(rows), rows[0].ref["full"].shape[1]
    L, T = max(len(r.input_ids) for r in rows), max(r.steps for r in rows)
    L = -(-L // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    targets = torch.zeros((B, T), dtype=torch.long)
    ref = {c.name: torch.zeros((B, *c.shape(T, K))) for c in REF_COLUMNS}  # (B, T, K) or (B, T)
    steps = torch.tensor([r.steps for r in rows])
    for i, r in enumerate(rows):
        n = r.steps
        input_ids[i, : len(r.input_ids)] = torch.from_numpy(r.input_ids)
        attention[i, : len(r.input_ids)] = 1
        targets[i, :n] = torch.from_numpy(r.input_ids[r.response_start:])
        for name, values in ref.items():
            values[i, :n] = torch.from_numpy(r.ref[name])
    step_mask = torch.arange(T)[None, :] < steps[:, None]
    rs = torch.tensor([r.response_start for r in rows])
    loss_mask = None
    if token_mask is not None:
        loss_mask = torch.zeros((B, T), dtype=torch.bool)
        for i, r in enumerate(rows):
            if isinstance(r, ReplayRow):  # unscored: every token of a replay row stays
                loss_mask[i, : r.steps] = True
            else:
                loss_mask[i, : r.steps] = torch.from_numpy(token_mask.keep(r.example_id, r.score))
    replayed = [isinstance(r, ReplayRow) for r in rows]
    gates = ce = None
    if row_gate is not None or any(replayed):
        gates = torch.tensor([REPLAY_TERMS[replay_term][1] if rep else (1.0 if row_gate is None else row_gate(r))
                              for r, rep in zip(rows, replayed)], dtype=torch.float32)
    if any(replayed) and REPLAY_TERMS[replay_term][0] != 1.0:
        ce = torch.tensor([REPLAY_TERMS[replay_term][0] if rep else 1.0 for rep in replayed], dtype=torch.float32)
    return Batch(input_ids, attention, rs, step_mask, targets, ref, [r.example_id for r in rows], loss_mask, gates, ce)


# what a replay row contributes: (weight of its cross-entropy, weight of the method's term)
REPLAY_TERMS = {"both": (1.0, 1.0), "ce": (1.0, 0.0), "term": (0.0, 1.0)}


@dataclass
class ReplayRow(CacheRow):
    """A row of the replay cache (``pact-train --replay``) in the fine-tuning stream: a cache row
    whose type says where it came from, so that the collator gives it the replay's terms."""

    @classmethod
    def of(cls, row: CacheRow) -> "ReplayRow":
        return cls(**{f.name: getattr(row, f.name) for f in fields(CacheRow)})


@dataclass(frozen=True)
class Replay:
    """Rows of a second cache mixed into the fine-tuning stream (``pact-train --replay CACHE
    --replay-ratio R``): typically harmful prompts with the reference's own refusals, built by
    ``pact-cache build`` with the same reference and safety tokens.

    The mix is a pure function of the position in the fine-tuning cache, so a resumed run (and every
    rank) gets the same rows: after ``g`` rows of the fine-tuning cache (over all epochs), ``count(g)
    = floor(g * R / (1 - R))`` replay rows have been taken, so a share R of the mixed stream is
    replay; they are added to the batch in which they fall due (a batch of B rows gets about
    ``B * R / (1 - R)`` more). The replay cache is cycled in its own seeded order, a new one each
    time round."""

    cache: Cache
    ratio: float  # in [0, 1): the share of the mixed stream's rows that come from the replay cache
    seed: int
    buffer_rows: int = 1024

    @classmethod
    def of(cls, main: Cache, cache: Cache, ratio: float, seed: int, buffer_rows: int = 1024, where: str = "--replay") -> "Replay":
        """The replay of ``cache`` beside the fine-tuning cache ``main``: refused (:class:`PactError`,
        one line) unless both hold the same reference's values for the same safety tokens and
        tokenizer, and the replay cache has rows."""
        a, b = main.manifest, cache.manifest
        if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
            raise PactError(f"{where} ratio {ratio}: must be a share of the rows in [0, 1)")
        differs = [what for what, x, y in (
            ("another reference model", a.reference.weights_sha256, b.reference.weights_sha256),
            ("another tokenizer", a.tokenizer.sha256, b.tokenizer.sha256),
            ("other safety tokens", (a.tokens.ids, a.tokens.weights), (b.tokens.ids, b.tokens.weights))) if x != y]
        if differs:
            raise PactError(f"{where} {cache.url}: was built with {differs[0]} than the fine-tuning cache; build it with the "
                            "same --ref and --tokens as the fine-tuning cache")
        if cache.num_rows == 0:
            raise PactError(f"{where} {cache.url}: the cache holds no rows; build it from harmful prompts with refusals")
        return cls(cache, float(ratio), seed, buffer_rows)

    def count(self, main_rows: int) -> int:
        r = Fraction(self.ratio).limit_denominator(10**6)
        return int(main_rows * r / (1 - r))

    def rows(self, start: int) -> Iterator[ReplayRow]:
        """Replay rows from position ``start`` of the cycled replay stream on."""
        n = self.cache.num_rows
        if n == 0:
            return
        rnd, skip = divmod(start, n)
        while True:
            for i, row in enumerate(epoch_rows(self.cache, rnd, self.seed, True, self.buffer_rows, stream=1)):
                if i >= skip:
                    yield ReplayRow.of(row)
            rnd, skip = rnd + 1, 0


@dataclass(frozen=True)
class RowGate:
    """A per-row gate g in [0, 1] on the method's term, from what the cache holds for the row.

    The signal is the reference's **step-0 refusal mass** m: its probability mass on the safety
    tokens with a positive weight (``keep``) before the first response token
    (:func:`pact_cache.combine.step0_refusal_mass`; high when the prompt looks harmful to it,
    ranked by ``pact-cache stats``). ``hard``: g = 1 if m >= ``at`` else 0; ``soft``: g = m.
    The method's term of each of the row's steps is multiplied by g; the cross-entropy is not."""

    kind: str  # "hard" or "soft"
    at: float  # the hard gate's threshold
    keep: tuple  # (K,) bool: the safety tokens with a positive weight

    KINDS = ("hard", "soft")

    @classmethod
    def of_cache(cls, cache: Cache, kind: str, at: float) -> "RowGate":
        if kind not in cls.KINDS:
            raise ValueError(f"row gate {kind!r}: use one of {', '.join(cls.KINDS)}")
        return cls(kind, float(at), tuple(w > 0 for w in cache.tokens.weights))

    def mass(self, row: CacheRow) -> float:
        from pact_cache.combine import step0_refusal_mass

        return step0_refusal_mass(row, np.array(self.keep))

    def __call__(self, row: CacheRow) -> float:
        m = self.mass(row)
        return (1.0 if m >= self.at else 0.0) if self.kind == "hard" else min(max(m, 0.0), 1.0)


def epoch_rows(cache: Cache, epoch: int, seed: int, shuffle: bool, buffer_rows: int = 1024, stream: int = 0) -> Iterator[CacheRow]:
    """Rows of one epoch in a deterministic order; at most ``buffer_rows`` rows held at once.
    ``stream`` > 0 draws an order independent of the fine-tuning cache's (the replay cache's)."""
    if not shuffle:
        yield from cache.iter_rows()
        return
    rng = np.random.default_rng([seed, epoch] + ([stream] if stream else []))
    buf: list[CacheRow] = []
    for j in rng.permutation(len(cache.parts)):
        for row in cache.iter_part_rows(cache.parts[int(j)]):
            if len(buf) < buffer_rows:
                buf.append(row)
                continue
            k = int(rng.integers(len(buf)))
            buf[k], row = row, buf[k]
            yield row
    while buf:
        k = int(rng.integers(len(buf)))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()


def batches(cache: Cache, batch_size: int, seed: int, shuffle: bool, start_epoch: int = 0, skip_rows: int = 0,
            buffer_rows: int = 1024, epochs: int | None = None, replay: Replay | None = None) -> Iterator[tuple[int, int, list[CacheRow]]]:
    """Yield ``(epoch, rows taken in this epoch after the batch, rows)`` forever or for ``epochs``.

    The last batch of an epoch may be short; batches never straddle epochs. With ``replay``, the
    replay rows due by the end of a batch (:meth:`Replay.count`) follow its ``batch_size`` rows.
    """
    n = cache.num_rows
    mixed = replay.rows(replay.count(start_epoch * n + skip_rows)) if replay is not None else None

    def with_replay(epoch, taken, rows):
        if mixed is None:
            return rows
        g = epoch * n + taken  # rows of the fine-tuning cache taken so far, over all epochs
        due = replay.count(g) - replay.count(g - len(rows))
        return rows + [next(mixed) for _ in range(due)]

    epoch = start_epoch
    while epochs is None or epoch < epochs:
        taken, buf = 0, []
        for row in epoch_rows(cache, epoch, seed, shuffle, buffer_rows):
            taken += 1
            if taken <= skip_rows:
                continue
            buf.append(row)
            if len(buf) == batch_size:
                yield epoch, taken, with_replay(epoch, taken, buf)
                buf = []
        if buf:
            yield epoch, taken, with_replay(epoch, taken, buf)
        epoch, skip_rows = epoch + 1, 0
