"""Every method's term (trainer/losses.py) against a naive re-implementation, on odd shapes."""

import math

import pytest
import torch
from pact_train.losses import (
    METHODS,
    LossParams,
    Method,
    PactParams,
    Steps,
    asft_penalty,
    method_named,
    pact_gate,
    pact_kl,
    pact_rest_kl,
    register,
    top_p_count,
)


def naive_asft(modules):
    """AsFT's code, literally: C = V V^T / ||V||_F (out x out), ||(I - C) @ (B @ A)||_F^2 summed."""
    total = 0.0
    for A, B, V in modules:
        C = V @ V.t() / torch.norm(V)
        total = total + torch.norm((torch.eye(C.shape[0], dtype=V.dtype) - C) @ (B @ A), p="fro") ** 2
    return total


def naive_gate(zt: list, bt: list, t: int, p: PactParams) -> float:
    """PACT's gate c_t from the policy's values and the post view's on S, one step."""
    K = len(zt)

    def index(x):
        probs = sorted((math.exp(v / p.T_gate) for v in x), reverse=True)
        s = sum(probs)
        cum, n = 0.0, 0
        for q in probs:
            cum += q / s
            if cum < p.top_p:
                n += 1
        return (n + 1) / K

    c = 1 / (1 + math.exp(-p.alpha * (index(zt) - index(bt) - p.bias)))
    return c * math.exp(-max(t - p.N, 0) / p.tau) * p.boost


def naive_pact_kl(z, a, b, w, lens, p: PactParams):
    """The paper's formulas as its reference code computes them, one example and one step at a time, in float64."""
    total, count = 0.0, 0
    wc = [max(float(x), 0.0) for x in w]
    for bi in range(z.shape[0]):
        for t in range(lens[bi]):
            zt, at, bt = z[bi, t].tolist(), a[bi, t].tolist(), b[bi, t].tolist()
            c = naive_gate(zt, bt, t, p)
            m = [(1 - c) * x + c * y for x, y in zip(at, bt)]
            mx = max(m)
            e = [math.exp((v - mx) / p.T) for v in m]
            q = [x / sum(e) * wk for x, wk in zip(e, wc)]
            qs = sum(q)
            q = [x / qs for x in q]
            zmax = max(zt)
            lse = math.log(sum(math.exp((v - zmax) / p.T) for v in zt)) + zmax / p.T
            kl = sum(qk * (math.log(max(qk, 1e-12)) - (zk / p.T - lse)) for qk, zk in zip(q, zt))
            total += p.T**2 * kl
            count += 1
    return total, count


@pytest.mark.parametrize(
    "params", [PactParams(), PactParams(T=1.5, T_gate=0.7, top_p=0.8, alpha=3.0, bias=0.1, N=2, tau=3.0, boost=0.9)]
)
def test_pact_kl_matches_naive_on_odd_shapes(params):
    g = torch.Generator().manual_seed(0)
    B, T, K = 3, 13, 7  # K=7, ragged responses, steps beyond N
    lens = [13, 5, 1]
    z = torch.randn(B, T, K, generator=g, dtype=torch.float64) * 3
    a = torch.log_softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64) * 2, -1) - 1.0
    b = torch.log_softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64) * 2, -1) - 2.0
    w = torch.tensor([0.5, -0.2, 0.1, 0.9, 0.0, 0.3, -1.0], dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
    got_sum, got_n = pact_kl(z, a, b, w, mask, params)
    want_sum, want_n = naive_pact_kl(z, a, b, w, lens, params)
    assert got_n.item() == want_n
    assert got_sum.item() == pytest.approx(want_sum, rel=1e-5)


def test_log_probs_and_logits_give_the_same_loss():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 5, generator=g)
    a = torch.randn(2, 4, 5, generator=g)
    b = torch.randn(2, 4, 5, generator=g)
    w, mask = torch.rand(5, generator=g), torch.ones(2, 4, dtype=torch.bool)
    s1, _ = pact_kl(z, a, b, w, mask)
    s2, _ = pact_kl(z + 3.0, a - a.logsumexp(-1, keepdim=True), b - 7.0, w, mask)
    assert s1.item() == pytest.approx(s2.item(), rel=1e-5)


def test_gate_carries_no_gradient_but_policy_does():
    z = torch.randn(1, 3, 4, requires_grad=True)
    a, b = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    assert not pact_gate(z, b, PactParams()).requires_grad
    s, _ = pact_kl(z, a, b, torch.ones(4), torch.ones(1, 3, dtype=torch.bool))
    s.backward()
    assert z.grad.abs().sum() > 0


def test_top_p_count_edges():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.3, 0.4], [0.45, 0.45, 0.1]])
    assert top_p_count(probs, 0.9).tolist() == [1.0, 3.0, 2.0]


def test_kl_is_zero_when_policy_equals_target_and_uniform_weights():
    a = torch.log_softmax(torch.randn(1, 6, 5), -1)
    s, n = pact_kl(a, a, a, torch.ones(5), torch.ones(1, 6, dtype=torch.bool))
    assert abs(s.item()) < 1e-5 and n.item() == 6


def naive_pact_rest_kl(policy_logits, ref_full, ref_post, ids, w, lens, p: PactParams):
    """PACT-rest from full-vocabulary distributions, one step at a time, float64: the rest category's
    probability is the sum over the tokens outside S (not 1 - sum over S); the KL is written as its
    two parts, PACT's KL within S weighed by the reference's mass on S, plus the KL between the two
    Bernoulli distributions "inside S or not"."""
    ids = ids.tolist()
    wc = [max(float(x), 0.0) for x in w]
    total, count = 0.0, 0

    def coarse(logits_t):  # K + 1 log-probs: S, then the rest
        lp = torch.log_softmax(logits_t.double(), -1).tolist()
        rest = math.log(sum(math.exp(v) for i, v in enumerate(lp) if i not in ids))
        return [lp[i] for i in ids] + [rest]

    for bi in range(policy_logits.shape[0]):
        for t in range(lens[bi]):
            z, a, b = coarse(policy_logits[bi, t]), coarse(ref_full[bi, t]), coarse(ref_post[bi, t])
            c = naive_gate(z[:-1], b[:-1], t, p)
            m = [(1 - c) * x + c * y for x, y in zip(a, b)]
            r = math.exp(m[-1]) / sum(math.exp(v) for v in m)  # the mixture's mass outside S
            rho = math.exp(z[-1])
            e = [math.exp(v / p.T) * wk for v, wk in zip(m[:-1], wc)]
            q = [x / sum(e) for x in e]  # PACT's target within S
            lse = math.log(sum(math.exp(v / p.T) for v in z[:-1]))
            kl_s = sum(qk * (math.log(max(qk, 1e-12)) - (zk / p.T - lse)) for qk, zk in zip(q, z[:-1]))
            kl_b = r * math.log(r / rho) + (1 - r) * math.log((1 - r) / (1 - rho))
            total += p.T**2 * ((1 - r) * kl_s + kl_b)
            count += 1
    return total, count


@pytest.mark.parametrize(
    "params", [PactParams(), PactParams(T=1.5, T_gate=0.7, top_p=0.8, alpha=3.0, bias=0.1, N=2, tau=3.0, boost=0.9)]
)
def test_pact_rest_matches_naive_on_odd_shapes(params):
    """Through the registry, as the trainers call it: a vocabulary of 11, K = 4, ragged responses."""
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 9, 11
    ids = torch.tensor([1, 4, 5, 9])
    lens = [9, 4, 1]
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ref_full = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ref_post = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    w = torch.tensor([0.5, -0.2, 0.9, 0.3], dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
    lp = lambda x: torch.log_softmax(x, -1)[..., ids]  # noqa: E731  (the cache's full-vocabulary log-probs of S)
    steps = Steps(
        mask,
        logits[..., ids],
        logits.logsumexp(-1),
        torch.zeros(B, T, dtype=torch.float64),
        w,
        {"full": lp(ref_full), "post": lp(ref_post)},
    )
    got = method_named("pact-rest").term(steps, LossParams(method="pact-rest", pact=params))
    want, n = naive_pact_rest_kl(logits, ref_full, ref_post, ids, w, lens, params)
    assert n == int(mask.sum()) and got.item() == pytest.approx(want, rel=1e-6)


def test_pact_rest_sees_mass_moving_outside_s_and_pact_does_not():
    """A policy that keeps the reference's ratios within S but moves half of S's mass to other
    tokens: PACT's KL (renormalised over S) is zero, PACT-rest's is not; equal policies give zero."""
    K = 4
    ref = torch.log(torch.tensor([0.4, 0.2, 0.1, 0.1])).view(1, 1, K)  # S holds 0.8
    moved = ref + math.log(0.5)  # S holds 0.4, same ratios
    mask = torch.ones(1, 1, dtype=torch.bool)
    w = torch.ones(K)
    assert pact_kl(moved, ref, ref, w, mask)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert pact_rest_kl(moved, ref, ref, w, mask)[0].item() > 0.05
    assert pact_rest_kl(ref, ref, ref, w, mask)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_pact_rest_holds_the_references_mass_on_s_whatever_the_weights():
    """Weights shape the target within S only: with weights far from uniform, a policy with the
    reference's ratios within S is best when its total mass on S is the reference's, not more
    (scaling S's mass up or down by any factor costs more)."""
    ref = torch.log(torch.tensor([0.30, 0.05, 0.05, 0.02])).view(1, 1, 4)  # S holds 0.42
    w = torch.tensor([0.9, 0.05, 0.0, 0.1])
    mask = torch.ones(1, 1, dtype=torch.bool)
    at = {d: pact_rest_kl(ref + math.log(d), ref, ref, w, mask)[0].item() for d in (0.5, 0.9, 1.0, 1.1, 1.5, 2.0)}
    assert min(at, key=at.get) == 1.0 and at[2.0] > at[1.1] > at[1.0] < at[0.9] < at[0.5]


def naive_pact_ref_kl(policy_logits, ref_full, ref_post, ids, lens, p: PactParams):
    """PACT-rest toward the reference, from full-vocabulary distributions, one step at a time, float64:
    K + 1 categories (the rest summed over the tokens outside S), the gate's mixture of the two views,
    both sides tempered by T, no weights."""
    ids = ids.tolist()
    total, count = 0.0, 0

    def coarse(logits_t):
        lp = torch.log_softmax(logits_t.double(), -1).tolist()
        return [lp[i] for i in ids] + [math.log(sum(math.exp(v) for i, v in enumerate(lp) if i not in ids))]

    def tempered(x):
        e = [math.exp(v / p.T) for v in x]
        return [v / sum(e) for v in e]

    for bi in range(policy_logits.shape[0]):
        for t in range(lens[bi]):
            z, a, b = coarse(policy_logits[bi, t]), coarse(ref_full[bi, t]), coarse(ref_post[bi, t])
            c = naive_gate(z[:-1], b[:-1], t, p)
            q, pol = tempered([(1 - c) * x + c * y for x, y in zip(a, b)]), tempered(z)
            total += p.T**2 * sum(qk * math.log(qk / pk) for qk, pk in zip(q, pol))
            count += 1
    return total, count


@pytest.mark.parametrize(
    "params", [PactParams(), PactParams(T=1.5, T_gate=0.7, top_p=0.8, alpha=3.0, bias=0.1, N=2, tau=3.0, boost=0.9)]
)
def test_pact_rest_ref_matches_naive_on_odd_shapes(params):
    g = torch.Generator().manual_seed(7)
    B, T, V = 3, 9, 11
    ids = torch.tensor([0, 3, 7, 10])
    lens = [9, 3, 1]
    logits, ref_full, ref_post = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
    lp = lambda x: torch.log_softmax(x, -1)[..., ids]  # noqa: E731
    w = torch.tensor([0.9, -0.5, 0.1, 0.0], dtype=torch.float64)  # choose S only: any weights give the same term
    steps = Steps(
        mask,
        logits[..., ids],
        logits.logsumexp(-1),
        torch.zeros(B, T, dtype=torch.float64),
        w,
        {"full": lp(ref_full), "post": lp(ref_post)},
    )
    got = method_named("pact-rest-ref").term(steps, LossParams(method="pact-rest-ref", pact=params))
    want, n = naive_pact_ref_kl(logits, ref_full, ref_post, ids, lens, params)
    assert n == int(mask.sum()) and got.item() == pytest.approx(want, rel=1e-6)
    again = method_named("pact-rest-ref").term(
        Steps(
            mask, steps.policy_sel, steps.policy_lse, steps.policy_target, torch.ones(4, dtype=torch.float64), steps.ref
        ),
        LossParams(method="pact-rest-ref", pact=params),
    )
    assert again.item() == got.item()


def test_pact_rest_ref_has_its_optimum_at_the_reference_and_pact_rest_does_not():
    """With the gate shut (tau <= 0, N = 0: the full view alone), gradient descent on the policy's
    K + 1 log-probs ends at the reference's own log-probs under pact-rest-ref; under pact-rest, whose
    target reweights S, the same descent ends away from them."""
    from pact_train.losses import pact_ref_kl

    p = PactParams(N=0, tau=0.0)
    ref = torch.log(torch.tensor([0.30, 0.05, 0.05, 0.02])).view(1, 1, 4)  # S holds 0.42
    w = torch.tensor([0.9, 0.05, 0.0, 0.1])
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert pact_ref_kl(ref, ref, ref, mask, p)[0].item() == pytest.approx(0.0, abs=1e-7)
    ends = {}
    for name, fn in (
        ("ref", lambda x: pact_ref_kl(x, ref, ref, mask, p)[0]),
        ("rest", lambda x: pact_rest_kl(x, ref, ref, w, mask, p)[0]),
    ):
        z = torch.zeros(1, 1, 5, requires_grad=True)  # free logits over S and the rest
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(1500):
            opt.zero_grad()
            fn(torch.log_softmax(z, -1)[..., :4]).backward()
            opt.step()
        ends[name] = torch.log_softmax(z, -1)[..., :4].detach()
    assert torch.allclose(ends["ref"], ref, atol=1e-3)
    assert (ends["rest"] - ref).abs().max() > 0.5  # pact-rest moves S's mass onto the heavily weighted token


def odd_steps(seed=2, B=3, T=8, V=11, K=4):
    """Random full-vocabulary policy logits and reference log-probs on ragged responses (lens 8, 5, 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([1, 4, 5, 9][:K])
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ref = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    targets = torch.randint(0, V, (B, T), generator=g)
    lens = [8, 5, 1]
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
    lp = torch.log_softmax(logits, -1)
    steps = Steps(
        mask,
        logits[..., ids],
        logits.logsumexp(-1),
        lp.gather(-1, targets[..., None])[..., 0],
        torch.ones(K, dtype=torch.float64),
        {"full": ref[..., ids], "post": ref[..., ids], "target": ref.gather(-1, targets[..., None])[..., 0]},
    )
    return steps, logits, ref, targets, ids, lens


def test_str_matches_naive_on_odd_shapes():
    steps, logits, ref, targets, ids, lens = odd_steps()
    want = 0.0
    for b in range(logits.shape[0]):
        for t in range(lens[b]):
            lp = torch.log_softmax(logits[b, t], -1)
            want += sum((lp[i].item() - ref[b, t, i].item()) ** 2 for i in ids.tolist()) / len(ids)
    got = method_named("str").term(steps, LossParams(method="str"))
    assert got.item() == pytest.approx(want, rel=1e-6)  # float32 inside the term


def test_constrained_sft_matches_naive_with_qi_schedule():
    steps, logits, ref, targets, ids, lens = odd_steps()
    want = 0.0
    for b in range(logits.shape[0]):
        for t in range(lens[b]):
            beta = 0.5 if t == 0 else (2.0 if t < 5 else 0.1)  # tokens 1, 2-5, 6+
            x = torch.log_softmax(logits[b, t], -1)[targets[b, t]].item() - ref[b, t, targets[b, t]].item()
            want += -(2 / beta) * math.log(1 / (1 + math.exp(-beta * x)))
    m = method_named("constrained-sft")
    got = m.term(steps, LossParams(method="constrained-sft"))
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert not m.with_ce and m.total(torch.tensor(5.0), got, 3.0).item() == pytest.approx(
        got.item()
    )  # it is the whole loss


def test_constrained_sft_is_the_ce_up_to_a_constant_for_small_beta():
    """-(2/b) log sigmoid(b x) = (2/b) log 2 - x + O(b): its gradient is the CE's for small beta."""
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    b = 1e-4
    val = -(2 / b) * torch.nn.functional.logsigmoid(b * x)
    assert torch.allclose(val - (2 / b) * math.log(2), -x, atol=1e-3)


def test_a_method_is_looked_up_once_and_reads_only_cache_columns():
    """LossParams holds the Method (a name is looked up at construction); the registry refuses a
    method that reads a column no cache holds, and an unknown name lists the registered ones."""
    from pact_cache.columns import COLUMN_NAMES

    assert LossParams(method="str").method is METHODS["str"]
    assert all(set(m.columns) <= set(COLUMN_NAMES) for m in METHODS.values())
    with pytest.raises(ValueError, match="unknown method 'nope'; use one of " + ", ".join(METHODS)):
        LossParams(method="nope")
    with pytest.raises(ValueError, match=r"reads \['logits'\], which no cache holds"):
        register(Method("bad", "reads a column no cache has", ("logits",), "bad", lambda s, p: s.mask.sum()))
    assert "bad" not in METHODS


def test_penalty_equals_the_d_by_d_formula_values_and_gradients():
    """Two modules of odd shapes (7x5 rank 3, 4x9 rank 2), P = V and P = U_r diag(s_r) at full rank."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5, 3), (4, 9, 2)]
    mods = [
        (
            torch.randn(r, i, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(o, r, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(o, i, generator=g, dtype=torch.float64),
        )
        for o, i, r in shapes
    ]
    want = naive_asft(mods)
    want.backward()
    grads = [(A.grad.clone(), B.grad.clone()) for A, B, _ in mods]
    for A, B, _ in mods:
        A.grad = B.grad = None
    got = asft_penalty([(A, B, V, torch.linalg.matrix_norm(V)) for A, B, V in mods])
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for (A, B, _), (ga, gb) in zip(mods, grads):
        assert torch.allclose(A.grad.double(), ga, rtol=1e-4, atol=1e-6) and torch.allclose(
            B.grad.double(), gb, rtol=1e-4, atol=1e-6
        )
    factored = []
    for A, B, V in mods:
        U, s, _ = torch.linalg.svd(V, full_matrices=False)
        factored.append((A, B, U * s, torch.linalg.matrix_norm(V)))
    assert asft_penalty(factored).item() == pytest.approx(want.item(), rel=1e-5)
    assert asft_penalty([]).item() == 0.0
    assert METHODS["asft"].penalty is asft_penalty and METHODS["asft"].term is None and METHODS["asft"].metric == "asft"
