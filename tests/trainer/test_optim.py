"""The optimizers pact-train offers (trainer/optim.py, --optim)."""

from __future__ import annotations

import pytest
import torch
from pact_train.optim import OPTIMIZERS, make_optimizer


def test_adamw_takes_the_runs_hyper_parameters():
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([p], "adamw", 0.01, 0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (0.01, 0.1)


def test_an_unknown_optimizer_is_refused_naming_the_offered_ones():
    with pytest.raises(ValueError, match="adamw, adamw-8bit, paged-adamw-8bit"):
        make_optimizer([torch.nn.Parameter(torch.ones(3))], "sgd", 0.01, 0.0)


@pytest.mark.parametrize("name, cls", [("adamw-8bit", "AdamW8bit"), ("paged-adamw-8bit", "PagedAdamW8bit")])
def test_8bit_optimizers_are_bitsandbytes_and_step_like_adamw(name, cls):
    """Same hyper-parameters; on a parameter of 4,096 values (bitsandbytes keeps smaller ones in 32 bits) the
    first steps move it as torch's AdamW does, to within the 8-bit state's rounding."""
    pytest.importorskip("bitsandbytes")
    assert name in OPTIMIZERS
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 64))
    b = torch.nn.Parameter(a.detach().clone())
    ref, opt = make_optimizer([a], "adamw", 1e-3, 0.0), make_optimizer([b], name, 1e-3, 0.0)
    assert type(opt).__name__ == cls and opt.param_groups[0]["lr"] == 1e-3
    for _ in range(3):
        g = torch.randn(64, 64)
        for p, o in ((a, ref), (b, opt)):
            p.grad = g.clone()
            o.step()
    assert not torch.equal(b.detach(), a.detach())  # 8-bit moments: not bit-equal ...
    torch.testing.assert_close(b.detach(), a.detach(), atol=2e-4, rtol=0)  # ... but the same steps


@pytest.mark.parametrize("anchored_cap", [None, 0.25])
def test_clip_split_clips_each_part_on_its_own_and_adds_them(anchored_cap):
    """clip_split against the naive sum: the term's gradient (in .grad) and the cross-entropy's (apart), each
    scaled to at most its cap over all parameters (the anchored one's own when given, else max_norm), then
    added; parameters with no gradient in one part take the other's alone; the two norms come back before
    clipping."""
    from pact_train.optim import clip_split, take_grads

    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.zeros(4)),
        torch.nn.Parameter(torch.zeros(2, 3)),
        torch.nn.Parameter(torch.zeros(5)),
    ]
    ce = [torch.randn(4, generator=g) * 3, torch.randn(2, 3, generator=g) * 3, None]
    term = [torch.randn(4, generator=g) * 50, None, torch.randn(5, generator=g) * 50]
    for p, c in zip(params, ce):
        p.grad = None if c is None else c.clone()
    kept = take_grads(params)  # the CE's pass, set apart
    assert all(p.grad is None for p in params) and kept[2] is None
    for p, t in zip(params, term):
        p.grad = None if t is None else t.clone()

    def naive_norm(gs):
        return float(torch.sqrt(sum((x.double() ** 2).sum() for x in gs if x is not None)))

    n_ce, n_term = naive_norm(ce), naive_norm(term)
    got = clip_split(params, kept, 1.0, anchored_cap)
    assert got == pytest.approx((n_ce, n_term), rel=1e-5) and n_term > 1 and n_ce > 1
    cap = 1.0 if anchored_cap is None else anchored_cap
    for p, c, t in zip(params, ce, term):
        want = sum(x * min(1.0, m / n) for x, n, m in ((c, n_ce, 1.0), (t, n_term, cap)) if x is not None)
        assert torch.allclose(p.grad, want, atol=1e-6)
    assert naive_norm([p.grad for p in params]) <= 1.0 + cap + 1e-5  # each part at most its cap


def test_take_grads_adds_what_each_pass_left():
    from pact_train.optim import take_grads

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    kept = take_grads([p])
    p.grad = torch.full((3,), 2.0)
    kept = take_grads([p], kept)
    assert p.grad is None and torch.equal(kept[0], torch.full((3,), 3.0))


def test_backward_apart_keeps_two_groups_apart_over_micro_batches():
    """Two micro-batches, each a task loss and an anchored loss from one forward: the task gradients gathered
    apart by backward_apart, the anchored ones left in .grad, each the naive sum of its group's gradients."""
    from pact_train.optim import backward_apart

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    xs = [torch.randn(4) for _ in range(2)]

    def losses(x):
        y = (w * x).tanh()
        return y.sum(), (y**2).sum() * 3  # task, anchored

    def naive(pick):
        g = torch.zeros(4)
        for x in xs:
            g += torch.autograd.grad(losses(x)[pick], w)[0]
        return g

    task = None
    for x in xs:
        t, a = losses(x)
        task = backward_apart(t, [w], task, retain_graph=True)
        a.backward()
    torch.testing.assert_close(task[0], naive(0))
    torch.testing.assert_close(w.grad, naive(1))
