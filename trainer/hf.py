"""Train from a pact-cache in Hugging Face ``Trainer`` (and trainers built on it, such as TRL's).

Three pieces, each usable alone:

* :class:`CacheDataset`, a torch ``IterableDataset`` over a cache (any location), sharded by
  dataloader worker and, in a plain torch.distributed loop, by rank; in cache order or through the
  seeded shuffle buffer that pact-train uses (``set_epoch`` changes the order per epoch). Under
  the Trainer, accelerate shards it by rank instead: every process reads the same order and takes
  its slice of each global batch (even batches on every process, so no rank waits for another);
* :class:`PactCollator`, which packs a list of rows into one sequence of their real tokens
  (padding-free, the default: ``input_ids``, ``position_ids``, ``pact_cu_seqlens``) or pads them
  (``input_ids``, ``attention_mask``), and carries the cached reference targets as tensors (keys
  ``pact_*``) beside ``labels`` (-100 except at response tokens, so that ``num_items_in_batch``
  counts response tokens);
* :class:`PactTrainerMixin`, whose ``compute_loss`` pops the ``pact_*`` tensors before the model
  sees the inputs and computes the loss with the same core as pact-train
  (:func:`pact_train.core.policy_losses`): ``(CE sum + lambda * method term sum) / num_items_in_batch``,
  i.e. token-weighted over the whole accumulation window (and over all processes when
  ``average_tokens_across_devices``), as pact-train's loop is. :class:`PactTrainer` is the mixin on
  ``transformers.Trainer``; put the mixin first on any other ``Trainer`` subclass.

What to set: ``TrainingArguments(remove_unused_columns=False)`` (the ``pact_*`` columns must reach
``compute_loss``), the collator above (or one that produces the same keys), and nothing for label
masking (the collator masks prompts and padding). The safety-token ids and weights come from the cache.
Under ``accelerate launch`` / ``torchrun`` the mixin turns accelerate's ``dispatch_batches`` off
(it would concatenate batches padded to different lengths); the model is called through its
DDP / FSDP / DeepSpeed wrapper, so their gradient synchronisation and weight gathering apply.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pact_cache.columns import REF_COLUMNS
from pact_cache.errors import PactError, preview
from pact_cache.format import Cache, CacheRow, open_cache
from pact_cache.projection import check_projection

from .core import lora_direction_factors, policy_losses, split_window_loss, window_loss
from .distributed import Ranks
from .losses import LossParams, PactParams, added_term_methods
from .optim import CLIPS, backward_apart, clip_split
from .stream import (
    REPLAY_RATIO,
    REPLAY_TERMS,
    SHUFFLE_BUFFER_ROWS,
    Batch,
    Replay,
    RowGate,
    check_replay_ratio,
    collate,
    epoch_rows,
    pad_id_for,
)

# what users import from here (RowGate and pad_id_for live in pact_train.stream; they are re-exported)
__all__ = [
    "CacheDataset",
    "PactCollator",
    "PactTrainerMixin",
    "make_trainer_class",
    "recipe_kwargs",
    "hf_iterable_dataset",
    "RowGate",
    "pad_id_for",
    "REPLAY_TERMS",
]  # and PactTrainer, made on first use (module __getattr__)

# The collator's keys beside the model's inputs: the batch's layout, then one per cached reference column
# (pact_cache.columns.REF_COLUMNS: pact_full, pact_post, pact_target)
LAYOUT_KEYS = (
    "pact_response_start",
    "pact_step_mask",
    "pact_targets",
    "pact_loss_mask",
    "pact_row_gate",
    "pact_ce_weight",
)
KEYS = LAYOUT_KEYS + tuple(f"pact_{c.name}" for c in REF_COLUMNS)
PACKED_KEY = "pact_cu_seqlens"  # padding-free batches: the rows' offsets in the packed sequence (B + 1,) int32


class CacheDataset(IterableDataset):
    """Rows of a cache as dicts of numpy arrays, each process and worker taking every n-th row."""

    def __init__(
        self,
        cache: Cache | str,
        shuffle: bool = False,
        seed: int = 0,
        buffer_rows: int = SHUFFLE_BUFFER_ROWS,
        storage_options: dict | None = None,
        cache_id: str | None = None,
        shard_by_rank: bool = True,
        replay: Cache | str | None = None,
        replay_ratio: float = REPLAY_RATIO,
    ):
        for name, value in (("shuffle", shuffle), ("shard_by_rank", shard_by_rank)):
            if not isinstance(value, bool):
                raise PactError(f"CacheDataset({name}={preview(value)}): must be true or false")
        for name, value, lo in (("seed", seed, 0), ("buffer_rows", buffer_rows, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise PactError(f"CacheDataset({name}={preview(value)}): must be an integer >= {lo}")
        if replay is not None:
            check_replay_ratio(replay_ratio, "CacheDataset(replay=...):")
        self.cache = (
            cache if isinstance(cache, Cache) else open_cache(cache, cache_id=cache_id, storage_options=storage_options)
        )
        if self.cache.num_rows == 0:  # as pact-train, stats and pact-eval refuse it
            raise PactError(f"{self.cache.url}: the cache holds no rows; rebuild it from a non-empty dataset")
        self.shuffle, self.seed, self.buffer_rows, self.epoch = shuffle, seed, buffer_rows, 0
        self.shard_by_rank = shard_by_rank  # False when the training stack shards by rank itself (accelerate)
        # pact-train --replay: after each row of this cache, the replay rows then due (pact_train.stream.Replay)
        self.replay = None
        if replay is not None:
            rc = replay if isinstance(replay, Cache) else open_cache(replay, storage_options=storage_options)
            self.replay = Replay.of(self.cache, rc, replay_ratio, seed, buffer_rows, where="CacheDataset(replay=...):")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_rows(self) -> int:
        n = self.cache.num_rows
        return n + (self.replay.extra(self.epoch, n) if self.replay else 0)

    def __len__(self) -> int:  # rows this process iterates (the Trainer uses it to count steps)
        rank, world = _rank_world() if self.shard_by_rank else (0, 1)
        return len(range(rank, self._epoch_rows(), world))

    def _mixed(self):
        rows = epoch_rows(self.cache, self.epoch, self.seed, self.shuffle, self.buffer_rows)
        return self.replay.interleave(rows, self.epoch, self.cache.num_rows) if self.replay else rows

    def __iter__(self):
        rank, world = _rank_world() if self.shard_by_rank else (0, 1)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, shards = rank * nw + wid, world * nw
        for i, row in enumerate(self._mixed()):
            if i % shards == shard:
                yield {"row": row}


def hf_iterable_dataset(
    cache: Cache | str,
    shuffle: bool = False,
    seed: int = 0,
    buffer_rows: int = SHUFFLE_BUFFER_ROWS,
    storage_options: dict | None = None,
    cache_id: str | None = None,
):
    """The cache as a ``datasets.IterableDataset`` of ``{"row": CacheRow}`` items, for trainers that
    accept only Hugging Face datasets (TRL's ``SFTTrainer``). One shard, so that accelerate gives
    each process its slice of every global batch; ``shuffle`` is datasets' own buffer shuffle
    (seeded, a new order per ``set_epoch``)."""
    import datasets

    c = cache if isinstance(cache, Cache) else open_cache(cache, cache_id=cache_id, storage_options=storage_options)
    ds = datasets.IterableDataset.from_generator(_cache_rows, gen_kwargs={"cache": c})
    return ds.shuffle(seed=seed, buffer_size=buffer_rows) if shuffle else ds


def _cache_rows(cache: Cache):
    for row in cache.iter_rows():
        yield {"row": row}


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PactCollator:
    """Pads rows (``{"row": CacheRow}`` items, or CacheRows) into the model's inputs plus ``pact_*`` targets.
    ``token_mask`` (:func:`pact_cache.rows.cache_token_mask` of a scored cache) leaves TOSS's
    selected tokens out of the CE, as ``pact-train --token-mask`` does; ``row_gate``
    (:class:`pact_train.stream.RowGate`, ``RowGate.of_cache(cache, "hard", 0.9)``) weighs each row's
    term, as ``pact-train --row-gate`` does (``pact_row_gate``; ones without a gate); ``replay_term``
    (``both``, ``ce`` or ``term``, :data:`pact_train.stream.REPLAY_TERMS`) is what the rows of a
    ``CacheDataset(replay=...)`` get, as ``pact-train --replay-term`` (``pact_ce_weight``).

    ``padding_free`` (the default, as pact-train's): the rows become one sequence of their real tokens
    (``input_ids``, ``position_ids``, ``labels`` (1, N), no ``attention_mask``; ``pact_cu_seqlens`` the
    rows' offsets); :class:`PactTrainerMixin` switches the model to packed attention and proves it keeps
    the rows apart (:func:`pact_train.packing.enable`), or turns this off with one warning."""

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int = 1,
        token_mask=None,
        row_gate=None,
        replay_term: str = "both",
        padding_free: bool = True,
    ):
        if (
            pad_token_id is None
            or isinstance(pad_token_id, bool)
            or not isinstance(pad_token_id, int)
            or pad_token_id < 0
        ):
            raise PactError(
                f"PactCollator(pad_token_id={preview(pad_token_id)}): needs a token id >= 0; a tokenizer "
                f"without a pad "
                "token (tok.pad_token_id is None) can pad with any id: pass pact_train.hf.pad_id_for(tok) "
                "(its "
                "end-of-sequence token); padding is masked out of attention and loss"
            )
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise PactError(f"PactCollator(pad_to_multiple_of={preview(pad_to_multiple_of)}): must be an integer >= 1")
        self.pad_token_id, self.pad_to_multiple_of, self.token_mask = pad_token_id, pad_to_multiple_of, token_mask
        if not isinstance(replay_term, str) or replay_term not in REPLAY_TERMS:
            raise PactError(f"PactCollator(replay_term={preview(replay_term)}): use one of {', '.join(REPLAY_TERMS)}")
        if row_gate is not None and not isinstance(row_gate, RowGate):
            raise PactError(
                f"PactCollator(row_gate={preview(row_gate)}): must be a RowGate, e.g. "
                f"RowGate.of_cache(cache, "
                "'hard', 0.9) (pact_train.stream.RowGate), or None"
            )
        self.row_gate, self.replay_term, self.padding_free = row_gate, replay_term, bool(padding_free)

    def __call__(self, items) -> dict:
        rows: list[CacheRow] = [it["row"] if isinstance(it, dict) else it for it in items]
        if not rows:
            raise PactError("PactCollator: an empty batch; a batch needs at least one row (does the dataset hold any?)")
        b = collate(
            rows,
            self.pad_token_id,
            self.pad_to_multiple_of,
            self.token_mask,
            self.row_gate,
            self.replay_term,
            self.padding_free,
        )
        labels = torch.full_like(b.input_ids, -100)
        for i, r in enumerate(rows):  # the response tokens: what the Trainer counts as num_items_in_batch
            at, o = (0, int(b.cu_seqlens[i])) if b.packed else (i, 0)
            labels[at, o + r.response_start : o + len(r.input_ids)] = b.input_ids[
                at, o + r.response_start : o + len(r.input_ids)
            ]
        model_inputs = (
            {"input_ids": b.input_ids, "position_ids": b.position_ids, PACKED_KEY: b.cu_seqlens}
            if b.packed
            else {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        )
        return {
            **model_inputs,
            "labels": labels,
            "pact_response_start": b.response_start,
            "pact_step_mask": b.step_mask,
            "pact_targets": b.targets,
            "pact_loss_mask": b.step_mask if b.loss_mask is None else b.loss_mask,
            "pact_row_gate": torch.ones(len(rows)) if b.row_gate is None else b.row_gate,
            "pact_ce_weight": torch.ones(len(rows)) if b.ce_weight is None else b.ce_weight,
            **{f"pact_{name}": values for name, values in b.ref.items()},
        }


class PactTrainerMixin:
    """``compute_loss`` for cached reference targets. Pass ``cache`` (for the safety tokens) and
    ``loss_params`` (method, lambda, PACT parameters, logits chunk) to the constructor, and
    ``direction`` (a path or a :class:`pact_cache.direction.Direction`) for a method with a
    parameter penalty (asft): it is added as ``lambda * penalty`` once per optimizer step.

    ``clip="split"`` is pact-train's ``--clip split``: the gradient of the rows the collator's row gate
    anchors (and the replay rows) is clipped to ``max_grad_norm`` apart from the other rows', then the two
    are added; ``grad_norm`` is the task rows' norm and ``anchored_grad_norm`` is logged beside it. Each
    micro-batch with an anchored row takes a second backward pass; under DDP the window runs outside DDP's
    all-reduce and both parts are averaged before the clip. It needs a method whose term is added to the
    cross-entropy, a row gate, ``max_grad_norm > 0``, no fp16 loss scaler, and neither FSDP nor DeepSpeed.
    ``anchored_max_grad_norm``: the anchored part's own cap (pact-train's config option of that name;
    ``max_grad_norm`` when None)."""

    def __init__(
        self,
        *args,
        cache: Cache,
        loss_params: LossParams | None = None,
        direction=None,
        clip: str = "joint",
        anchored_max_grad_norm: float | None = None,
        **kwargs,
    ):
        if not isinstance(clip, str) or clip not in CLIPS:
            raise PactError(f"PactTrainer(clip={preview(clip)}): use one of {', '.join(CLIPS)}")
        if anchored_max_grad_norm is not None:
            from .config import check_option

            if clip != "split":
                raise PactError(
                    f"PactTrainer(anchored_max_grad_norm={preview(anchored_max_grad_norm)}): the anchored rows' own "
                    "clip, which only clip='split' has; give clip='split' or leave it out"
                )
            check_option("anchored_max_grad_norm", anchored_max_grad_norm, "PactTrainer: anchored_max_grad_norm")
        self._pact_anchored_cap = anchored_max_grad_norm
        super().__init__(*args, **kwargs)
        self.pact_ids = torch.tensor(cache.ids)
        self.pact_weights = torch.tensor(cache.tokens.weights, dtype=torch.float32)
        self.pact_params = loss_params or LossParams(pact=PactParams())
        method = self.pact_params.method
        check_projection(
            self.model, what="PactTrainer"
        )  # the loss uses the model's own logits, or training does not start
        if (method.penalty is not None) != (direction is not None):
            raise PactError(
                f"method {method.name}: "
                + (
                    "needs direction= (a file from `pact-cache direction`)"
                    if method.penalty
                    else "takes no direction (only a method with a parameter penalty does)"
                )
            )
        if isinstance(direction, (str, Path)):
            from pact_cache.direction import read_direction

            direction = read_direction(direction)
        self._pact_factors = None
        if direction is not None:
            self._pact_factors = lora_direction_factors(self.model, direction)
        self._pact_pen = torch.zeros(2)  # the penalty's sum and count of values: since the last log
        self.model_accepts_loss_kwargs = True  # so that the Trainer counts num_items_in_batch from the labels
        self._pact_packed = None  # whether the model runs packed attention (decided once)
        if getattr(self.data_collator, "padding_free", False) and not self._pact_pack():
            self.data_collator.padding_free = False
        self._pact_sums = torch.zeros(3)  # CE, the method's term, response tokens: since the last log
        self._pact_split = clip == "split"
        if self._pact_split:
            self._pact_check_split()
        self._pact_params_list = None  # the trainable parameters (clip="split"), found on first use
        self._pact_anchored = None  # clip="split": the anchored rows' gradient of the window so far, and its step
        self._pact_anchored_step = None
        self._pact_anchored_norm = None  # its norm before the last clip, for the log

    def _pact_check_split(self) -> None:
        """What ``clip="split"`` needs, refused at construction in one line each."""
        from transformers import Trainer

        method = self.pact_params.method.name
        why = None
        if method not in added_term_methods():
            why = (
                f"needs a per-step term added to the cross-entropy ({', '.join(added_term_methods())}); "
                f"method {method} has none"
            )
        elif isinstance(self.data_collator, PactCollator) and self.data_collator.row_gate is None:
            why = "clips the rows a row gate anchors apart from the others: give PactCollator(row_gate=...)"
        elif not self.args.max_grad_norm or self.args.max_grad_norm <= 0:
            why = f"clips each part to max_grad_norm, which is {self.args.max_grad_norm}: set it > 0"
        elif self.args.fp16:
            why = "the part kept apart would stay scaled by fp16's loss scaler: train in bf16 or float32"
        elif self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.n_gpu > 1:
            why = "runs on one process or under DDP (torchrun, accelerate launch), not FSDP, DeepSpeed or DataParallel"
        elif not hasattr(Trainer, "_clip_grad_norm"):
            why = "this transformers' Trainer does not clip through Trainer._clip_grad_norm (transformers 5 does)"
        if why:
            raise PactError(f"PactTrainer(clip='split'): {why}; or leave clip='joint'")

    def _pact_pack(self) -> bool:
        """Switch the model to packed attention once (:func:`pact_train.packing.enable`); False, with one
        warning, where it cannot keep the rows apart."""
        if self._pact_packed is None:
            from . import packing

            why = packing.enable(self.model)
            if why is not None:
                import warnings

                warnings.warn(f"PactCollator(padding_free=True) turned off: {why}; batches are padded", stacklevel=3)
            self._pact_packed = why is None
        return self._pact_packed

    def create_accelerator_and_postprocess(self):
        cfg = self.args.accelerator_config
        if cfg.dispatch_batches:
            raise PactError(
                "accelerator_config dispatch_batches=True: the main process would concatenate batches "
                "padded to "
                "different lengths; leave it unset (each process then reads the cache and takes its slice)"
            )
        cfg.dispatch_batches = False
        return super().create_accelerator_and_postprocess()

    def get_train_dataloader(self):
        if isinstance(self.train_dataset, CacheDataset):
            self.train_dataset.shard_by_rank = False  # accelerate gives each process its slice of every global batch
        return super().get_train_dataloader()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = {k: inputs.pop(k) for k in KEYS}  # popped before the model could see them
        cu = inputs.pop(PACKED_KEY, None)
        inputs.pop("labels", None)
        if cu is not None and not self._pact_pack():
            raise PactError(
                "a padding-free batch (pact_cu_seqlens) for a model that cannot keep packed rows apart; "
                "use "
                "PactCollator(padding_free=False)"
            )
        method = self.pact_params.method
        weighted = bool((targets["pact_row_gate"] != 1).any()) or bool((targets["pact_ce_weight"] != 1).any())
        if method.name not in added_term_methods() and weighted:
            raise PactError(
                f"a row gate or replay_term='ce'/'term' weighs a per-step term added to the cross-entropy "
                f"({', '.join(added_term_methods())}), not method {method.name}"
            )
        packed = (
            {}
            if cu is None
            else dict(position_ids=inputs["position_ids"], cu_seqlens=cu, max_length=int((cu[1:] - cu[:-1]).max()))
        )
        batch = Batch(
            inputs["input_ids"],
            inputs.get("attention_mask"),
            targets["pact_response_start"],
            targets["pact_step_mask"],
            targets["pact_targets"],
            {c.name: targets[f"pact_{c.name}"] for c in REF_COLUMNS},
            [],
            targets["pact_loss_mask"],
            targets["pact_row_gate"],
            targets["pact_ce_weight"],
            **packed,
        )
        device = batch.input_ids.device
        split = self._pact_split and model.training
        # clip="split": two backward passes from one forward, which DDP's all-reduce cannot follow; the
        # window's gradients are averaged over the processes before the clip (_clip_grad_norm)
        with model.no_sync() if split and hasattr(model, "no_sync") else contextlib.nullcontext():
            ce_sum, term_sum, n, *anchored = policy_losses(
                model, batch, self.pact_ids.to(device), self.pact_weights.to(device), self.pact_params, split=split
            )
        if model.training:
            self._pact_sums = self._pact_sums.to(device) + torch.stack(
                [ce_sum.detach(), term_sum.detach(), n.detach().float()]
            )
        if num_items_in_batch is not None:
            weight = 1.0 / num_items_in_batch
            if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
                weight = weight * self.args.world_size  # DDP averages gradients over processes; the count is global
            self.loss_is_scaled_for_ga = True
        else:
            weight = 1.0 / n.clamp_min(1)
            self.loss_is_scaled_for_ga = False
        loss = window_loss(self.pact_params, ce_sum, term_sum, weight)
        if split:
            loss = self._pact_anchored_backward(ce_sum, anchored[0], term_sum, weight, batch.row_gate)
        if self._pact_factors is not None and model.training:
            # a penalty on the weights, once per optimizer step: 1/GA of it with each micro-batch when the
            # Trainer does not divide the loss itself (it does when the loss is not scaled for GA)
            penalty = self.pact_params.method.penalty(self._pact_factors)
            ga = self.args.gradient_accumulation_steps if self.loss_is_scaled_for_ga else 1
            loss = loss + self.pact_params.lam * penalty.to(loss.device) / ga
            self._pact_pen = self._pact_pen.to(device) + torch.stack(
                [penalty.detach().to(device), torch.ones((), device=device)]
            )
        return (loss, {"ce_sum": ce_sum.detach(), "term_sum": term_sum.detach()}) if return_outputs else loss

    def _pact_trainable(self) -> list:
        if self._pact_params_list is None:
            self._pact_params_list = [p for p in self.model.parameters() if p.requires_grad]
        return self._pact_params_list

    def _pact_anchored_backward(self, ce_sum, anchored_ce, term_sum, weight, row_gate):
        """clip="split": the backward pass of the anchored rows' part (their CE and the term) here, its gradient
        set apart in ``_pact_anchored``; returns the loss whose backward the Trainer then runs: the other rows'
        CE, its value the whole loss (the anchored part detached) so that the logged loss stays the method's."""
        step = self.state.global_step
        if self._pact_anchored is not None and self._pact_anchored_step != step:
            raise PactError(
                f"PactTrainer(clip='split'): the anchored rows' gradient of step {self._pact_anchored_step} was never "
                "added: this Trainer does not clip through Trainer._clip_grad_norm; leave clip='joint'"
            )
        task, rest = split_window_loss(self.pact_params, ce_sum, anchored_ce, term_sum, weight)
        if bool(row_gate.any()):  # no anchored row: that part has no gradient, skip its pass
            ga = 1 if self.loss_is_scaled_for_ga else self.current_gradient_accumulation_steps
            # scaled and run as the Trainer's own backward pass; .grad keeps the other rows' of the window so far
            self._pact_anchored = backward_apart(
                rest / ga, self._pact_trainable(), self._pact_anchored, True, self.accelerator.backward
            )
            self._pact_anchored_step = step
        return task + rest.detach()

    def _clip_grad_norm(self, model):
        """clip="split": the two parts of the window's gradient (averaged over the processes first, under DDP)
        each clipped to ``max_grad_norm``, then added (:func:`pact_train.optim.clip_split`); returns the task
        rows' norm, the Trainer's ``grad_norm``."""
        if not self._pact_split:
            return super()._clip_grad_norm(model)
        params = self._pact_trainable()
        task = [p.grad for p in params]
        anchored, self._pact_anchored = self._pact_anchored or [None] * len(params), None
        for p, a in zip(params, anchored):
            p.grad = a
        Ranks(self.accelerator.process_index, self.accelerator.num_processes).mean_split_(params, task)
        task_norm, self._pact_anchored_norm = clip_split(params, task, self.args.max_grad_norm, self._pact_anchored_cap)
        return torch.tensor(task_norm)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds the token-weighted cross-entropy (``ce``) and the method's term under its own name (e.g.
        ``pact_kl``) over the steps since the last log, summed over all processes."""
        if "loss" in logs:  # every process logs at the same steps, so every one joins the reduction
            sums = self._pact_sums.to(self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            ce, term, n = sums.tolist()
            if n > 0:
                logs["ce"] = ce / n
                metric = self.pact_params.method.metric
                if metric and self._pact_factors is None:
                    logs[metric] = term / n
            if self._pact_factors is not None:  # the same on every process: no reduction
                total, count = self._pact_pen.tolist()
                if count:
                    logs[self.pact_params.method.metric] = total / count
                self._pact_pen = torch.zeros_like(self._pact_pen)
            self._pact_sums = torch.zeros_like(self._pact_sums)
            if self._pact_anchored_norm is not None:  # clip="split": the last step's, as grad_norm is
                logs["anchored_grad_norm"] = self._pact_anchored_norm
        super().log(logs, *args, **kwargs)


# what recipe_kwargs takes besides the recipe: the TrainConfig fields that decide the loss and the row mix
RECIPE_SETTINGS = (
    "method",
    "lam",
    "row_gate",
    "gate_at",
    "replay_ratio",
    "replay_term",
    "clip",
    "anchored_max_grad_norm",
)


def recipe_kwargs(
    cache: Cache | str,
    pad_token_id: int,
    replay: Cache | str | None = None,
    recipe: str = "safe",
    shuffle: bool = True,
    seed: int = 0,
    storage_options: dict | None = None,
    **settings,
) -> dict:
    """The keyword arguments that give a Trainer pact-train's recipe (:data:`pact_train.config.RECIPES`, the same
    source as pact-train's defaults): ``cache``, ``loss_params``, ``clip`` (and ``anchored_max_grad_norm`` when
    given), ``train_dataset`` (the cache, its rows mixed with ``replay``'s at the recipe's ratio) and
    ``data_collator`` (the recipe's row gate and replay term)::

        kw = recipe_kwargs(cache, pad_id_for(tok), replay="replay/")
        trainer = make_trainer_class(Trainer)(model=model, args=args, **kw)

    ``replay``: the reference's refusals, made once with ``pact-cache replay --ref MODEL --tokens tokens.json -o
    replay/`` (for data that look benign to the reference, where the safe recipe anchors at most 1% of the rows,
    and for ``recipe="safe-benign"``: with ``--borderline default --borderline-keep all``; pact-train's
    ``--replay auto`` makes them from the policy itself; here the model is yours); the
    string ``"none"`` trains without them. A recipe with a replay and no ``replay`` given is refused in one line.
    ``settings``: any of pact-train's recipe options by field name (``lam=1.0``, ``replay_ratio=0.1``,
    ``clip="joint"``, ...); as on the command line, one given wins over the recipe and is checked as there."""
    from .config import RECIPES, TrainConfig, check_config

    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise PactError(f"recipe_kwargs(recipe={preview(recipe)}): use one of {', '.join(RECIPES)}")
    unknown = sorted(set(settings) - set(RECIPE_SETTINGS))
    if unknown:
        raise PactError(
            f"recipe_kwargs({preview(unknown[0])}=...): not a recipe setting; use {', '.join(RECIPE_SETTINGS)}"
        )
    no_replay = isinstance(replay, str) and replay.strip().lower() == "none"
    given = None if replay is None else "none" if no_replay else "(given)"  # as --replay on the command line
    cfg = TrainConfig(model="-", cache="-", out="-", recipe=recipe, replay=given, **settings)
    check_config(cfg)
    c = cache if isinstance(cache, Cache) else open_cache(cache, storage_options=storage_options)
    if cfg.fits_to_data:  # as pact-train does at its start: the share of anchored rows picks the settings
        cfg.fit_to_data(RowGate.share_anchored(c, cfg.gate_at))
        check_config(cfg)
    if cfg.replay and replay is None:
        r = RECIPES[recipe]  # the settings the data chose: the look-alikes belong in the replay made for them
        look_alikes = {**r.settings, **(r.benign_data if cfg.data_look_benign else {})}.get("replay_borderline", "none")
        also = f" --borderline default --borderline-keep {look_alikes}" if look_alikes != "none" else ""
        raise PactError(
            f"recipe_kwargs(recipe={recipe!r}): the recipe replays the reference's refusals; make them once with "
            f"`pact-cache replay --ref MODEL --tokens tokens.json{also} -o replay/` and pass replay='replay/', or "
            "replay='none' to train without them"
        )
    rows = dict(shuffle=shuffle, seed=seed, storage_options=storage_options)
    if cfg.replay:
        rows.update(replay=replay, replay_ratio=cfg.mix_ratio)
    gate = None if cfg.row_gate == "none" else RowGate.of_cache(c, cfg.row_gate, cfg.gate_at)
    return dict(
        cache=c,
        loss_params=cfg.loss_params(),
        clip=cfg.clip,
        **({} if cfg.anchored_max_grad_norm is None else {"anchored_max_grad_norm": cfg.anchored_max_grad_norm}),
        train_dataset=CacheDataset(c, **rows),
        data_collator=PactCollator(pad_token_id, row_gate=gate, replay_term=cfg.replay_term),
    )


def make_trainer_class(base):
    """``PactTrainerMixin`` on any Trainer class (``transformers.Trainer``, TRL's ``SFTTrainer``, ...)."""
    return type(f"Pact{base.__name__}", (PactTrainerMixin, base), {})


def __getattr__(name):  # PactTrainer without importing transformers at module import time
    if name == "PactTrainer":
        from transformers import Trainer

        return make_trainer_class(Trainer)
    raise AttributeError(name)
