"""pact-train: one model in memory, reference targets streamed from a pact-cache.

Reads top to bottom: config -> setup (checks, model, optimizer, data) -> one explicit loop
(forward, loss, backward, step, log, checkpoint) -> final save.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pact_cache.errors import PactError, preview
from pact_cache.format import Cache, open_cache
from pact_cache.models import pick_device
from pact_cache.projection import check_projection
from pact_cache.storage import atomic_write_bytes, atomic_write_json, read_limited, staged_dir, stale_tmp
from pact_cache.typedjson import load_json

from . import packing
from .checkpoint import clean_leftovers, find_checkpoint, load_checkpoint, save_checkpoint
from .config import (
    CONFIG_MAX_BYTES,
    FEW_ANCHORED,
    LoopSettings,
    Outputs,
    PolicySettings,
    StartSettings,
    TrainConfig,
    TrainError,
    check_config,
    config_record,
    flag_of,
    record_as_now,
)
from .core import causal_lm, lora_direction_factors, online_reference, policy_losses, split_window_loss, window_loss
from .distributed import Ranks, setup, teardown
from .losses import LossParams
from .optim import backward_apart, clip_gradients, make_optimizer
from .stream import GATE_AT, Replay, RowGate, batches, collate, pad_id_for


class NonFiniteError(TrainError):
    """Training diverged: a loss or gradient norm is NaN or infinite. Nothing after the last good
    checkpoint is kept, and no adapter or model is written."""

    def __init__(self, step: int, what: str, out: Path, last_saved: int | None):
        kept = (
            f"the last good checkpoint (step {last_saved}) is kept in {out}/checkpoint"
            if last_saved is not None
            else "no checkpoint had been written yet"
        )
        super().__init__(
            f"step {step}: {what}; stopped, no adapter or model written, {kept}. "
            "Lower --lr, or check the model and the cache (pact-cache verify)"
        )
        self.step = step


# 2: rows_taken counts the mixed stream's rows (replay rows take batch slots); 1 (absent): the
# fine-tuning cache's rows, the replay rows due coming on top of each batch
STREAM_VERSION = 2


def _log(msg: str) -> None:
    print(f"pact-train: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- checks


def check_cache_rows(cache: Cache, cfg: TrainConfig) -> None:
    """Refuse an empty cache or one with a bad part, before any model is loaded (every part is checked
    now, not halfway through training)."""
    if cache.num_rows == 0:
        raise TrainError(f"{cfg.cache}: the cache holds no rows; rebuild it from a non-empty dataset")
    for part in cache.parts:
        cache.check_part(part)


def check_tokenizer(cache: Cache, tok, cache_name: str, model: str) -> None:
    from pact_cache.models import check_tokenizer as check

    check(
        tok,
        cache.manifest.tokenizer.sha256,
        f"{cache_name} (for --model {model})",
        "rebuild the cache with this model's tokenizer or train the model the cache was built for",
        TrainError,
    )


def check_cache_fits(cache: Cache, tok, vocab_rows: int, s: PolicySettings) -> None:
    """Refuse a cache made with another tokenizer or for a larger vocabulary (its rows and parts: check_cache_rows)."""
    check_tokenizer(cache, tok, s.cache, s.model)
    bad = [i for i in cache.ids if i >= vocab_rows]
    if bad:
        raise TrainError(
            f"{s.cache}: safety-token ids {bad[:5]} are outside {s.model}'s vocabulary ({vocab_rows} rows)"
        )
    if cache.vocab_size > vocab_rows:
        raise TrainError(
            f"{s.cache}: input ids may reach {cache.vocab_size - 1}, beyond {s.model}'s {vocab_rows} embedding rows"
        )


def check_out(
    out: Path, cfg: TrainConfig, cache_id: str, world: int = 1, replay_id: str | None = None, replay_known: bool = True
) -> str:
    """'new' or 'resume'; refuse an OUT folder that holds something else. ``replay_known=False``: the
    replay cache is not made yet (``--replay auto``), so its id is not compared."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a folder; choose another -o")
    if not out.exists() or not any(p for p in out.iterdir() if not stale_tmp(p)):
        if cfg.resume:
            raise TrainError(f"{out}: --resume, but there is no run here to resume; drop --resume to start one")
        return "new"
    cfg_file = out / "config.json"
    if not cfg_file.is_file():
        raise TrainError(f"{out}: folder is not empty and holds no pact-train run; choose another -o")
    old = load_json(
        read_limited(cfg_file, CONFIG_MAX_BYTES, str(cfg_file), TrainError, "run config"),
        str(cfg_file),
        TrainError,
        "run config",
        fix="the run folder is damaged: choose another -o",
    )
    if not isinstance(old, dict):
        raise TrainError(f"{cfg_file}: is not a run config (not a JSON object); choose another -o")
    old = record_as_now(old)
    mine = config_record(cfg, cache_id, world, replay_id)
    if not replay_known:
        mine["replay_cache_id"] = old.get("replay_cache_id")
    diff = [k for k in sorted(set(old) | set(mine)) if k not in TrainConfig.RESUMABLE and old.get(k) != mine.get(k)]
    if diff == ["processes"] and cfg.resume:
        raise TrainError(
            f"{out}: the run was started on {old['processes']} process(es), this is {mine['processes']}; "
            f"the global "
            f"batch would change: resume with torchrun --nproc-per-node {old['processes']} (or as one "
            f"process if 1)"
        )
    if diff:
        fix = "choose another -o"
        key = diff[0]
        if cfg.resume and key in cfg.from_recipe and isinstance(old.get(key), (str, int, float)):
            # the recipe filled it, and the recipe's default is not what it was when the run started
            fix = (
                f"the recipe's default changed since; to resume it, give {flag_of(key)} {str(old[key])[:40]} as it ran"
            )
        raise TrainError(
            f"{out}: holds a different run ({str(key)[:60]}: {preview(old.get(key))} there, "
            f"{preview(mine.get(key))} now); {fix}"
        )
    if find_checkpoint(out / "checkpoint") is None:  # it stopped before its first checkpoint: nothing to keep
        _log(
            f"{out} holds this run's settings but no checkpoint (it stopped before its first one); starting it from "
            f"step 0"
        )
        return "new"
    if not cfg.resume:
        raise TrainError(f"{out}: holds this run already; pass --resume to continue it, or choose another -o")
    return "resume"


# ----------------------------------------------------------------------------- replay rows

REPLAY_AUTO_MAX_NEW_TOKENS = 128  # the longest answer of --replay auto (pact-cache replay's default)


def _look_alike_settings(cfg: TrainConfig) -> dict:
    """pact-cache replay's look-alike settings for ``--replay-borderline`` (none: the harmful prompts alone)."""
    if cfg.replay_borderline == "none":
        return {}
    return {"borderline": "default", "borderline_keep": cfg.replay_borderline}


def _check_policy_is_reference(cfg: TrainConfig, cache: Cache) -> None:
    """``--replay auto`` answers with the policy: allowed only when its weights are the cache's reference's."""
    from pact_cache.models import model_fingerprint, resolve_model

    ref = cache.manifest.reference
    if model_fingerprint(resolve_model(cfg.model))["weights_sha256"] != dict(ref.weights_sha256):
        raise TrainError(
            f"--replay auto: {cfg.model} is not the reference {cfg.cache} was built with ({ref.name}), so its "
            "answers are not the reference's refusals; make them with the reference: `pact-cache replay --ref "
            "REFERENCE --tokens TOKENS.json -o replay/`, then pass --replay replay/ (or --replay none)"
        )


def _auto_replay_key(cache: Cache, look_alikes: dict) -> str:
    """What an auto replay cache depends on (reference, its quantization, tokens, tokenizer, prompt files, answer
    length, judge), hashed: the folder name under the cache home, so a later run with the same reuses it."""
    import hashlib

    from pact_cache.replay import borderline_prompts_path, default_prompts_path
    from pact_cache.storage import sha256_path

    m = cache.manifest
    quant = m.build.quantization
    parts = {
        "reference": dict(m.reference.weights_sha256),
        **({"quantization": quant} if quant else {}),
        "tokens": m.tokens.to_json(),
        "tokenizer": m.tokenizer.sha256,
        "prompts": sha256_path(default_prompts_path()),
        "max_new_tokens": REPLAY_AUTO_MAX_NEW_TOKENS,
        "judge": "keyword",
    }
    if look_alikes:
        parts |= {
            "borderline": sha256_path(borderline_prompts_path()),
            "borderline_keep": look_alikes["borderline_keep"],
        }
        if look_alikes["borderline_keep"] == "all":  # cut-off look-alike answers kept since 2026-12-07: a new key
            parts["cut_look_alikes"] = "kept"
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _make_auto_replay(cfg: TrainConfig, cache: Cache, final: Path, look_alikes: dict, device: str) -> None:
    """Answer the package's prompts with the policy (the reference at step 0), keep the refusals (and, with
    look-alikes, what --replay-borderline keeps), and publish the replay cache at FINAL whole or not at all."""
    import shutil
    import tempfile

    from pact_cache.replay import ReplayConfig, default_prompts_path, make_replay

    _log(
        f"--replay auto: the policy is the cache's reference; answering {default_prompts_path().name}'s prompts with "
        f"it to make the replay rows (once; kept in {final})"
    )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        tokens = tmp / "tokens.json"
        tokens.write_text(json.dumps(cache.manifest.tokens.to_json()))
        quant = cache.manifest.build.quantization  # the replay's reference loaded as the cache's was
        settings = ReplayConfig(
            ref=cfg.model,
            out=str(tmp / "cache"),
            tokens=str(tokens),
            device=device,
            quantize=quant or "none",
            max_new_tokens=REPLAY_AUTO_MAX_NEW_TOKENS,
            progress=cfg.progress,
            **look_alikes,
        )
        try:
            res = make_replay(settings)
        except PactError as err:
            raise TrainError(f"--replay auto: {err}; or train without replay rows: --replay none") from None
        if res.warning:
            _log("warning: " + res.warning)
        look = (
            f", and {res.borderline_kept} of {res.borderline_prompts} answers to look-alike prompts "
            f"(--replay-borderline {cfg.replay_borderline})"
            if res.borderline_prompts
            else ""
        )
        _log(f"--replay auto: {res.kept} of {res.prompts} answers kept as replay rows{look}")
        if not (final / "manifest.json").is_file():  # another run may have finished the same one meanwhile
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp / "cache", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def auto_replay(cfg: TrainConfig, cache: Cache, ranks: Ranks, device: str) -> str:
    """``--replay auto``: the replay cache made from the package's prompts (and, with ``--replay-borderline``, its
    look-alike prompts) by the policy itself, which is allowed only when the policy's weights are the cache's
    reference's (then its answers at step 0 are the reference's). Made once per (reference, tokens, prompts) under
    the cache home and reused by later runs; rank 0 makes it while the other ranks wait. Returns its folder."""
    from pact_cache.models import cache_home

    _check_policy_is_reference(cfg, cache)
    look_alikes = _look_alike_settings(cfg)
    final = cache_home() / "replay" / _auto_replay_key(cache, look_alikes)
    if ranks.main and not (final / "manifest.json").is_file():
        _make_auto_replay(cfg, cache, final, look_alikes, device)
    ranks.barrier()
    return str(final)


def open_replay(
    cfg: TrainConfig, cache: Cache, out: Path, ranks: Ranks, device: str
) -> tuple[Replay | None, str | None]:
    """The replay stream of ``--replay`` (none without it) and where its cache is; for ``auto``, OUT and the
    tokenizer are checked before the answers are generated (:func:`auto_replay`)."""
    if not cfg.replay:
        return None, None
    if cfg.replay == "auto":
        from pact_cache.models import load_tokenizer, resolve_model

        check_out(out, cfg, cache.cache_id, ranks.world, replay_known=False)
        check_tokenizer(cache, load_tokenizer(resolve_model(cfg.model)), cfg.cache, cfg.model)
    where = auto_replay(cfg, cache, ranks, device) if cfg.replay == "auto" else cfg.replay
    rc = open_cache(where, storage_options=cfg.storage_options if where == cfg.replay else {})
    return Replay.of(cache, rc, cfg.mix_ratio, cfg.seed, cfg.shuffle_buffer), where


# ----------------------------------------------------------------------------- model


def load_policy(s: PolicySettings, device: str):
    """The policy (LoRA on its base, or the whole model with ``full``), its tokenizer and where it was found."""
    from pact_cache.models import ModelError, from_pretrained, load_tokenizer, resolve_model

    resolved = resolve_model(s.model)
    tok = load_tokenizer(resolved)
    # LoRA on CUDA: frozen base in bf16, adapters in fp32. Full fine-tuning keeps fp32 master weights
    # and autocasts to bf16. On CPU everything is fp32. --quantize: the base's linear layers in 4 or
    # 8 bits computing in that dtype, the rest upcast to fp32 by PEFT's k-bit preparation.
    dtype = torch.bfloat16 if device.startswith("cuda") and not s.full else torch.float32
    try:
        model = from_pretrained(resolved, dtype, device, s.quantize)
    except ModelError as err:
        raise TrainError(str(err)) from None
    if s.quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=s.grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif s.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if not s.full:
        from peft import LoraConfig, get_peft_model

        targets = s.targets
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise TrainError(
                f"--lora-targets: {missing} are not modules of {s.model} (it has e.g. "
                f"{sorted(n for n in names if 'proj' in n)[:8]})"
            )
        model = get_peft_model(
            model,
            LoraConfig(
                r=s.lora_r,
                lora_alpha=s.lora_alpha,
                lora_dropout=s.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    return model, tok, resolved


# ----------------------------------------------------------------------------- the run


def train(cfg: TrainConfig) -> dict:
    """One run; as one process, or as one rank of a torchrun / accelerate launch job (see
    :mod:`pact_train.distributed`: disjoint row shares, token-weighted gradients, rank 0 writes)."""
    check_config(cfg)
    if cfg.dry_run:
        est = run_estimate(cfg, pick_device(cfg.device))
        print("\n".join(est["lines"]), flush=True)
        return {"dry_run": True, "estimate": est["estimate"]}
    ranks, device = setup(cfg.device)
    out = Path(cfg.out).expanduser()
    fresh = not out.exists()
    try:
        return _run(cfg, ranks, device)
    except BaseException:
        if ranks.main and fresh:
            drop_unstarted(out)
        raise
    finally:
        teardown(ranks)


def run_estimate(cfg: TrainConfig, device: str, data: Data | None = None) -> dict:
    """The run's estimated peak memory (:mod:`pact_cache.memory`) from the model's config and the longest row
    of the cache (and of the replay cache), nothing loaded: ``{"estimate": Estimate.to_json(), "lines": what
    is printed}``."""
    from pact_cache.memory import ModelShape, estimate_training
    from pact_cache.models import resolve_model

    if data is None:
        cache = open_cache(cfg.cache, cache_id=cfg.cache_pin, storage_options=cfg.storage_options)
        check_cache_rows(cache, cfg)
        seq, steps = cache.longest_row()
    else:
        extents = [data.cache.longest_row()] + ([data.replay.cache.longest_row()] if data.replay else [])
        seq, steps = max(e[0] for e in extents), max(e[1] for e in extents)
    shape = ModelShape.of_model_dir(resolve_model(cfg.model).path, cfg.policy_settings().targets)
    est = estimate_training(
        shape,
        device=device,
        batch_size=cfg.batch_size,
        seq_len=seq,
        full=cfg.full,
        lora_r=cfg.lora_r,
        quantize=cfg.quantize,
        optim=cfg.optim,
        checkpointing=cfg.grad_checkpointing,
        logits_chunk=cfg.logits_chunk,
        response_tokens=cfg.batch_size * steps,
    )
    if cfg.reference == "online" and cfg.loss_params().method.columns:  # a second model, frozen, no state
        ref = estimate_training(shape, device=device, batch_size=1, seq_len=1, quantize=cfg.quantize)
        est.parts["live reference (weights)"] = next(iter(ref.parts.values()))
    head = (
        f"memory estimate: {cfg.model}, {shape.linear + shape.other:,} parameters, micro-batches of {cfg.batch_size} "
        f"rows of up to {seq} tokens (the cache's longest row)"
    )
    return {"estimate": {**est.to_json(), "seq_len": seq, "batch_size": cfg.batch_size}, "lines": [head, *est.lines()]}


def drop_unstarted(out: Path) -> None:
    """Remove a run folder this run created and that holds no step yet (no checkpoint, no metrics line):
    a run that fails before its first step leaves nothing behind, so the same command works once the
    cause is fixed."""
    metrics = out / "metrics.jsonl"
    if (
        out.is_dir()
        and find_checkpoint(out / "checkpoint") is None
        and not (metrics.is_file() and metrics.stat().st_size)
    ):
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def _run(cfg: TrainConfig, ranks: Ranks, device: str) -> dict:
    """The run, stage by stage, each reading its own view of the options: every rank checks; rank 0 alone
    writes."""
    data = open_data(cfg, ranks, device)
    if ranks.main:  # what the run is about to need, before anything is loaded
        announce_estimate(cfg, device, data)
    policy = open_policy(cfg.policy_settings(), data, ranks, device)
    record = config_record(cfg, data.cache.cache_id, ranks.world, data.replay_id)
    start = start_or_resume(cfg.start_settings(), record, data, policy, ranks)
    t_run = time.time()
    end = window_loop(cfg.loop_settings(), data, policy, start, ranks, device)
    return {**finish(cfg.outputs(), data, policy, start.optimizer, end, ranks), "seconds": time.time() - t_run}


def announce_estimate(cfg: TrainConfig, device: str, data: Data) -> None:
    """Print the run's memory estimate (:func:`run_estimate`), or why there is none."""
    try:
        _log("\n  ".join(run_estimate(cfg, device, data)["lines"]))
    except PactError as err:
        _log(f"no memory estimate: {err}")


# ----------------------------------------------------------------------------- stage 1: the data


@dataclass
class Data:
    """What the run reads, checked: the cache, the replay stream, the token mask and row gate that ride on
    its rows, OUT and whether the run in it is new or resumed."""

    cache: Cache
    out: Path
    kind: str  # "new" or "resume"
    replay: Replay | None = None
    mask: object = None  # pact_cache.rows.TokenMask (--token-mask)
    gate: RowGate | None = None

    @property
    def replay_id(self) -> str | None:
        return self.replay.cache.cache_id if self.replay else None


def open_data(cfg: TrainConfig, ranks: Ranks, device: str) -> Data:
    """The cache (every part checked, footers included), what --report-to needs, the replay stream, OUT (new
    or this run), then the token mask and the row gate: all before any model of the run is loaded."""
    cache = open_cache(cfg.cache, cache_id=cfg.cache_pin, storage_options=cfg.storage_options)
    out = Path(cfg.out).expanduser()
    check_cache_rows(cache, cfg)
    if cfg.fits_to_data:
        fit_recipe_to_data(cfg, cache, ranks)
    if cfg.report_to == "tensorboard":
        tensorboard_writer()  # the package is there, before anything is loaded or written
    replay, where = open_replay(cfg, cache, out, ranks, device)
    kind = check_out(out, cfg, cache.cache_id, ranks.world, replay.cache.cache_id if replay else None)
    ranks.barrier()  # no rank checks OUT after rank 0 has written to it
    if ranks.main:
        clean_leftovers(out)
    data = Data(cache, out, kind, replay)
    if replay is not None:
        for part in replay.cache.parts:  # checked now, not when its rows fall due
            replay.cache.check_part(part)
        if ranks.main:
            _log(
                f"--replay: {replay.cache.num_rows:,} rows of {where} cycled into the stream, a share of "
                f"{replay.ratio:g} of the rows ({replay.count(cache.num_rows * cfg.epochs):,} over the run), "
                f"trained with {cfg.replay_term}"
            )
    if cfg.token_mask:
        from pact_cache.rows import cache_token_mask

        data.mask = cache_token_mask(cache, cfg.token_mask)
        if ranks.main:
            _log(
                f"--token-mask {cfg.token_mask:g}: {data.mask.dropped:,} of {data.mask.total:,} response tokens, "
                f"those scoring >= {data.mask.threshold:.3f}, leave the loss"
            )
    if cfg.row_gate != "none":
        data.gate = RowGate.of_cache(cache, cfg.row_gate, cfg.gate_at)
        if ranks.main:  # `pact-cache stats` shows the masses; no extra pass over the cache here
            _log(
                f"--row-gate {cfg.row_gate}: each row's {cfg.method} term times "
                + (f"[step-0 refusal mass >= {cfg.gate_at:g}]" if cfg.row_gate == "hard" else "its step-0 refusal mass")
            )
    return data


def fit_recipe_to_data(cfg: TrainConfig, cache: Cache, ranks: Ranks) -> None:
    """The recipe's data-aware part (:meth:`TrainConfig.fit_to_data`): the share of the cache's rows the hard
    gate anchors, measured in one pass, decides whether the look-alike settings join (data that look benign to
    the reference). Every rank measures the same rows; rank 0 says what it chose."""
    share = RowGate.share_anchored(cache, cfg.gate_at)
    took = cfg.fit_to_data(share)
    check_config(cfg)  # the rules between options, on what the data chose
    if ranks.main:
        n = round(share * cache.num_rows)
        head = (
            f"the {cfg.recipe} recipe: {n:,} of {cache.num_rows:,} rows ({share:.1%}) anchored (step-0 refusal mass "
            f">= {GATE_AT if cfg.gate_at is None else cfg.gate_at:g})"
        )
        if cfg.data_look_benign:
            _log(
                f"{head}, at most {FEW_ANCHORED:.0%}: the data look benign to the reference, so also "
                + (", ".join(f"{flag_of(k)} {getattr(cfg, k)}" for k in took) or "nothing: you gave each of them")
                + " (--recipe safe-mixed leaves them out)"
                + (
                    "; a --replay cache of your own is read as given: for these settings make it with "
                    "`pact-cache replay ... --borderline default --borderline-keep all`"
                    if cfg.replay and cfg.replay != "auto" and "replay_borderline" not in took
                    else ""
                )
            )
        else:
            _log(
                f"{head}, more than {FEW_ANCHORED:.0%}: rows the reference would refuse are in the data, so its "
                "harmful-data settings (--recipe safe-benign forces the benign-data ones)"
            )


# ----------------------------------------------------------------------------- stage 2: the policy


@dataclass
class Policy:
    """The model being trained and what its loss reads beside the batch: the safety tokens and their weights
    on the device, the method, a live reference (``--reference online``) and the LoRA factors of a parameter
    penalty (AsFT)."""

    model: torch.nn.Module
    tok: object
    params: list  # the trained parameters
    loss: LossParams
    ids: torch.Tensor  # (K,) the safety tokens
    weights: torch.Tensor  # (K,) float32
    padding_free: bool
    ref: torch.nn.Module | None = None
    header: list | None = None  # the assistant header's ids, for the live reference's post view
    factors: list | None = None


def open_policy(s: PolicySettings, data: Data, ranks: Ranks, device: str) -> Policy:
    """The policy (the same initial weights on every rank), proven to project as its own forward does, with
    padding-free batches where the model keeps packed rows apart; the cache checked against its tokenizer
    and vocabulary; the live reference and the penalty's factors when the method needs them."""
    from pact_cache.data import assistant_header_ids

    cache = data.cache
    torch.manual_seed(s.seed)
    model, tok, _ = load_policy(s, device)
    check_projection(model, device, f"--model {s.model}")  # the loss uses the model's own logits, or nothing runs
    padding_free = s.padding_free
    if padding_free:
        why = packing.enable(model)  # proven on this model: packed rows give the padded rows' hidden states
        if why is not None:
            padding_free = False
            if ranks.main:
                _log(f"padding-free batches off: {why}; every micro-batch is padded to its longest row")
    check_cache_fits(cache, tok, causal_lm(model).get_output_embeddings().weight.shape[0], s)
    loss = s.loss
    policy = Policy(
        model,
        tok,
        [p for p in model.parameters() if p.requires_grad],
        loss,
        torch.tensor(cache.ids, device=device),
        torch.tensor(cache.tokens.weights, dtype=torch.float32, device=device),
        padding_free,
    )
    if s.reference == "online" and loss.method.columns:
        from pact_cache.models import load_model, resolve_model

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        # the live reference loaded as the policy's base is (quantized with it): the memory the run was sized for
        policy.ref, _, _ = load_model(resolve_model(s.ref_model or s.model), dtype, device, quantize=s.quantize)
        policy.ref.requires_grad_(False)
        check_projection(policy.ref, device, f"--ref-model {s.ref_model or s.model}")
        policy.header = assistant_header_ids(tok)
    if loss.method.penalty is not None:
        from pact_cache.direction import read_direction

        policy.factors = lora_direction_factors(model, read_direction(s.direction))
    return policy


# ----------------------------------------------------------------------------- stage 3: start or resume


@dataclass
class Position:
    """Where the run is: optimizer steps done, the epoch, rows of the mixed stream taken in it, tokens seen."""

    step: int = 0
    epoch: int = 0
    taken: int = 0
    tokens_total: int = 0

    def state(self, cache_id: str) -> dict:
        """The checkpoint's data position."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "rows_taken": self.taken,
            "tokens_total": self.tokens_total,
            "cache_id": cache_id,
            "stream": STREAM_VERSION,
        }


@dataclass
class Start:
    optimizer: torch.optim.Optimizer
    at: Position
    total: int  # optimizer steps of the whole run
    steps_per_epoch: int


def start_or_resume(s: StartSettings, record: dict, data: Data, policy: Policy, ranks: Ranks) -> Start:
    """The optimizer and the schedule's length; a new run writes ``record`` as config.json and an empty
    metrics.jsonl, a resumed one loads its checkpoint (weights, optimizer, data position) and drops the metrics
    after it."""
    cache, out, replay = data.cache, data.out, data.replay
    optimizer = make_optimizer(policy.params, s.optim, s.lr, s.weight_decay)
    # rows per epoch: the fine-tuning cache's, and the replay rows that take slots among them
    rows_per_epoch = cache.num_rows + (max(replay.extra(e, cache.num_rows) for e in range(s.epochs)) if replay else 0)
    steps_per_epoch = math.ceil(rows_per_epoch / (s.batch_size * ranks.world * s.grad_accum))
    total = min(s.max_steps or 10**12, steps_per_epoch * s.epochs)
    at = Position()
    metrics_path = out / "metrics.jsonl"
    if data.kind == "resume":
        st = load_checkpoint(out / "checkpoint", policy.model, optimizer, is_peft=not s.full)
        if st.get("cache_id") != cache.cache_id:
            raise TrainError(
                f"{out}/checkpoint: was written while training on cache {str(st.get('cache_id'))[:12]}, not "
                f"{cache.cache_id[:12]}; resume with the cache the run started from"
            )
        at = Position(st["step"], st["epoch"], st["rows_taken"], st["tokens_total"])
        stream = st.get("stream", 1)
        if not isinstance(stream, int) or isinstance(stream, bool) or not 1 <= stream <= STREAM_VERSION:
            raise TrainError(
                f"{out}/checkpoint: its stream version {preview(stream)} is not one this pact-train reads (1 to "
                f"{STREAM_VERSION}); resume with the pact-train that wrote it"
            )
        if at.step > steps_per_epoch * s.epochs or at.epoch > s.epochs or at.taken > rows_per_epoch:
            raise TrainError(
                f"{out}/checkpoint: step {at.step}, epoch {at.epoch}, {at.taken} rows into it do not fit this run "
                f"({s.epochs} epoch(s) of {steps_per_epoch} steps and {rows_per_epoch} rows); the checkpoint is "
                "damaged or of another run: delete the run folder and start again, or restore it from a copy"
            )
        if replay is not None and st.get("stream", 1) < 2:  # written when the replay rows came on top of each batch
            at.taken += replay.count(at.epoch * cache.num_rows + at.taken) - replay.count(at.epoch * cache.num_rows)
        if ranks.main:  # metrics after the checkpoint belong to the lost part of the run: drop them
            lines = metrics_path.read_text(errors="replace").splitlines() if metrics_path.exists() else []
            atomic_write_bytes(metrics_path, "".join(line + "\n" for line in lines[: at.step]).encode())
            _log(f"resuming {out} at step {at.step} (epoch {at.epoch}, {at.taken} rows into it)")
    elif ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", record)
        metrics_path.write_text("")
    return Start(optimizer, at, total, steps_per_epoch)


# ----------------------------------------------------------------------------- stage 4: the window loop


@dataclass(frozen=True)
class Collate:
    """How a micro-batch's rows become a batch on the device (padded or packed, with the token mask, row gate
    and replay terms)."""

    pad_id: int
    pad_multiple: int
    mask: object
    gate: RowGate | None
    replay_term: str
    padding_free: bool
    device: str

    def on_host(self, rows):
        """The batch before it moves to the device: what can be read from it without a device sync."""
        return collate(rows, self.pad_id, self.pad_multiple, self.mask, self.gate, self.replay_term, self.padding_free)

    def __call__(self, rows):
        return self.on_host(rows).to(self.device)


def window_backward(
    micro: list, ddp_model, policy: Policy, batch_of: Collate, lam: float, ranks: Ranks, autocast, split: bool = False
):
    """Forward and backward of one window's micro-batches, with one gradient all-reduce, token-weighted over the
    window's response tokens on all ranks (each rank's share, times the rank count: DDP averages). Returns the
    window's cross-entropy sum and term sum over all ranks, the penalty's value (AsFT; 0 without), its
    response tokens and, with ``split`` (``--clip split``), the gradient of the rows no gate anchors kept apart
    (:func:`pact_train.optim.backward_apart`; the parameters' ``.grad`` then hold the anchored rows'), else None."""
    method = policy.loss.method
    n_window = sum(sum(r.steps for r in rows) for _, _, rows in micro)
    ce_tot = term_tot = pen = 0.0
    task_grads = None
    for i, (_, _, global_rows) in enumerate(micro):
        rows, scale = ranks.take(global_rows)
        host = batch_of.on_host(rows)
        batch = host.to(batch_of.device)
        live = online_reference(policy.ref, batch, policy.header, policy.ids) if policy.ref is not None else None
        # one gradient all-reduce per window (split: none here, the two parts are averaged after the window)
        with ranks.no_sync(ddp_model, sync=i == len(micro) - 1 and not split):
            with autocast:
                ce_sum, term_sum, _, *anchored = policy_losses(
                    ddp_model, batch, policy.ids, policy.weights, policy.loss, live, split=split
                )
            weight = scale * ranks.world / n_window
            extra = None
            if policy.factors is not None and i == len(micro) - 1:  # a penalty on the weights: once per step
                penalty = method.penalty(policy.factors)
                extra = lam * penalty  # the same on every rank: DDP's average keeps it
                pen = penalty.item()
            if split:  # CE + lambda * term (the only kind --clip split takes): the two groups' passes apart
                # the task: the CE of the rows no gate anchors; the anchored: their CE and the term (and penalty)
                task, rest = split_window_loss(policy.loss, ce_sum, anchored[0], term_sum, weight)
                rest = rest if extra is None else rest + extra
                # no anchored row and no penalty: that group has no gradient, skip its pass
                has_rest = host.row_gate is None or bool(host.row_gate.any()) or extra is not None  # read on host
                # the task's gradient into task_grads; .grad keeps the anchored rows' of the window so far
                task_grads = backward_apart(task, policy.params, task_grads, retain_graph=has_rest)
                if has_rest:
                    rest.backward()
            else:
                loss = window_loss(policy.loss, ce_sum, term_sum, weight)
                (loss if extra is None else loss + extra).backward()
        ce_tot += scale * ce_sum.item()
        term_tot += scale * term_sum.item()
    if split:
        ranks.mean_split_(policy.params, task_grads)
    ce_tot, term_tot = ranks.sum([ce_tot, term_tot], batch_of.device)
    return ce_tot, term_tot, pen, n_window, task_grads


def window_loop(run: LoopSettings, data: Data, policy: Policy, start: Start, ranks: Ranks, device: str) -> Position:
    """One iteration = one optimizer step over ``--grad-accum`` micro-batches (a window), token-weighted over
    the window's response tokens on all ranks; a metrics line per step, a checkpoint every ``--save-every``.
    Returns where the run stopped."""
    from tqdm.auto import tqdm

    out, at, optimizer, method = data.out, start.at, start.optimizer, policy.loss.method
    global_batch = run.batch_size * ranks.world  # rows per micro-batch over all ranks
    board = open_board(out, at.step) if run.report_to == "tensorboard" and ranks.main else None
    ddp_model = ranks.wrap(policy.model, device)  # rank 0's weights are broadcast to all
    if ranks.world > 1 and ranks.main:
        _log(
            f"data-parallel on {ranks.world} processes ({device.split(':')[0]}): {run.batch_size} rows per process, "
            f"{global_batch * run.grad_accum} per optimizer step"
        )
    # every rank reads the same order; each takes its share of every global micro-batch
    stream = batches(
        data.cache,
        global_batch,
        run.seed,
        run.shuffle,
        start_epoch=at.epoch,
        skip_rows=at.taken,
        buffer_rows=run.shuffle_buffer,
        epochs=run.epochs,
        replay=data.replay,
        group_by_length=run.group_by_length,
    )
    pad_id, pad_multiple = pad_id_for(policy.tok), 8 if device.startswith("cuda") else 1
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    bar = tqdm(
        total=start.total, initial=at.step, unit="step", disable=not (run.progress and ranks.main), dynamic_ncols=True
    )
    last_saved = at.step if data.kind == "resume" else None
    batch_of = Collate(pad_id, pad_multiple, data.mask, data.gate, run.replay_term, policy.padding_free, device)
    policy.model.train()
    done = False
    while at.step < start.total and not done:
        t0 = time.time()
        if ranks.world > 1:  # dropout masks: each rank its own, the same again after a resume
            torch.manual_seed(int(np.random.SeedSequence([run.seed, at.step, ranks.rank]).generate_state(1)[0]))
        micro = []  # (epoch, rows taken in it, rows): a window may run on into the next epoch
        for _ in range(run.grad_accum):
            try:
                micro.append(next(stream))
            except StopIteration:
                done = True
                break
        if not micro:
            break
        lr = run.schedule.at(at.step, start.total, start.steps_per_epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        ce_tot, term_tot, pen, n_window, task_grads = window_backward(
            micro, ddp_model, policy, batch_of, run.lam, ranks, autocast, split=run.clip == "split"
        )
        if not (math.isfinite(ce_tot) and math.isfinite(term_tot) and math.isfinite(pen)):
            bar.close()
            term = f"sum {term_tot}" if policy.factors is None else pen
            raise NonFiniteError(
                at.step + 1,
                f"the loss is not finite (cross-entropy sum {ce_tot}, {method.metric or 'term'} {term})",
                out,
                last_saved,
            )
        # --clip: joint, or split (each group to its own cap)
        norms = clip_gradients(policy.params, task_grads, run.max_grad_norm, run.anchored_max_grad_norm)
        grad_norm = sum(norms.values())
        if not math.isfinite(grad_norm):
            bar.close()
            raise NonFiniteError(at.step + 1, f"the gradient norm is {grad_norm}", out, last_saved)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        at.step, at.epoch, at.taken = at.step + 1, micro[-1][0], micro[-1][1]
        at.tokens_total += n_window
        dt = time.time() - t0
        rec = {
            "step": at.step,
            "epoch": at.epoch,
            "loss": float(method.total(ce_tot, term_tot, run.lam)) / n_window + run.lam * pen,
            "ce": ce_tot / n_window,
        }
        if method.metric:  # the method's term, under its own name (a penalty: its value at this step)
            rec[method.metric] = term_tot / n_window if policy.factors is None else pen
        rec.update({"lr": lr, "tokens": n_window, "tokens_total": at.tokens_total, **norms, "step_time_s": dt})
        if ranks.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if board is not None:
                for key, value in rec.items():
                    if key != "step":
                        board.add_scalar(f"train/{key}", value, at.step)
        shown = {method.metric: f"{rec[method.metric]:.4f}"} if method.metric else {}
        bar.set_postfix(loss=f"{rec['loss']:.3f}", **shown, tok_s=f"{n_window / dt:.0f}")
        bar.update(1)
        if at.step % run.save_every == 0 and at.step < start.total and ranks.main:
            save_checkpoint(out / "checkpoint", policy.model, optimizer, at.state(data.cache.cache_id))
            last_saved = at.step
    bar.close()
    if board is not None:
        board.close()
    if at.step == 0:
        raise TrainError(f"{data.cache.url}: no batch could be made")
    return at


# ----------------------------------------------------------------------------- stage 5: finish


def finish(o: Outputs, data: Data, policy: Policy, optimizer, at: Position, ranks: Ranks) -> dict:
    """Rank 0 writes the last checkpoint, the adapter (or the model), ``--merge``'s merged model and the plot."""
    out = data.out
    final = out / ("model" if o.full else "adapter")
    summary = {"out": str(out), "steps": at.step, "final": str(final)}
    if not ranks.main:
        ranks.barrier()  # rank 0 writes the outputs
        return {**summary, "main": False}
    save_checkpoint(out / "checkpoint", policy.model, optimizer, at.state(data.cache.cache_id))
    with staged_dir(final, replace=True) as tmp:
        policy.model.save_pretrained(tmp, safe_serialization=True)
        policy.tok.save_pretrained(tmp)
    if o.merge and not o.full:
        merged = merged_model(o, policy.model, final)
        with staged_dir(out / "merged", replace=True) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            policy.tok.save_pretrained(tmp)
    if o.plot:
        plot_metrics(out / "metrics.jsonl", out / "loss.png", policy.loss.method.metric)
    ranks.barrier()
    return summary


def merged_model(o: Outputs, model, adapter: Path):
    """The base with the adapter merged in. A quantized base cannot hold the merged weights, so the adapter
    just written is merged into a 16-bit copy of the base, loaded on the CPU (bf16; the 4- or 8-bit base
    would round the merged weights again)."""
    if o.quantize == "none":
        return model.merge_and_unload()
    from peft import PeftModel

    from pact_cache.models import from_pretrained, resolve_model

    _log(f"--merge with --quantize {o.quantize}: merging the adapter into a bf16 copy of the base, on the CPU")
    base = from_pretrained(resolve_model(o.model), torch.bfloat16, "cpu")
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def tensorboard_writer():
    """torch's SummaryWriter class, or one line naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError(
            "--report-to tensorboard: the tensorboard package is not installed; pip install "
            "'pact-cache[tensorboard]' (or leave --report-to none)"
        ) from None
    return SummaryWriter


def open_board(out: Path, step: int):
    """A TensorBoard writer on ``OUT/tensorboard`` (flushed every few seconds, so the curves are live);
    on a resume, events after ``step`` (the lost part of the run) are dropped, as metrics.jsonl's lines are."""
    return tensorboard_writer()(str(out / "tensorboard"), purge_step=step or None, flush_secs=5)


def plot_metrics(metrics_path: Path, png: Path, metric: str | None = None) -> None:
    """Loss and cross-entropy per step, and the method's term (``metric``) beside them when it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(1, 2 if metric else 1, figsize=(10 if metric else 5.5, 3.6), squeeze=False)
    ax = ax[0]
    ax[0].plot(steps, [r["loss"] for r in recs], label="loss")
    ax[0].plot(steps, [r["ce"] for r in recs], label="cross-entropy")
    ax[0].set_xlabel("optimizer step")
    ax[0].legend()
    if metric:
        ax[1].plot(steps, [r.get(metric, float("nan")) for r in recs], color="C2")
        ax[1].set_xlabel("optimizer step")
        ax[1].set_title(metric)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
