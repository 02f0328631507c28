"""The loss core: one micro-batch of a training stack's model -> ``(CE sum, method term sum)``.

Shared by pact-train's loop (:mod:`pact_train.loop`) and the Trainer integration (:mod:`pact_train.hf`),
so that both compute the same numbers: the model is called once, through whatever wraps it; the
decoder's last hidden state is projected at the response positions only, by the model's own
projection (:mod:`pact_cache.projection`), a chunk at a time; the method (:mod:`pact_train.losses`)
turns the policy's values and the reference's into its term. Also here: the online reference (the
paper's way: a live reference model computes the cache's columns) and the LoRA factors a parameter
penalty reads (AsFT).
"""

from __future__ import annotations

import torch

from pact_cache.projection import Projection, causal_lm, response_logprobs
from pact_cache.rows import right_pad

from .losses import LossParams, Steps
from .stream import Batch

__all__ = [
    "causal_lm",
    "chunked_projection",
    "policy_losses",
    "window_loss",
    "online_reference",
    "lora_direction_factors",
]


def _chunk_projection(proj: Projection, h, targets, ids):
    logits = proj.logits(h)  # (n, V) float32: lives only inside this chunk; recomputed in backward
    lse = torch.logsumexp(logits, dim=-1)
    # index_select rather than logits[:, ids]: same values, fewer CUDA kernels in backward
    return logits.gather(1, targets[:, None])[:, 0] - lse, logits.index_select(1, ids), lse


def chunked_projection(
    proj: Projection, h: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's projection at the response positions, a chunk at a time, with gradient.

    proj:    the model's :class:`pact_cache.projection.Projection` (its head and post-head transform)
    h:       (N, H) hidden states at the N response positions
    targets: (N,) the response tokens; ids: (K,) the safety tokens
    Returns float32 ``(target log-probs (N,), logits of S (N, K), logsumexp of all logits (N,))``;
    the cross-entropy is minus the sum of the first. Each chunk of ``chunk`` positions is
    activation-checkpointed, so at most one ``(chunk, V)`` float32 block of logits exists at a time,
    in forward and in backward.
    """
    from torch.utils.checkpoint import checkpoint

    outs = [
        checkpoint(_chunk_projection, proj, h[c0 : c0 + chunk], targets[c0 : c0 + chunk], ids, use_reentrant=False)
        for c0 in range(0, h.shape[0], chunk)
    ]
    if not outs:
        z = h.new_zeros((0,), dtype=torch.float32)
        return z, h.new_zeros((0, ids.numel()), dtype=torch.float32), z
    return tuple(torch.cat(parts) for parts in zip(*outs))


def _no_logits_kwargs(lm, device) -> dict:
    """Ask the model for logits at no position (the loss makes its own, a chunk at a time); models
    without ``logits_to_keep`` make all of them, which costs memory but not correctness."""
    import inspect

    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        return {"logits_to_keep": torch.zeros(0, dtype=torch.long, device=device)}
    return {}


def policy_losses(
    model,
    batch: Batch,
    ids: torch.Tensor,
    weights: torch.Tensor,
    params: LossParams,
    ref: dict | None = None,
    split: bool = False,
):
    """Returns ``(ce_sum, term_sum, n_steps)`` for one micro-batch (sums: the caller divides them once);
    ``term_sum`` is ``params.method``'s term, zero for plain SFT. ``ref`` holds a live reference's
    columns (:func:`online_reference`); by default the batch's cached ones are used. With ``split``
    (``--clip split``) a fourth value: the part of ``ce_sum`` on the anchored rows, each row's cross-entropy
    times its row gate (all of it where the batch has no gate).

    ``model`` is what the training stack holds: a transformers causal LM, possibly under PEFT and
    under DDP / FSDP / DeepSpeed. It is called once, through all its wrappers (so that they can
    synchronise gradients and gather sharded weights), asking for no logits; a forward hook on the
    decoder keeps its last hidden state (B, L, H) and a forward hook on the causal LM computes the
    losses while the output projection is in place, returning them as the output's ``loss``. Over
    the N response positions, in chunks of ``logits_chunk``, the projection gives the cross-entropy
    and the K safety-token logits; each chunk is activation-checkpointed, so at most one
    (chunk, V) float32 block of logits exists at a time, in forward and in backward.
    """
    lm = causal_lm(model)
    kept = {}

    def keep_hidden(_module, _args, output):
        kept["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def add_losses(_module, _args, output):
        output["loss"] = torch.stack(
            _losses_from_hidden(Projection.of(lm), kept.pop("hidden"), batch, ids, weights, params, ref, split)
        )
        return output

    hooks = [lm.get_decoder().register_forward_hook(keep_hidden), lm.register_forward_hook(add_losses)]
    try:
        out = model(
            **batch.model_inputs(), use_cache=False, return_dict=True, **_no_logits_kwargs(lm, batch.input_ids.device)
        )
    finally:
        for h in hooks:
            h.remove()
    if split:
        return out.loss[0], out.loss[1], batch.step_mask.sum(), out.loss[2]
    return out.loss[0], out.loss[1], batch.step_mask.sum()


def _losses_from_hidden(
    proj: Projection, hidden, batch: Batch, ids, weights, params: LossParams, ref: dict | None, split: bool = False
):
    """``(ce_sum, term_sum)`` from the decoder's last hidden state (B, L, H), or (1, N, H) packed; with
    ``split`` also the anchored rows' part of ``ce_sum`` (:func:`policy_losses`)."""
    method = params.method
    B, T = batch.step_mask.shape
    bidx, tidx = batch.step_mask.nonzero(as_tuple=True)  # (N,), row-major: matches (B, T) order
    h = batch.hidden_at(hidden, bidx, batch.response_start[bidx] - 1 + tidx)  # (N, H)
    target_lp, sel, lse = chunked_projection(proj, h, batch.targets[bidx, tidx], ids, params.logits_chunk)
    keep = batch.loss_mask  # --token-mask: the selected tokens leave the CE (or the term that replaces it)
    ce_lp = target_lp if keep is None else target_lp * keep[bidx, tidx]
    if batch.ce_weight is not None:  # --replay-term term: replay rows leave the CE
        ce_lp = ce_lp * batch.ce_weight.to(ce_lp.dtype)[bidx]
    ce_sum = -ce_lp.sum()
    anchored = ()
    if split:  # the anchored rows' share of the CE: each row's times its gate (every row without one)
        gate = batch.row_gate
        anchored = (ce_sum if gate is None else -(ce_lp * gate.to(ce_lp.dtype)[bidx]).sum(),)
    if method.term is None or (method.with_ce and params.lam == 0):
        return ce_sum, ce_sum.new_zeros(()), *anchored

    def steps(x, *rest):  # (N, *rest) -> (B, T, *rest), zeros at padded steps
        return x.new_zeros((B, T, *rest)).index_put((bidx, tidx), x)

    mask = batch.step_mask if keep is None or method.with_ce else batch.step_mask & keep
    if (
        batch.row_gate is not None
    ):  # --row-gate, --replay: each row's steps weigh g in the term (a float mask; g = 1 is exact)
        mask = mask.to(torch.float32) * batch.row_gate.to(torch.float32)[:, None]
    s = Steps(
        mask,
        steps(sel, len(ids)),
        steps(lse),
        steps(target_lp),
        weights,
        batch.reference(method.columns) if ref is None else {c: ref[c] for c in method.columns},
    )
    return ce_sum, method.term(s, params), *anchored


def window_loss(params: LossParams, ce_sum: torch.Tensor, term_sum: torch.Tensor, weight: float) -> torch.Tensor:
    """A micro-batch's loss as both training paths backpropagate it: the method's total over the micro-batch's
    steps (``CE + lambda * term``, or its own loss: :meth:`pact_train.losses.Method.total`) times ``weight``, the
    micro-batch's share of its window (pact-train: its rank's share over the window's response tokens; the
    Trainer: one over the batch's items)."""
    return params.method.total(ce_sum, term_sum, params.lam) * weight


def split_window_loss(
    params: LossParams, ce_sum: torch.Tensor, anchored_ce: torch.Tensor, term_sum: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`window_loss` in the two groups ``--clip split`` backpropagates apart: ``(task, anchored)``, the
    cross-entropy of the rows no gate anchors, and the anchored rows' cross-entropy (``anchored_ce``, from
    :func:`policy_losses` with ``split``) with the method's term; their sum is ``window_loss``."""
    return (ce_sum - anchored_ce) * weight, window_loss(params, anchored_ce, term_sum, weight)


@torch.no_grad()
def online_reference(ref, batch: Batch, header: list[int], ids: torch.Tensor) -> dict:
    """The paper's way: a live reference computes, at the response steps, the cache's columns:
    ``full``, ``post`` (B, T, K) log-probs of S and ``target`` (B, T) the log-prob of the response
    token, with the same projection as the build (:func:`pact_cache.projection.response_logprobs`)."""
    B, T = batch.step_mask.shape
    dev = batch.input_ids.device
    bidx, tidx = batch.step_mask.nonzero(as_tuple=True)
    steps = batch.step_mask.sum(1)
    # the reference runs padded, whichever form the policy's batch has
    input_ids, attention_mask = batch.padded_inputs()
    full_sel, target = response_logprobs(
        ref, input_ids, attention_mask, bidx, batch.response_start[bidx] - 1 + tidx, ids, batch.targets[bidx, tidx]
    )
    post_seqs = [
        header + input_ids[b, batch.response_start[b] : batch.response_start[b] + steps[b] - 1].tolist()
        for b in range(B)
    ]
    post_ids, post_mask = right_pad(post_seqs, device=dev)
    post_sel, _ = response_logprobs(ref, post_ids, post_mask, bidx, len(header) - 1 + tidx, ids)
    K = ids.numel()

    def grid(x, *rest):
        return torch.zeros((B, T, *rest), device=dev).index_put((bidx, tidx), x.to(dev))

    return {"full": grid(full_sel, K), "post": grid(post_sel, K), "target": grid(target)}


def lora_direction_factors(model, direction) -> list:
    """``(A, B, P, norm)`` for every LoRA module of ``model``, with ``P`` and ``norm`` from a
    :class:`pact_cache.direction.Direction` (moved to the module's device): what a method's
    ``penalty`` takes (:func:`pact_train.losses.asft_penalty`). ``A`` and ``B`` are the live parameters."""
    from pact_cache.direction import DirectionError

    out, missing = [], []
    for name, mod in causal_lm(model).named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_A", {}):
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            if name not in direction.factors:
                missing.append(name)
                continue
            P, norm = direction.factors[name]
            if P.shape[0] != B.shape[0]:
                raise DirectionError(
                    f"{name}: the direction file's V has {P.shape[0]} rows, the layer has "
                    f"{B.shape[0]} outputs; "
                    "it was made for another model"
                )
            out.append((A, B, P.to(B.device), norm.to(B.device)))
    if missing:
        raise DirectionError(
            f"the direction file has no entry for {len(missing)} LoRA module(s) (e.g. {missing[0]}); "
            f"make it "
            "with `pact-cache direction --modules` naming every --lora-targets module"
        )
    if not out:
        raise DirectionError("the model has no LoRA module for the direction to regularise")
    return out
