"""The optimizers pact-train offers (``--optim``): torch's AdamW, or bitsandbytes' 8-bit AdamW (its two
moments stored in 8 bits with block-wise scales: 2 bytes per trainable parameter instead of 8) and its
paged form (the state in memory the GPU driver pages to CPU RAM when the card runs short). All three
take the same hyper-parameters, and their state goes through the same checkpoint
(:mod:`pact_train.checkpoint`), so a run resumes with the optimizer it started with."""

from __future__ import annotations

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit")
CLIPS = ("joint", "split")  # --clip: how the gradient is clipped (clip_split)


def make_optimizer(params, name: str, lr: float, weight_decay: float):
    """The optimizer ``name`` over ``params``; the 8-bit ones need bitsandbytes (the qlora extra)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if name == "adamw-8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


def take_grads(params, into: list | None = None) -> list:
    """Moves each parameter's ``.grad`` into ``into`` (added to what it holds; a list with one entry per
    parameter, None where none has come yet), leaving ``.grad`` None: the gradient of one part of a loss set
    apart before the next part's backward pass (``--clip split``)."""
    into = [None] * len(params) if into is None else into
    for i, p in enumerate(params):
        if p.grad is not None:
            into[i] = p.grad if into[i] is None else into[i].add_(p.grad)
            p.grad = None
    return into


def backward_apart(loss, params, into: list | None, retain_graph: bool = False, backward=None) -> list:
    """The backward pass of ``loss`` with its gradient added to ``into`` (:func:`take_grads`) and the parameters'
    ``.grad`` left as they were: one group's gradient accumulated apart from the other's, micro-batch after
    micro-batch (``--clip split``). ``backward``: what runs the pass (``loss.backward`` by default; the Trainer's
    ``accelerator.backward``)."""
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    (backward or (lambda x, **kw: x.backward(**kw)))(loss, retain_graph=retain_graph)
    into = take_grads(params, into)
    for p, g in zip(params, held):
        p.grad = g
    return into


def clip_split(
    params, task_grads: list, max_norm: float, anchored_max_norm: float | None = None
) -> tuple[float, float]:
    """``--clip split``: the parameters' ``.grad`` hold the anchored rows' gradient and ``task_grads``
    (:func:`take_grads`) the other rows'; each is clipped on its own (the anchored one to ``anchored_max_norm``,
    ``max_norm`` when None) and their sum is left in ``.grad``. Returns the two norms before clipping
    ``(task, anchored)``: with a joint clip an anchor whose gradient is ten times the task's would shrink the
    task's step tenfold; here each keeps its own budget."""
    import torch

    anchored_cap = max_norm if anchored_max_norm is None else anchored_max_norm
    anchored_norm = torch.nn.utils.clip_grad_norm_(params, anchored_cap).item()  # 0 when no row was anchored
    anchored = [p.grad for p in params]
    for p, g in zip(params, task_grads):
        p.grad = g
    task_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    for p, a in zip(params, anchored):
        if a is not None:
            p.grad = a if p.grad is None else p.grad.add_(a)
    return task_norm, anchored_norm


def clip_gradients(params, task_grads: list | None, max_norm: float, anchored_max_norm: float | None = None) -> dict:
    """The step's clip, as ``--clip`` says: ``task_grads`` None (joint): the parameters' whole gradient clipped
    to ``max_norm``; else :func:`clip_split`. Returns the norms before clipping under their metrics.jsonl names
    (``grad_norm``, and ``anchored_grad_norm`` when split)."""
    import torch

    if task_grads is None:
        return {"grad_norm": torch.nn.utils.clip_grad_norm_(params, max_norm).item()}
    task_norm, anchored_norm = clip_split(params, task_grads, max_norm, anchored_max_norm)
    return {"grad_norm": task_norm, "anchored_grad_norm": anchored_norm}
