"""Loss functions: pure, shape-documented, each tested against a naive re-implementation.

Layout: a batch of B examples, each with its response steps packed from step 0, padded to T
steps; ``mask`` (B, T) marks real steps. K is the number of safety tokens. Every function here
returns a *sum* over valid steps plus the count, so that chunked work is summed per chunk and
divided once by the global count of valid steps (as torchtune's losses do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from pact_cache.columns import COLUMN_NAMES
from pact_cache.projection import LOGITS_CHUNK


@dataclass(frozen=True)
class PactParams:
    """Defaults are the paper's (``finetuning_pact.py``); each field's help and range are declared
    here, once (pact-train's ``--pact-*`` options and their checks come from them)."""

    T: float = field(
        default=2.0,
        metadata=dict(
            help="distillation temperature T", lo=0, lo_open=True, why="the distillation temperature divides the logits"
        ),
    )
    T_gate: float = field(
        default=1.0,
        metadata=dict(
            help="temperature of the gate's competitive index",
            lo=0,
            lo_open=True,
            why="the gate's temperature divides the logits",
        ),
    )
    top_p: float = field(
        default=0.9,
        metadata=dict(help="probability mass the competitive index counts tokens to", lo=0, hi=1, lo_open=True),
    )
    alpha: float = field(default=2.0, metadata=dict(help="gate slope"))
    bias: float = field(default=0.0, metadata=dict(help="gate bias"))
    N: int = field(default=8, metadata=dict(help="response steps before the gate decays", lo=0, integer=True))
    tau: float = field(
        default=8.0,
        metadata=dict(
            help="decay constant of the gate after N steps", why="tau <= 0 is the paper's hard window of N steps"
        ),
    )
    boost: float = field(default=1.0, metadata=dict(help="gate multiplier", lo=0))


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


def pact_kl(
    policy: torch.Tensor,
    full: torch.Tensor,
    post: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    p: PactParams = PactParams(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """PACT's safety-token KL, summed over valid steps.

    policy:  (B, T, K) policy logits restricted to S (gradients flow through these)
    full:    (B, T, K) reference log-probs of S with the full context  (a_t)
    post:    (B, T, K) reference log-probs of S with the post-only context (b_t)
    weights: (K,) safety-token weights; clamped at 0
    mask:    (B, T) bool, True at real response steps (or float32 weights per step: --row-gate)
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
    kl = (q * (log_q - log_p)).sum(dim=-1) * (p.T**2)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum(), m.sum()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for log-probabilities ``x``, stable at both ends (Maechler's split at
    -log 2); ``x`` is clamped to at most -1e-6, so a mass of (numerically) 1 gives log(1e-6) rather
    than -inf."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def with_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """(..., K) full-vocabulary log-probs of S -> (..., K + 1): S and "everything outside S",
    whose log-prob is ``log(1 - sum_s p(s))``."""
    return torch.cat([logprobs, log1mexp(logprobs.logsumexp(dim=-1, keepdim=True))], dim=-1)


def pact_rest_kl(
    policy_logprobs: torch.Tensor,
    full: torch.Tensor,
    post: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    p: PactParams = PactParams(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """PACT over K + 1 categories: S and the rest of the vocabulary, summed over valid steps.

    policy_logprobs: (B, T, K) the policy's log-probs of S normalised over the whole vocabulary
                     (logits of S minus the logsumexp of all logits; gradients flow through both)
    full, post:      (B, T, K) the reference's full-vocabulary log-probs of S, two views (the cache's)
    weights:         (K,) safety-token weights, clamped at 0
    mask:            (B, T) bool (or float32 weights per step: --row-gate)
    Each distribution gets a (K+1)-th category, the rest, ``log(1 - sum_s p(s))`` (:func:`with_rest`).
    The gate ``c_t`` is PACT's (over S). The reference's K + 1 log-probs of the two views are mixed,
    ``m_t = (1 - c_t) a'_t + c_t b'_t``, and renormalised; ``r_t`` is the mixture's mass outside S.
    The target keeps that mass and shapes S as PACT does:
    ``q_t = ((1 - r_t) * normalise(softmax(m_t[S] / T) * w), r_t)`` -- on S exactly ``pact``'s target
    (weights and temperature act within S only; they never move mass between S and the rest). The
    policy's distribution is built the same way: ``p_t = ((1 - rho_t) * softmax(z_t / T), rho_t)``
    with ``z_t`` its log-probs of S and ``rho_t`` its mass outside S. Then
    ``kl_t = T^2 KL(q_t || p_t) = T^2 ((1 - r_t) KL_S + KL(Bernoulli(r_t) || Bernoulli(rho_t)))``:
    PACT's KL within S, weighed by how much the reference uses S at that step, plus a term that holds
    the policy's total probability on S at the reference's. Unlike ``pact``, probability the policy
    moves from S to other tokens (a refusal's "I" to "Sure") is penalised; and unlike a weighted
    softmax over K + 1 categories, no weight can push the policy's mass on S above the reference's.
    Returns ``(sum, count)``.
    """
    policy_logprobs = policy_logprobs.float()
    full, post = full.float(), post.float()
    c = pact_gate(policy_logprobs.detach(), post, p).unsqueeze(-1)
    mix = (1.0 - c) * with_rest(full) + c * with_rest(post)  # (B, T, K + 1)
    ref = F.log_softmax(mix, dim=-1)
    w = weights.float().clamp_min(0.0).view(1, 1, -1)
    q_s = torch.softmax(mix[..., :-1] / p.T, dim=-1) * w
    q_s = q_s / q_s.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # PACT's target within S
    ref_in = ref[..., :-1].logsumexp(dim=-1, keepdim=True)  # log (1 - r_t)
    log_q = torch.cat([ref_in + q_s.clamp_min(1e-12).log(), ref[..., -1:]], dim=-1)
    q = torch.cat([ref_in.exp() * q_s, ref[..., -1:].exp()], dim=-1)
    pol_in = policy_logprobs.logsumexp(dim=-1, keepdim=True)  # log (1 - rho_t)
    log_p = torch.cat([pol_in + F.log_softmax(policy_logprobs / p.T, dim=-1), log1mexp(pol_in)], dim=-1)
    kl = (q * (log_q - log_p)).sum(dim=-1) * (p.T**2)
    m = mask.to(kl.dtype)
    return (kl * m).sum(), m.sum()


def pact_ref_kl(
    policy_logprobs: torch.Tensor,
    full: torch.Tensor,
    post: torch.Tensor,
    mask: torch.Tensor,
    p: PactParams = PactParams(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """PACT-rest toward the reference itself: a KL over K + 1 categories (S and the rest) whose target
    is the reference's own distribution; the weights only chose S. Summed over valid steps.

    policy_logprobs: (B, T, K) the policy's log-probs of S normalised over the whole vocabulary
    full, post:      (B, T, K) the reference's full-vocabulary log-probs of S, two views (the cache's)
    mask:            (B, T) bool (or float32 weights per step: --row-gate, --replay)
    With PACT's gate ``c_t`` (over S) the reference's two views, each with the rest as a (K+1)-th
    category (:func:`with_rest`), are mixed, ``m_t = (1 - c_t) a'_t + c_t b'_t``; then
    ``q_t = softmax(m_t / T)`` and ``p_t = softmax(z'_t / T)`` over the K + 1 categories, ``z'_t`` the
    policy's K log-probs of S and its log-prob of the rest, and
    ``kl_t = T^2 * sum_j q_t[j] (log q_t[j] - log p_t[j])``. Where the gate is 0 (the full view),
    the loss is 0 exactly when the policy's probabilities of S and of the rest are the reference's
    (both sides are normalised, so equal tempered softmaxes mean equal log-probs): its optimum is the
    reference, unlike ``pact``/``pact-rest``, whose weighted targets move mass within S onto the
    positively weighted tokens. Returns ``(sum, count)``.
    """
    policy_logprobs = policy_logprobs.float()
    full, post = full.float(), post.float()
    c = pact_gate(policy_logprobs.detach(), post, p).unsqueeze(-1)
    mix = (1.0 - c) * with_rest(full) + c * with_rest(post)  # (B, T, K + 1)
    log_q = F.log_softmax(mix / p.T, dim=-1)
    log_p = F.log_softmax(with_rest(policy_logprobs) / p.T, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1) * (p.T**2)
    m = mask.to(kl.dtype)
    return (kl * m).sum(), m.sum()


def str_term(
    policy_sel: torch.Tensor, policy_lse: torch.Tensor, full: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """STR, safety token regularisation (arXiv 2604.17210), summed over valid steps.

    policy_sel: (B, T, K) policy logits of S; policy_lse: (B, T) logsumexp of all the policy's logits
    full:       (B, T, K) the reference's full-vocabulary log-probs of S (the cache's full view)
    mask:       (B, T) bool (or float32 weights per step: --row-gate)
    ``str_t = mean_s (log p_theta(s | ctx) - log p_ref(s | ctx))^2`` with both log-probs normalised
    over the whole vocabulary. No code is public: this is our reading of the abstract ("constrains
    the logits of salient tokens from refusal templates"): a squared distance between the policy's and
    the reference's log-probs of the safety tokens at every response step, unweighted, one view.
    Returns ``(sum over valid steps of str_t, count)``.
    """
    diff = policy_sel.float() - policy_lse.float().unsqueeze(-1) - full.float()
    per_step = (diff * diff).mean(dim=-1)
    m = mask.to(per_step.dtype)
    return (per_step * m).sum(), m.sum()


def qi_betas(T: int, device=None) -> torch.Tensor:
    """Qi et al.'s schedule for response tokens 1..T: 0.5 for the first, 2 for the 2nd to 5th, 0.1 after. (T,)"""
    t = torch.arange(T, device=device)
    return torch.where(t == 0, 0.5, torch.where(t < 5, 2.0, 0.1))


def constrained_sft(
    policy_target: torch.Tensor, ref_target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise constrained SFT (Qi et al., ICLR 2025, "Safety Alignment Should Be Made More Than
    Just a Few Tokens Deep"), summed over valid steps.

    policy_target: (B, T) the policy's log-prob of each response token; ref_target: (B, T) the
    reference's (the cache's target column); mask: (B, T) bool.
    ``loss_t = -(2 / beta_t) * log sigmoid(beta_t * (log p_theta(y_t) - log p_ref(y_t)))`` with
    :func:`qi_betas`. This is the whole loss (it replaces the cross-entropy: for small beta it tends
    to it, up to a constant); returns ``(sum over valid steps, count)``, averaged by the caller.
    """
    beta = qi_betas(policy_target.shape[1], policy_target.device).to(torch.float32).view(1, -1)
    loss = -(2.0 / beta) * F.logsigmoid(beta * (policy_target.float() - ref_target.float()))
    m = mask.to(loss.dtype)
    return (loss * m).sum(), m.sum()


# ----------------------------------------------------------------------------- methods


def asft_penalty(factors) -> torch.Tensor:
    """AsFT's regulariser (arXiv 2506.08473): ``sum_m ||(I - C_m) B_m A_m||_F^2``, never forming a d x d matrix.

    factors: for each LoRA module m, ``(A, B, P, norm)``: A (r, in) and B (out, r) the LoRA matrices
             (gradients flow through these; the update is ``B A`` without LoRA's alpha / r scaling, as in
             AsFT's code), P (out, p) with ``P P^T = V V^T`` for ``V = W_aligned - W_base``, and ``norm =
             ||V||_F`` (a scalar), so that ``C = V V^T / ||V||_F`` (AsFT's definition).
    ``M = (I - C) B = B - P (P^T B) / norm`` is (out, r); ``||M A||_F^2 = sum((M^T M) * (A A^T))``, two
    (r, r) matrices. Returns a scalar (float32); zero for no modules.
    """
    total = torch.zeros((), dtype=torch.float32)
    for A, B, P, norm in factors:
        A, B, P = A.float(), B.float(), P.float()
        M = B - P @ (P.t() @ B) / norm.float()
        total = total.to(M.device) + ((M.t() @ M) * (A @ A.t())).sum()
    return total


@dataclass(frozen=True)
class Steps:
    """A micro-batch's response steps as a method's term sees them: B rows, T steps (padded), K
    safety tokens. The ``policy_*`` tensors carry gradient; ``ref`` holds the cached reference
    columns the method asked for: ``full``, ``post`` (B, T, K) full-vocabulary log-probs of S in the
    two views, ``target`` (B, T) the log-prob of the response token."""

    mask: (
        torch.Tensor
    )  # (B, T) bool, True at real response steps; or float32 weights in [0, 1] (0 at padding: --row-gate)
    policy_sel: torch.Tensor  # (B, T, K) float32 policy logits of S
    policy_lse: torch.Tensor  # (B, T) float32 logsumexp of the policy's logits over the vocabulary
    policy_target: torch.Tensor  # (B, T) float32 policy log-prob of the response token
    weights: torch.Tensor  # (K,) safety-token weights
    ref: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StudyRow:
    """How ``tools/study.py`` sets a method beside the others (its neighbours rows, from the same reference, cache,
    seed and data order): the row's ``label``; ``tune``: lambda chosen by the study's rule over its grid (else
    one run, no lambda); ``needs``: offline artefacts beside the cache it knows how to make (``"direction"``:
    ``pact-cache direction``, the aligned model against the original). A method registered with one is in the
    study (``--rows NAME``) without editing it."""

    label: str
    tune: bool = True
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """A training method: the cross-entropy plus ``lambda *`` its term, or (``with_ce=False``) its
    term alone. ``term(steps, params)`` is a pure function returning the term's sum over valid steps
    (the caller divides by the window's token count); ``columns`` are the cached reference columns it
    reads (a live reference must provide the same); ``metric`` names its value in metrics.jsonl.
    ``penalty(factors)`` is a term on the trained parameters rather than on steps (AsFT's): the loss
    of an optimizer step is ``CE / tokens + lambda * penalty``, the penalty computed once per step
    from each LoRA module's ``(A, B, P, norm)`` (a direction file gives P and norm)."""

    name: str
    summary: str
    columns: tuple[str, ...] = ()
    metric: str | None = None
    term: Callable[["Steps", "LossParams"], torch.Tensor] | None = None
    with_ce: bool = True
    penalty: Callable[[list], torch.Tensor] | None = None  # on the trained parameters, once per optimizer step
    study: StudyRow | None = None  # its row in tools/study.py's comparison, if it has one

    def total(self, ce_sum: torch.Tensor, term_sum: torch.Tensor, lam: float) -> torch.Tensor:
        """The loss's sum over the micro-batch's steps: ``CE + lambda * term``, or the term alone."""
        return ce_sum + lam * term_sum if self.with_ce else term_sum


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry; the columns it reads must be cache columns (pact_cache.columns)."""
    unknown = [c for c in method.columns if c not in COLUMN_NAMES]
    if unknown:
        raise ValueError(
            f"method {method.name}: reads {unknown}, which no cache holds; the columns are {', '.join(COLUMN_NAMES)}"
        )
    METHODS[method.name] = method
    return method


def added_term_methods() -> list[str]:
    """The methods whose per-step term is added to the cross-entropy: what a row gate or a replay
    term choice can weigh."""
    return [m.name for m in METHODS.values() if m.term is not None and m.with_ce]


def method_named(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


register(Method("sft", "cross-entropy only"))
register(
    Method(
        "pact",
        "CE + lambda * PACT's safety-token KL over S (the paper's)",
        ("full", "post"),
        "pact_kl",
        lambda s, p: pact_kl(s.policy_sel, s.ref["full"], s.ref["post"], s.weights, s.mask, p.pact)[0],
    )
)
register(
    Method(
        "pact-rest",
        "CE + lambda * PACT's KL over S plus the rest of the vocabulary as one category",
        ("full", "post"),
        "pact_rest_kl",
        lambda s, p: pact_rest_kl(
            s.policy_sel - s.policy_lse.unsqueeze(-1), s.ref["full"], s.ref["post"], s.weights, s.mask, p.pact
        )[0],
    )
)
register(
    Method(
        "pact-rest-ref",
        "CE + lambda * KL over S plus the rest toward the reference's own distribution "
        "(the weights only choose S; the optimum is the reference)",
        ("full", "post"),
        "pact_ref_kl",
        lambda s, p: pact_ref_kl(
            s.policy_sel - s.policy_lse.unsqueeze(-1), s.ref["full"], s.ref["post"], s.mask, p.pact
        )[0],
    )
)
register(
    Method(
        "str",
        "CE + lambda * STR: mean squared log-prob gap to the reference on S (our reading of arXiv 2604.17210)",
        ("full",),
        "str",
        lambda s, p: str_term(s.policy_sel, s.policy_lse, s.ref["full"], s.mask)[0],
        study=StudyRow("STR"),
    )
)
register(
    Method(
        "constrained-sft",
        "Qi et al.'s token-wise constrained SFT against the reference's token log-probs "
        "(replaces the CE; --lambda does not apply)",
        ("target",),
        "constrained_sft",
        lambda s, p: constrained_sft(s.policy_target, s.ref["target"], s.mask)[0],
        with_ce=False,
        study=StudyRow("Constrained SFT", tune=False),
    )
)
register(
    Method(
        "asft",
        "CE + lambda * AsFT's ||(I - C) B A||_F^2 over the LoRA modules (needs --direction)",
        metric="asft",
        penalty=asft_penalty,
        study=StudyRow("AsFT", needs=("direction",)),
    )
)


@dataclass(frozen=True)
class LossParams:
    """What the loss core needs from a run, and nothing else (pact-train and other trainers build it).
    ``method`` is a :class:`Method`; a name is looked up in :data:`METHODS` here, once (an unknown
    name raises ``ValueError`` listing the registered ones)."""

    method: Method | str = "pact"
    lam: float = 1.0  # weight of the method's term against the cross-entropy
    pact: PactParams = PactParams()
    logits_chunk: int = LOGITS_CHUNK  # response positions per (positions, vocab) block of logits

    def __post_init__(self):
        if not isinstance(self.method, Method):
            object.__setattr__(self, "method", method_named(self.method))
