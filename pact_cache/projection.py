"""One projection: a decoder's last hidden state to logits, exactly as the model's own forward makes them.

Every place that turns hidden states into log-probs goes through :class:`Projection`: the build
(the cached reference values), the trainer's chunked loss core, the online reference, the TOSS
scorer and pact-eval's drift. None of them asks the model for its full ``(B, L, V)`` logits; each
runs the decoder, takes the hidden states at the response positions, and projects those, a chunk
at a time. That saves memory, but it bypasses what a causal LM does after its output layer, which
differs by family:

=====================================  ==============================================================
model families (``config.model_type``)  what the causal LM does to ``lm_head(h)``
=====================================  ==============================================================
Gemma 2/3/3n/4, VaultGemma, nanochat,   ``tanh(logits / c) * c`` with ``c = config.final_logit_softcapping``
T5Gemma, any config with that field
Cohere, Cohere2                         ``logits * config.logit_scale``
Granite, GraniteMoE (all variants),     ``logits / config.logits_scaling`` (MiniCPM3 divides the hidden
MiniCPM3                                state, which is the same for a bias-free head)
HyperCLOVA X                            ``logits * config.logits_scaling``
Falcon-H1                               ``logits * model.lm_head_multiplier``
=====================================  ==============================================================

Anything not in this table is checked rather than assumed: :func:`check_projection` runs the
model's own forward on one short sequence and compares its logits with the projection's, and a
mismatch stops the command with one line naming the model class (:class:`ProjectionError`) rather
than training on, or caching, other logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .data import Example
from .errors import ModelError
from .format import RowResult

LOGITS_CHUNK = 1024  # response positions per (positions, vocab) block of logits when a loss projects them

# Bytes of float32 logits one projection chunk may hold (inference: the build, the scorer, eval)
LOGITS_CHUNK_BYTES = 64 << 20  # bound on the one (positions, vocab) float32 block alive at a time


class ProjectionError(ModelError):
    """The hidden-state projection does not reproduce the model's own logits."""


def causal_lm(model):
    """The transformers causal LM inside any wrappers: DDP, FSDP or DeepSpeed (``.module``) and PEFT
    (LoRA layers are injected in place, so the base model holds them)."""
    import torch

    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _config(lm):
    cfg = lm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _transform(lm) -> tuple[str, float | None]:
    """``(kind, constant)`` of what the causal LM applies to ``lm_head(h)``: ``softcap``, ``scale``
    (multiply) or ``none``."""
    cfg = _config(lm)
    mt = str(getattr(cfg, "model_type", "") or "")
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        return "softcap", float(cap)
    if mt.startswith("cohere") and getattr(cfg, "logit_scale", None) is not None:
        return "scale", float(cfg.logit_scale)
    if (mt.startswith("granite") or mt == "minicpm3") and getattr(cfg, "logits_scaling", None):
        return "scale", 1.0 / float(cfg.logits_scaling)
    if mt.startswith("hyperclovax") and getattr(cfg, "logits_scaling", None) is not None:
        return "scale", float(cfg.logits_scaling)
    if mt == "falcon_h1":
        mult = getattr(getattr(lm, "model", None), "lm_head_multiplier", None)
        if mult is not None:
            return "scale", float(mult)
    return "none", None


@dataclass(frozen=True)
class Projection:
    """``logits(h)``: hidden states ``(..., H)`` -> float32 logits ``(..., V)``, the model's own.

    ``head`` is the model's output layer module (under PEFT, device-map hooks or any wrapper: it is
    called, never bypassed); ``kind``/``constant`` the post-head transform (module docstring)."""

    head: Any  # torch.nn.Module
    kind: str = "none"
    constant: float | None = None

    @classmethod
    def of(cls, model) -> "Projection":
        lm = causal_lm(model)
        kind, const = _transform(lm)
        return cls(lm.get_output_embeddings(), kind, const)

    @property
    def vocab_rows(self) -> int:
        return int(self.head.weight.shape[0])

    def logits(self, h):
        import torch

        x = self.head(h).float()
        if self.kind == "softcap":
            return torch.tanh(x / self.constant) * self.constant
        if self.kind == "scale":
            return x * self.constant
        return x

    def describe(self) -> str:
        if self.kind == "softcap":
            return f"tanh(logits / {self.constant:g}) * {self.constant:g}"
        if self.kind == "scale":
            return f"logits * {self.constant:g}"
        return "the head's logits as they are"


def response_logprobs(
    model, input_ids, attention_mask, bidx, pos, ids, targets=None, chunk_bytes: int = LOGITS_CHUNK_BYTES
):
    """The model's log-probs at chosen positions, without its full logits (no gradient; inference).

    input_ids, attention_mask: (B, L); bidx, pos: (N,) the row and position of each wanted step;
    ids: (K,) the safety tokens; targets: (N,) the next token at each step, or None.
    Returns float32 ``(log-probs of S (N, K), log-probs of the targets (N,) or None)``, on the output
    layer's device. The decoder runs once on the batch; the projection and log-softmax run only on
    the N positions, in chunks of at most ``chunk_bytes`` of float32 logits.
    """
    import torch

    lm = causal_lm(model)
    proj = Projection.of(lm)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    h = hidden[bidx.to(hidden.device), pos.to(hidden.device)]  # (N, H); under a device map, on the last layer's device
    del hidden
    w = proj.head.weight
    out_device = w.device if w.device.type != "meta" else h.device  # an offloaded head: its hooks bring it
    ids = ids.to(out_device)
    targets = targets.to(out_device) if targets is not None else None
    chunk = max(1, chunk_bytes // (4 * proj.vocab_rows))
    sel, tgt = [], []
    for c0 in range(0, h.shape[0], chunk):
        logits = proj.logits(h[c0 : c0 + chunk]).to(out_device)  # (n, V) float32
        lse = torch.logsumexp(logits, dim=-1)
        sel.append(logits.index_select(1, ids) - lse[:, None])
        if targets is not None:
            tgt.append(logits.gather(1, targets[c0 : c0 + chunk, None])[:, 0] - lse)
        del logits
    K = ids.numel()
    sel_t = torch.cat(sel) if sel else torch.zeros((0, K), device=out_device)
    tgt_t = (torch.cat(tgt) if tgt else torch.zeros((0,), device=out_device)) if targets is not None else None
    return sel_t, tgt_t


def check_projection(model, device=None, what: str = "") -> Projection:
    """Refuse a model whose own logits the projection does not reproduce.

    Runs the causal LM's forward on one short sequence (8 tokens) and the decoder plus
    :class:`Projection` on the same, and compares their logits at every position. Tolerance: 1e-3
    (absolute plus relative) in float32, 3% for 16-bit weights, whose rounding differs between the
    two paths. A model whose weights are not materialised here (meta device, ZeRO-3 partitions) is
    not checked. Returns the projection.
    """
    import torch

    with torch.no_grad():
        return _check(model, device, what)


def _check(model, device, what):
    import torch

    lm = causal_lm(model)
    proj = Projection.of(lm)
    w = proj.head.weight
    if w.device.type == "meta" or w.numel() == 0:
        return proj
    emb = lm.get_input_embeddings().weight
    dev = device if device is not None else (emb.device if emb.device.type != "meta" else w.device)
    V = min(proj.vocab_rows, int(emb.shape[0]))
    n = 8
    ids = (torch.arange(n, dtype=torch.long) * 7919 + 3) % max(V, 1)
    ids = ids[None, :].to(dev)
    mask = torch.ones_like(ids)
    was_training = lm.training
    lm.eval()
    try:
        theirs = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[0]
        ours = proj.logits(hidden).to(theirs.device)
    finally:
        lm.train(was_training)
    half = w.dtype in (torch.float16, torch.bfloat16)
    tol = 3e-2 if half else 1e-3
    if ours.shape != theirs.shape:
        bad = f"shape {tuple(ours.shape)} vs the model's {tuple(theirs.shape)}"
    else:
        err = ((ours - theirs).abs() / (1.0 + theirs.abs())).max().item()
        if math.isfinite(err) and err <= tol:
            return proj
        bad = f"relative difference {err:.3g} (tolerance {tol:g})"
    name = type(lm).__name__
    raise ProjectionError(
        f"{what + ': ' if what else ''}{name}: the logits pact-cache computes from the decoder's "
        f"hidden state "
        f"({proj.describe()}) differ from {name}'s own forward ({bad}); its output head does "
        f"something "
        "pact-cache does not reproduce, so caching or training on it would use other log-probs. "
        "Please report the model class (pact_cache/projection.py lists the supported head "
        "transforms)"
    )


# ----------------------------------------------------------------------------- the reference's values


def reference_logprobs(
    model, seqs: list[list[int]], starts: list[int], counts: list[int], ids, device, want_target: bool
):
    """Log-probs of the safety tokens (and of the next token) at the response positions.

    For sequence b and step t < counts[b], the position ``starts[b] - 1 + t`` predicts token
    ``seqs[b][starts[b] + t]``. Returns per sequence ``(sel (n, K), target (n,) or None)``, float32
    numpy. The backbone runs once on the padded batch ``(B, L)``; the model's own projection
    (:mod:`pact_cache.projection`) and log-softmax run only on the ``N = sum(counts)`` response
    positions, in chunks of at most LOGITS_CHUNK_BYTES of float32 logits, so no ``(B, L, V)``
    float32 tensor exists.
    """
    import torch

    from .rows import right_pad

    input_ids, mask = right_pad(seqs)
    bidx = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    pidx = torch.cat([torch.arange(st - 1, st - 1 + n) for st, n in zip(starts, counts)])
    targets = input_ids[bidx, pidx + 1] if want_target else None
    sel, tgt = response_logprobs(
        model,
        input_ids.to(device),
        mask.to(device),
        bidx,
        pidx,
        torch.as_tensor(ids),
        targets,
        chunk_bytes=LOGITS_CHUNK_BYTES,
    )
    sel = sel.cpu().numpy()
    tgt = tgt.cpu().numpy() if want_target else None
    out, o = [], 0
    for n in counts:
        out.append((sel[o : o + n], tgt[o : o + n] if want_target else None))
        o += n
    return out


def compute_rows(
    model, examples: list[Example], ids, header: list[int], batch_size: int, device, on_tokens=None
) -> list[RowResult]:
    """Both views and the target for every example; results in the order of ``examples``."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    results: list[RowResult | None] = [None] * len(examples)
    with torch.inference_mode():
        for b0 in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[b0 : b0 + batch_size]]
            counts = [ex.steps for ex in batch]
            full = reference_logprobs(
                model, [ex.input_ids for ex in batch], [ex.response_start for ex in batch], counts, ids, device, True
            )
            post_seqs = [header + ex.input_ids[ex.response_start : -1] for ex in batch]
            post = reference_logprobs(model, post_seqs, [len(header)] * len(batch), counts, ids, device, False)
            for j, i in enumerate(order[b0 : b0 + batch_size]):
                ex = examples[i]
                results[i] = RowResult(
                    ex.example_id,
                    ex.input_ids,
                    ex.response_start,
                    {"full": full[j][0], "post": post[j][0], "target": full[j][1]},
                )
            if on_tokens:
                on_tokens(sum(len(s) for s in post_seqs) + sum(len(ex.input_ids) for ex in batch))
    return results  # type: ignore[return-value]
