"""Loss functions: pure, shape-documented, each tested against a naive re-implementation.

Layout: a batch of B examples, each with its response steps packed from step 0, padded to T
steps; ``mask`` (B, T) marks real steps. K is the number of safety tokens. Every function here
returns a *sum* over valid steps plus the count, so that chunked work is summed per chunk and
divided once by the global count of valid steps (as torchtune's losses do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PactParams:
    """Defaults are the paper's (``finetuning_pact.py``)."""

    T: float = 2.0  # distillation temperature
    T_gate: float = 1.0  # temperature of the gate's competitive index
    top_p: float = 0.9
    alpha: float = 2.0
    bias: float = 0.0
    N: int = 8  # steps before the gate starts to decay
    tau: float = 8.0  # decay constant of the gate after N steps
    boost: float = 1.0


def top_p_count(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Number of sorted probabilities needed for the cumulative sum to reach ``top_p``.

    probs: (..., K) -> (...) float, in 1..K (``(cdf < top_p).sum() + 1``, as the paper's code).
    """
    cdf = probs.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return ((cdf < top_p).sum(dim=-1) + 1).to(probs.dtype)


@torch.no_grad()
def pact_gate(policy: torch.Tensor, post: torch.Tensor, p: PactParams) -> torch.Tensor:
    """Mixing weight c_t of the prompt-free (post) view; no gradient flows through it.

    policy: (B, T, K) policy logits (or log-probs) on S; post: (B, T, K) reference post-view
    log-probs. Returns (B, T): sigmoid(alpha * (I(policy) - I(post) - bias)) * decay(t) * boost,
    with I(x) = top_p_count(softmax(x / T_gate)) / K and decay(t) = exp(-max(t - N, 0) / tau).
    """
    K = policy.shape[-1]
    i_pol = top_p_count(torch.softmax(policy.float() / p.T_gate, dim=-1), p.top_p) / K
    i_post = top_p_count(torch.softmax(post.float() / p.T_gate, dim=-1), p.top_p) / K
    c = torch.sigmoid(p.alpha * (i_pol - i_post - p.bias))
    t = torch.arange(policy.shape[1], device=policy.device, dtype=torch.float32)
    if p.tau > 0:
        decay = torch.exp(-(t - p.N).clamp_min(0.0) / p.tau)
    else:  # the paper's code: a hard prefix window when tau <= 0
        decay = (t < p.N).float()
    return c * decay[None, :] * p.boost


def pact_kl(policy: torch.Tensor, full: torch.Tensor, post: torch.Tensor, weights: torch.Tensor,
            mask: torch.Tensor, p: PactParams = PactParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """PACT's safety-token KL, summed over valid steps.

    policy:  (B, T, K) policy logits restricted to S (gradients flow through these)
    full:    (B, T, K) reference log-probs of S with the full context  (a_t)
    post:    (B, T, K) reference log-probs of S with the post-only context (b_t)
    weights: (K,) safety-token weights; clamped at 0
    mask:    (B, T) bool, True at real response steps
    Returns ``(sum over valid steps of kl_t, number of valid steps)`` where
    ``m_t = (1 - c_t) a_t + c_t b_t``, ``q_t = normalise(softmax(m_t / T) * w)`` and
    ``kl_t = T^2 * sum_s q_t[s] (log q_t[s] - log_softmax(z_t / T)[s])``.
    """
    policy = policy.float()
    full, post = full.float(), post.float()
    c = pact_gate(policy.detach(), post, p).unsqueeze(-1)  # (B, T, 1)
    mix = (1.0 - c) * full + c * post
    w = weights.float().clamp_min(0.0).view(1, 1, -1)
    q = torch.softmax(mix / p.T, dim=-1) * w
    q = q / q.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    log_q = q.clamp_min(1e-12).log()
    log_p = F.log_softmax(policy / p.T, dim=-1)
    kl = (q * (log_q - log_p)).sum(dim=-1) * (p.T ** 2)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum(), m.sum()


@dataclass(frozen=True)
class LossParams:
    """What the loss core needs from a run, and nothing else (pact-train and other trainers build it)."""

    method: str = "pact"  # pact | sft
    lam: float = 1.0  # weight of the method's term against the cross-entropy
    pact: PactParams = PactParams()
    logits_chunk: int = 1024  # response positions per (positions, vocab) block of logits


def _chunk_ce_and_selected(head, h, targets, ids):
    logits = head(h).float()  # (n, V): lives only inside this chunk; recomputed in backward
    # index_select rather than logits[:, ids]: same values, fewer CUDA kernels in backward
    return F.cross_entropy(logits, targets, reduction="sum"), logits.index_select(1, ids)


def chunked_ce_and_selected(head, h: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor,
                            chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the response tokens and the policy's logits on S, a chunk at a time.

    head:    the output projection (H -> V), a module
    h:       (N, H) hidden states at the N response positions
    targets: (N,) the response tokens; ids: (K,) the safety tokens
    Returns ``(sum over N of -log p(target), float32; (N, K) float32 logits of S)``. Each chunk of
    ``chunk`` positions is activation-checkpointed, so at most one ``(chunk, V)`` float32 block of
    logits exists at a time, in forward and in backward; the sums are over all chunks, divided by
    the caller once (by the token count of the accumulation window).
    """
    from torch.utils.checkpoint import checkpoint

    ce_sum = h.new_zeros((), dtype=torch.float32)
    sels = []
    for c0 in range(0, h.shape[0], chunk):
        ce_c, sel_c = checkpoint(_chunk_ce_and_selected, head, h[c0:c0 + chunk], targets[c0:c0 + chunk], ids, use_reentrant=False)
        ce_sum = ce_sum + ce_c
        sels.append(sel_c)
    sel = torch.cat(sels) if sels else h.new_zeros((0, ids.numel()), dtype=torch.float32)
    return ce_sum, sel
