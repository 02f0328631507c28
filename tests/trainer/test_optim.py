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
