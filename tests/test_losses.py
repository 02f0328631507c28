"""Each loss against a naive, loop-by-loop re-implementation of the paper's formulas."""

import math

import pytest
import torch

from trainer.losses import PactParams, chunked_ce_and_selected, pact_gate, pact_kl, top_p_count


def naive_pact_kl(z, a, b, w, lens, p: PactParams):
    """The paper's formulas as its reference code computes them, one example and one step at a time, in float64."""
    total, count = 0.0, 0
    K = z.shape[-1]
    wc = [max(float(x), 0.0) for x in w]
    for bi in range(z.shape[0]):
        for t in range(lens[bi]):
            def index(x):
                probs = sorted((math.exp(v / p.T_gate) for v in x), reverse=True)
                s = sum(probs)
                cum, n = 0.0, 0
                for q in probs:
                    cum += q / s
                    if cum < p.top_p:
                        n += 1
                return (n + 1) / K
            zt, at, bt = z[bi, t].tolist(), a[bi, t].tolist(), b[bi, t].tolist()
            c = 1 / (1 + math.exp(-p.alpha * (index(zt) - index(bt) - p.bias)))
            c *= math.exp(-max(t - p.N, 0) / p.tau) * p.boost
            m = [(1 - c) * x + c * y for x, y in zip(at, bt)]
            mx = max(m)
            e = [math.exp((v - mx) / p.T) for v in m]
            q = [x / sum(e) * wk for x, wk in zip(e, wc)]
            qs = sum(q)
            q = [x / qs for x in q]
            zmax = max(zt)
            lse = math.log(sum(math.exp((v - zmax) / p.T) for v in zt)) + zmax / p.T
            kl = sum(qk * (math.log(max(qk, 1e-12)) - (zk / p.T - lse)) for qk, zk in zip(q, zt))
            total += p.T ** 2 * kl
            count += 1
    return total, count


@pytest.mark.parametrize("params", [PactParams(), PactParams(T=1.5, T_gate=0.7, top_p=0.8, alpha=3.0, bias=0.1, N=2, tau=3.0, boost=0.9)])
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


def naive_response_ce(logits, targets):
    """One position at a time, full log-softmax."""
    return sum(-torch.log_softmax(logits[i].double(), -1)[targets[i]] for i in range(len(targets)))


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])
def test_chunked_ce_and_selected_equal_the_unchunked_values_and_gradients(chunk):
    """The production path (chunks of positions, checkpointed) against one plain pass, across chunk
    boundaries (N = 10 is not a multiple of 3 or 4): the CE sum, the logits of S, and the gradients of
    both with respect to the hidden states and the head's weights."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 10, 6, 13
    ids = torch.tensor([2, 7, 11])
    targets = torch.randint(0, V, (N,), generator=g)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w_sel = torch.randn(N, 3, generator=g)  # a downstream use of the logits of S, so they carry gradient too

    ce, sel = chunked_ce_and_selected(head, h, targets, ids, chunk)
    (ce + (sel * w_sel).sum()).backward()
    got = (ce.item(), sel.detach().clone(), h.grad.clone(), head.weight.grad.clone())

    h.grad, head.weight.grad = None, None
    logits = head(h).float()
    want_ce = naive_response_ce(logits, targets)
    (want_ce + (logits[:, ids] * w_sel).sum()).backward()
    assert got[0] == pytest.approx(want_ce.item(), rel=1e-6)
    assert torch.allclose(got[1], logits[:, ids].detach(), atol=1e-6)
    assert torch.allclose(got[2], h.grad, atol=1e-5) and torch.allclose(got[3], head.weight.grad, atol=1e-5)


def test_chunked_ce_of_no_positions_is_zero():
    head = torch.nn.Linear(4, 9, bias=False)
    ce, sel = chunked_ce_and_selected(head, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.tensor([1, 2]), 3)
    assert ce.item() == 0 and sel.shape == (0, 2)
