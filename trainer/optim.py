"""The optimizers pact-train offers (``--optim``): torch's AdamW, or bitsandbytes' 8-bit AdamW (its two
moments stored in 8 bits with block-wise scales: 2 bytes per trainable parameter instead of 8) and its
paged form (the state in memory the GPU driver pages to CPU RAM when the card runs short). All three
take the same hyper-parameters, and their state goes through the same checkpoint
(:mod:`pact_train.checkpoint`), so a run resumes with the optimizer it started with."""

from __future__ import annotations

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit")


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
