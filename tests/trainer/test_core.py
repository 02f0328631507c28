"""The loss core (trainer/core.py): the chunked projection against one plain pass."""

import pytest
import torch
from pact_train.core import chunked_projection
from pact_train.loop import policy_losses
from pact_train.losses import LossParams
from pact_train.stream import collate

from pact_cache.format import open_cache
from pact_cache.projection import Projection
from pact_cache.rows import cache_token_mask


def naive_target_logprobs(logits, targets):
    """One position at a time, full log-softmax."""
    return torch.stack([torch.log_softmax(logits[i].double(), -1)[targets[i]] for i in range(len(targets))])


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])
@pytest.mark.parametrize("cap", [None, 1.5])
def test_chunked_projection_equals_the_unchunked_values_and_gradients(chunk, cap):
    """The production path (chunks of positions, checkpointed) against one plain pass, across chunk
    boundaries (N = 10 is not a multiple of 3 or 4): the target log-probs (the CE is minus their sum),
    the logits of S, the logsumexp, and the gradients of all three with respect to the hidden states
    and the head's weights."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 10, 6, 13
    ids = torch.tensor([2, 7, 11])
    targets = torch.randint(0, V, (N,), generator=g)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    h = torch.randn(N, H, generator=g, requires_grad=True)
    # downstream uses of every output, so that each carries gradient
    w_t, w_sel, w_lse = torch.randn(N, generator=g), torch.randn(N, 3, generator=g), torch.randn(N, generator=g)

    proj = Projection(head, "softcap", cap) if cap else Projection(head)
    tgt, sel, lse = chunked_projection(proj, h, targets, ids, chunk)
    ((tgt * w_t).sum() + (sel * w_sel).sum() + (lse * w_lse).sum()).backward()
    got = (tgt.detach().clone(), sel.detach().clone(), lse.detach().clone(), h.grad.clone(), head.weight.grad.clone())

    h.grad, head.weight.grad = None, None
    logits = head(h).float()
    if cap:  # Gemma-2's softcapping, as its forward applies it
        logits = torch.tanh(logits / cap) * cap
    want_t = naive_target_logprobs(logits, targets)
    want_lse = torch.stack([torch.log(torch.exp(logits[i].double()).sum()) for i in range(N)])
    ((want_t * w_t).sum() + (logits[:, ids] * w_sel).sum() + (want_lse * w_lse).sum()).backward()
    assert torch.allclose(got[0].double(), want_t.detach(), atol=1e-5) and -got[0].sum().item() == pytest.approx(
        -want_t.sum().item(), rel=1e-6
    )
    assert torch.allclose(got[1], logits[:, ids].detach(), atol=1e-6)
    assert torch.allclose(got[2].double(), want_lse.detach(), atol=1e-5)
    assert torch.allclose(got[3], h.grad, atol=1e-5) and torch.allclose(got[4], head.weight.grad, atol=1e-5)


def test_chunked_projection_of_no_positions_is_empty():
    head = torch.nn.Linear(4, 9, bias=False)
    tgt, sel, lse = chunked_projection(
        Projection(head), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.tensor([1, 2]), 3
    )
    assert tgt.shape == lse.shape == (0,) and sel.shape == (0, 2)


def test_token_mask_leaves_the_selected_tokens_out_of_the_ce(tiny_model, scored):
    """The loss core with a token mask: the CE sum is the plain sum of -log p over kept tokens only,
    while a regularising term (pact) still covers every step."""
    from transformers import AutoModelForCausalLM

    _, out = scored
    cache = open_cache(out)
    mask = cache_token_mask(cache, 0.3)
    rows = list(cache.iter_rows())[:4]
    batch = collate(rows, 0, 1, mask)
    plain = collate(rows, 0, 1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids, w = torch.tensor(cache.ids), torch.tensor(cache.tokens.weights, dtype=torch.float32)
    with torch.no_grad():
        ce, term, n = policy_losses(model, batch, ids, w, LossParams(method="pact"))
        ce0, term0, n0 = policy_losses(model, plain, ids, w, LossParams(method="pact"))
        want = 0.0
        for r in rows:
            x = torch.tensor(r.input_ids)[None]
            pos = torch.arange(r.response_start - 1, len(r.input_ids) - 1)
            lp = torch.log_softmax(model(x).logits[0, pos].float(), -1).gather(1, x[0, pos + 1][:, None])[:, 0]
            want += -(lp * torch.from_numpy(mask.keep(r.example_id, r.score))).sum().item()
    assert 0 < int(batch.loss_mask.sum()) < int(batch.step_mask.sum())
    assert ce.item() == pytest.approx(want, rel=1e-5) and ce.item() < ce0.item()
    assert term.item() == pytest.approx(term0.item(), rel=1e-6) and n == n0


def test_split_gives_the_anchored_rows_cross_entropy(tiny_model, scored):
    """policy_losses(split=True)'s fourth value (--clip split): each row's cross-entropy times its row gate,
    against the plain CE of the gated rows collated alone; without a gate it is the whole CE, and the first
    three values are those of a call without split."""
    from transformers import AutoModelForCausalLM

    _, out = scored
    cache = open_cache(out)
    rows = list(cache.iter_rows())[:4]
    gates = {r.example_id: g for r, g in zip(rows, (1.0, 0.0, 0.5, 0.0))}
    batch = collate(rows, 0, 1, row_gate=lambda r: gates[r.example_id])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids, w = torch.tensor(cache.ids), torch.tensor(cache.tokens.weights, dtype=torch.float32)
    p = LossParams(method="str", lam=3.0)
    with torch.no_grad():
        ce, term, n, anchored = policy_losses(model, batch, ids, w, p, split=True)
        assert [x.item() for x in policy_losses(model, batch, ids, w, p)] == [ce.item(), term.item(), n.item()]
        alone = [policy_losses(model, collate([r], 0, 1), ids, w, p)[0].item() for r in rows]
        plain = collate(rows, 0, 1)
        whole = policy_losses(model, plain, ids, w, p, split=True)
    assert anchored.item() == pytest.approx(alone[0] + 0.5 * alone[2], rel=1e-5)
    assert ce.item() == pytest.approx(sum(alone), rel=1e-5) and 0 < anchored.item() < ce.item()
    assert whole[3].item() == whole[0].item()


def test_the_split_groups_sum_to_the_window_loss():
    """split_window_loss: the task group is the non-anchored rows' CE, the anchored group their CE plus lambda times
    the term, each times the weight; together window_loss (what the joint clip backpropagates)."""
    from pact_train.core import split_window_loss, window_loss
    from pact_train.losses import LossParams

    p = LossParams(method="str", lam=3.0)
    ce, anchored, term = torch.tensor(10.0), torch.tensor(4.0), torch.tensor(2.0)
    task, rest = split_window_loss(p, ce, anchored, term, 0.5)
    assert (task.item(), rest.item()) == (3.0, 5.0)
    assert (task + rest).item() == window_loss(p, ce, term, 0.5).item()
