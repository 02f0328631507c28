"""Batches from a cache, streamed: memory is bounded by the shuffle buffer, not the cache size.

Order is a pure function of (seed, epoch): parts are visited in a seeded permutation and rows go
through a bounded shuffle buffer. A position ``(epoch, rows taken in that epoch)`` is enough to
resume exactly: the same order is replayed and the rows already taken are skipped.
``shuffle=False`` yields rows in cache order, batch after batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Iterator

import numpy as np
import torch

from pact_cache.columns import REF_COLUMNS
from pact_cache.errors import PactError, preview
from pact_cache.format import Cache, CacheRow
from pact_cache.rows import right_pad

from .packing import packed_inputs


@dataclass
class Batch:
    """A training batch. B rows, L = longest sequence, T = most response steps, K safety tokens.

    Padded (the rows right-padded to L) or packed (padding-free, :mod:`pact_train.packing`): the rows
    concatenated into one sequence of N = their summed lengths, ``attention_mask`` None, ``position_ids``
    restarting at every row and ``cu_seqlens`` the rows' offsets. The per-step tensors are (B, T) either way."""

    input_ids: torch.Tensor  # (B, L) long, right-padded; packed: (1, N)
    attention_mask: torch.Tensor | None  # (B, L) long; packed: None (the rows' bounds are cu_seqlens)
    response_start: torch.Tensor  # (B,) long, within each row
    step_mask: torch.Tensor  # (B, T) bool, True at real response steps
    targets: torch.Tensor  # (B, T) long, the response tokens (0 where masked)
    ref: dict  # name -> the cached reference column (pact_cache.columns.REF_COLUMNS): (B, T, K) or (B, T) float32
    example_ids: list[str]
    loss_mask: torch.Tensor | None = None  # (B, T) bool: steps whose token stays in the CE (--token-mask); None: all
    row_gate: torch.Tensor | None = (
        None  # (B,) float32 in [0, 1]: how much of the method's term each row gets (--row-gate, --replay); None: all
    )
    ce_weight: torch.Tensor | None = (
        None  # (B,) float32: how much of the cross-entropy each row gets (--replay-term term: 0); None: all
    )
    position_ids: torch.Tensor | None = None  # packed: (1, N) long, 0 at every row's first token
    cu_seqlens: torch.Tensor | None = None  # packed: (B + 1,) int32, row i is input_ids[0, cu[i]:cu[i + 1]]
    max_length: int = 0  # packed: the longest row

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def reference(self, columns) -> dict:
        """The cached reference columns a method reads, by name."""
        return {c: self.ref[c] for c in columns}

    @property
    def num_tokens(self) -> int:
        return int(self.step_mask.sum())

    def to(self, device) -> "Batch":
        def move(x):
            if isinstance(x, dict):
                return {k: v.to(device) for k, v in x.items()}
            return x.to(device) if torch.is_tensor(x) else x

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def model_inputs(self) -> dict:
        """The model's keyword arguments: ``input_ids`` and ``attention_mask``; packed: ``input_ids``,
        ``position_ids`` and the rows' bounds under the names transformers' variable-length attention reads."""
        if not self.packed:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }

    def hidden_at(self, hidden: torch.Tensor, bidx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, H), or (1, N, H) packed -> (n, H): row ``bidx``'s position ``pos`` (within the row)."""
        if self.packed:
            return hidden[0, self.cu_seqlens.long()[bidx] + pos]
        return hidden[bidx, pos]

    def padded_inputs(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` (B, L), right-padded with ``pad_id``, whichever form the batch has."""
        if not self.packed:
            return self.input_ids, self.attention_mask
        cu = self.cu_seqlens.tolist()
        return right_pad([self.input_ids[0, s:e] for s, e in zip(cu[:-1], cu[1:])], pad_id)


def pad_id_for(tok) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token (many chat
    tokenizers have no pad token), else 0. Padding is masked out of attention and loss, so any id of
    the vocabulary gives the same result."""
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(tok.eos_token_id) if tok.eos_token_id is not None else 0


def collate(
    rows: list[CacheRow],
    pad_id: int,
    pad_to_multiple: int = 1,
    token_mask=None,
    row_gate=None,
    replay_term: str = "both",
    padding_free: bool = False,
) -> Batch:
    """Right-padded batch, or with ``padding_free`` one packed sequence of the rows' real tokens
    (:class:`Batch`; the model must run packed attention: :func:`pact_train.packing.enable`).
    ``pad_to_multiple`` rounds the padded length up (8 on CUDA: fewer distinct shapes for the GPU
    libraries to plan for, and tensor-core-friendly sizes).
    ``token_mask`` (a :class:`pact_cache.rows.TokenMask`) sets ``loss_mask`` from the rows' scores;
    ``row_gate`` (a :class:`RowGate`) sets ``row_gate`` from the rows' cached values. Rows of a
    replay cache (:class:`ReplayRow`) get the terms ``replay_term`` names (:data:`REPLAY_TERMS`)
    and no gate; with none among the rows, nothing changes."""
    B, K = len(rows), rows[0].ref["full"].shape[1]
    T = max(r.steps for r in rows)
    packed = {}
    if padding_free:  # (1, N): the rows one after another; position ids restart per row
        p = packed_inputs([r.input_ids for r in rows])
        input_ids, attention = p["input_ids"], None
        packed = dict(position_ids=p["position_ids"], cu_seqlens=p["cu_seq_lens_q"], max_length=p["max_length_q"])
    else:
        input_ids, attention = right_pad([r.input_ids for r in rows], pad_id, pad_to_multiple)
    targets = torch.zeros((B, T), dtype=torch.long)
    ref = {c.name: torch.zeros((B, *c.shape(T, K))) for c in REF_COLUMNS}  # (B, T, K) or (B, T)
    steps = torch.tensor([r.steps for r in rows])
    for i, r in enumerate(rows):
        n = r.steps
        targets[i, :n] = torch.from_numpy(r.input_ids[r.response_start :])
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
        gates = torch.tensor(
            [
                REPLAY_TERMS[replay_term][1] if rep else (1.0 if row_gate is None else row_gate(r))
                for r, rep in zip(rows, replayed)
            ],
            dtype=torch.float32,
        )
    if any(replayed) and REPLAY_TERMS[replay_term][0] != 1.0:
        ce = torch.tensor([REPLAY_TERMS[replay_term][0] if rep else 1.0 for rep in replayed], dtype=torch.float32)
    return Batch(
        input_ids, attention, rs, step_mask, targets, ref, [r.example_id for r in rows], loss_mask, gates, ce, **packed
    )


# what a replay row contributes: (weight of its cross-entropy, weight of the method's term)
REPLAY_TERMS = {"both": (1.0, 1.0), "ce": (1.0, 0.0), "term": (0.0, 1.0)}


@dataclass
class ReplayRow(CacheRow):
    """A row of the replay cache (``pact-train --replay``) in the fine-tuning stream: a cache row
    whose type says where it came from, so that the collator gives it the replay's terms."""

    @classmethod
    def of(cls, row: CacheRow) -> "ReplayRow":
        return cls(**{f.name: getattr(row, f.name) for f in fields(CacheRow)})


SHUFFLE_BUFFER_ROWS = 1024  # rows held by the seeded shuffle buffer: the data's memory bound
GATE_AT = 0.9  # the hard row gate's threshold on the step-0 refusal mass, when none is given
REPLAY_RATIO = 0.05  # the replay share when a replay cache is given without one (pact-train --replay, CacheDataset)
REPLAY_RATIO_MAX = 0.5  # at most half the mixed stream: at most one replay row after each fine-tuning row


def check_replay_ratio(ratio, where: str) -> float:
    """The replay share as a float in [0, REPLAY_RATIO_MAX], or one line saying what is wrong with it."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise PactError(
            f"{where} ratio {preview(ratio)}: must be a number (a float such as 0.05), not a {type(ratio).__name__}"
        )
    if not 0.0 <= ratio <= REPLAY_RATIO_MAX:
        raise PactError(
            f"{where} ratio {preview(ratio)}: must be a share of the rows in [0, {REPLAY_RATIO_MAX}] (at "
            f"most one "
            "replay row after each fine-tuning row)"
        )
    return float(ratio)


@dataclass(frozen=True)
class Replay:
    """Rows of a second cache mixed into the fine-tuning stream (``pact-train --replay CACHE
    --replay-ratio R``): typically harmful prompts with the reference's own refusals, built by
    ``pact-cache replay`` (or ``build``) with the same reference and safety tokens.

    One rule for pact-train and the Trainer integration (:meth:`interleave`): after the ``g``-th row of
    the fine-tuning cache (counted over all epochs), the replay rows then due follow it, ``count(g) =
    floor(g * R / (1 - R))`` in all, so a share R of the mixed stream is replay; R is at most
    :data:`REPLAY_RATIO_MAX`, so at most one follows each row. The mixed stream is then cut into
    micro-batches: a replay row takes a slot like any other, and a micro-batch never holds more than
    its batch size. The mix is a pure function of the position, so a resumed run (and every rank) gets
    the same rows. The replay cache is cycled in its own seeded order, a new one each time round."""

    cache: Cache
    ratio: float  # in [0, REPLAY_RATIO_MAX]: the share of the mixed stream's rows that come from the replay cache
    seed: int
    buffer_rows: int = SHUFFLE_BUFFER_ROWS

    @classmethod
    def of(
        cls,
        main: Cache,
        cache: Cache,
        ratio: float,
        seed: int,
        buffer_rows: int = SHUFFLE_BUFFER_ROWS,
        where: str = "--replay",
    ) -> "Replay":
        """The replay of ``cache`` beside the fine-tuning cache ``main``: refused (:class:`PactError`,
        one line) unless both hold the same reference's values for the same safety tokens and
        tokenizer, the replay cache has rows and is not the fine-tuning cache itself."""
        a, b = main.manifest, cache.manifest
        ratio = check_replay_ratio(ratio, where)
        if cache.cache_id == main.cache_id:
            raise PactError(
                f"{where} {cache.url}: is the fine-tuning cache itself (cache id {cache.cache_id[:12]}); "
                f"replay a "
                "cache of the reference's refusals, made by `pact-cache replay`"
            )
        differs = [
            what
            for what, x, y in (
                ("another reference model", a.reference.weights_sha256, b.reference.weights_sha256),
                ("another quantization of the reference", a.build.quantization, b.build.quantization),
                ("another tokenizer", a.tokenizer.sha256, b.tokenizer.sha256),
                ("other safety tokens", (a.tokens.ids, a.tokens.weights), (b.tokens.ids, b.tokens.weights)),
            )
            if x != y
        ]
        if differs:
            raise PactError(
                f"{where} {cache.url}: was built with {differs[0]} than the fine-tuning cache; build it "
                f"with the "
                "same --ref, --tokens and --quantize as the fine-tuning cache"
            )
        if cache.num_rows == 0:
            raise PactError(
                f"{where} {cache.url}: the cache holds no rows; build it from harmful prompts with refusals"
            )
        return cls(cache, ratio, seed, buffer_rows)

    def count(self, main_rows: int) -> int:
        r = Fraction(self.ratio).limit_denominator(10**6)
        return int(main_rows * r / (1 - r))

    def extra(self, epoch: int, n: int) -> int:
        """Replay rows in epoch ``epoch`` of the mixed stream, the fine-tuning cache holding ``n`` rows."""
        return self.count((epoch + 1) * n) - self.count(epoch * n)

    def interleave(self, rows: Iterator[CacheRow], epoch: int, n: int) -> Iterator[CacheRow]:
        """Epoch ``epoch``'s rows of the fine-tuning cache (``n`` per epoch), each followed by the replay
        rows then due: the mixed stream both training paths cut into batches."""
        mixed = self.rows(self.count(epoch * n))
        for i, row in enumerate(rows, 1):
            yield row
            g = epoch * n + i
            for _ in range(self.count(g) - self.count(g - 1)):
                yield next(mixed)

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
    (:func:`pact_cache.rows.step0_refusal_mass`; high when the prompt looks harmful to it,
    ranked by ``pact-cache stats``). ``hard``: g = 1 if m >= ``at`` else 0; ``soft``: g = m.
    The method's term of each of the row's steps is multiplied by g; the cross-entropy is not."""

    kind: str  # "hard" or "soft"
    at: float  # the hard gate's threshold
    keep: tuple  # (K,) bool: the safety tokens with a positive weight

    KINDS = ("hard", "soft")

    @classmethod
    def of_cache(cls, cache: Cache, kind: str, at: float | None = None) -> "RowGate":
        """The gate ``kind`` on ``cache``'s rows; ``at`` (the hard gate's threshold, default 0.9) is refused
        for a soft gate, which has none, and outside [0, 1] (one :class:`PactError` line each)."""
        if not isinstance(kind, str) or kind not in cls.KINDS:
            raise PactError(f"row gate {preview(kind)}: use one of {', '.join(cls.KINDS)}")
        if kind == "soft" and at is not None:
            raise PactError(
                f"row gate soft, at={preview(at)}: the soft gate weighs each row by its mass and has no "
                f"threshold; "
                "leave out at (--gate-at), or use the hard gate"
            )
        at = GATE_AT if at is None else at
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not (0.0 <= at <= 1.0):  # NaN fails too
            raise PactError(
                f"row gate threshold {preview(at)}: must be a step-0 refusal mass in [0, 1] (e.g. {GATE_AT})"
            )
        return cls(kind, float(at), tuple(w > 0 for w in cache.tokens.weights))

    def mass(self, row: CacheRow) -> float:
        from pact_cache.rows import step0_refusal_mass

        return step0_refusal_mass(row, np.array(self.keep))

    def __call__(self, row: CacheRow) -> float:
        m = self.mass(row)
        return (1.0 if m >= self.at else 0.0) if self.kind == "hard" else min(max(m, 0.0), 1.0)

    @classmethod
    def share_anchored(cls, cache: Cache, at: float | None = None) -> float:
        """The share of ``cache``'s rows a hard gate at ``at`` (default 0.9) anchors: the safe recipe's measure."""
        return cls.of_cache(cache, "hard", at).anchored_share(cache)

    def anchored_share(self, cache: Cache) -> float:
        """The share of ``cache``'s rows whose step-0 refusal mass is at least this gate's threshold (the rows a
        hard gate anchors): one pass over the rows, each part's reads bounded as any read of the cache."""
        if not cache.num_rows:
            return 0.0
        return sum(self.mass(row) >= self.at for row in cache.iter_rows()) / cache.num_rows


def epoch_rows(
    cache: Cache, epoch: int, seed: int, shuffle: bool, buffer_rows: int = SHUFFLE_BUFFER_ROWS, stream: int = 0
) -> Iterator[CacheRow]:
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


def length_grouped(rows: Iterator[CacheRow], batch_size: int, window: int, seed: int, epoch: int) -> Iterator[CacheRow]:
    """``rows`` reordered so that each run of ``batch_size`` rows has similar lengths: every window of
    ``window * batch_size`` rows (counted from the epoch's start, so windows and batches stay aligned) is
    sorted by length (ties in arrival order), cut into batches, and the batches are yielded in a seeded
    order. A pure function of the incoming order, the seed and the epoch: a resume that skips the rows
    already taken sees the same batches."""
    size = window * batch_size
    for w in itertools.count():
        buf = [r for _, r in zip(range(size), rows)]
        if not buf:
            return
        buf.sort(key=lambda r: len(r.input_ids))  # stable
        groups = [buf[i : i + batch_size] for i in range(0, len(buf), batch_size)]
        for j in np.random.default_rng([seed, epoch, w, 7]).permutation(
            len(groups)
        ):  # 7: a stream apart from epoch_rows
            yield from groups[int(j)]
        if len(buf) < size:
            return


def batches(
    cache: Cache,
    batch_size: int,
    seed: int,
    shuffle: bool,
    start_epoch: int = 0,
    skip_rows: int = 0,
    buffer_rows: int = SHUFFLE_BUFFER_ROWS,
    epochs: int | None = None,
    replay: Replay | None = None,
    group_by_length: int = 0,
) -> Iterator[tuple[int, int, list[CacheRow]]]:
    """Yield ``(epoch, rows taken in this epoch after the batch, rows)`` forever or for ``epochs``.

    The last batch of an epoch may be short; batches never straddle epochs. With ``replay``, the
    epoch's rows are the mixed stream (:meth:`Replay.interleave`): a replay row takes a slot of the
    batch and counts among the rows taken, so a batch never holds more than ``batch_size`` rows.
    ``group_by_length`` > 0 reorders each epoch's rows with :func:`length_grouped` (windows of that
    many batches) before they are cut into batches.
    """
    n = cache.num_rows
    epoch = start_epoch
    while epochs is None or epoch < epochs:
        taken, buf = 0, []
        rows = epoch_rows(cache, epoch, seed, shuffle, buffer_rows)
        if replay is not None:
            rows = replay.interleave(rows, epoch, n)
        if group_by_length:
            rows = length_grouped(rows, batch_size, group_by_length, seed, epoch)
        for row in rows:
            taken += 1
            if taken <= skip_rows:
                continue
            buf.append(row)
            if len(buf) == batch_size:
                yield epoch, taken, buf
                buf = []
        if buf:
            yield epoch, taken, buf
        epoch, skip_rows = epoch + 1, 0
