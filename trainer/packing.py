"""Padding-free micro-batches: the rows of a micro-batch run as one sequence of their real tokens.

A padded micro-batch of B rows costs ``B x longest row`` positions in every layer; a packed one costs
the sum of the rows' lengths. The rows are concatenated into one sequence (``input_ids`` (1, N)),
``position_ids`` restart at 0 on every row, and attention is kept inside each row by an attention
function that knows the row boundaries (``cu_seq_lens_q``: (B + 1,) int32 offsets, the name
transformers' FlashAttention path uses, so the same call runs FlashAttention-2's variable-length
kernel where the model was loaded with it):

* sdpa / eager models: PyTorch's ``scaled_dot_product_attention`` per row, causal, on that row's
  queries, keys and values only (no (N, N) mask is ever made);
* flash_attention_2 / 3: transformers' own variable-length path (``cu_seq_lens_*`` and
  ``max_length_*`` are what it reads).

:func:`enable` switches a model to that function (registered with transformers' ``AttentionInterface``
under ``pact_packed_<original>``; calls without row boundaries, padded ones such as generation, still
go to the original kind with its usual mask), then proves the rows are kept apart on the model itself:
two rows of different lengths, packed and padded, must give the same hidden states. A model that does
not route attention through that interface (or has layers that ignore ``position_ids``: linear
attention, convolutions) fails the proof and stays padded, with one line saying why. Known trap this
avoids by construction: an all-ones 2-D ``attention_mask`` beside packed ``position_ids`` would let
rows attend to each other silently; packed calls pass no ``attention_mask`` at all.
"""

from __future__ import annotations

import torch

from pact_cache.projection import causal_lm

PREFIX = "pact_packed_"
FLASH = ("flash_attention_2", "flash_attention_3")
SUPPORTED = ("sdpa", "eager", *FLASH)


def _per_row_sdpa(module, query, key, value, cu: list[int], dropout: float, scaling, sliding_window):
    """query (1, Hq, N, D), key/value (1, Hkv, N, D) -> (1, N, Hq, D): causal attention inside each row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    outs = []
    for s, e in zip(cu[:-1], cu[1:]):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        mask = None
        if sliding_window is not None and e - s > sliding_window:  # as the model's sliding-window mask: j in (i - w, i]
            i = torch.arange(e - s, device=query.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < sliding_window)
            mask = mask[None, None]
        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=mask is None)
        outs.append(out)
    return torch.cat(outs, dim=1), None


def _attention(original: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    padded = ALL_ATTENTION_FUNCTIONS["sdpa" if original == "eager" else original]
    # the row bounds as Python ints, read from the device once per forward, not once per layer: every layer
    # of one forward gets the same cu tensor (a new or changed tensor, by identity or version, is read again)
    last = {"key": None, "bounds": None}

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:  # an ordinary (padded) call: the original kind, with the mask made for it
            return padded(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if original in FLASH:
            return padded(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
        if last["key"] is None or last["key"][0] is not cu or last["key"][1] != cu._version:
            last["key"], last["bounds"] = (cu, cu._version), cu.tolist()
        return _per_row_sdpa(module, query, key, value, last["bounds"], dropout, scaling, kwargs.get("sliding_window"))

    return attention


def _mask(original: str):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    padded = ALL_MASK_ATTENTION_FUNCTIONS["sdpa" if original == "eager" else original]

    def mask(*args, attention_mask=None, **kwargs):
        # packed calls come without a 2-D mask (the rows' bounds travel as cu_seq_lens_q): no (N, N) mask
        return None if attention_mask is None else padded(*args, attention_mask=attention_mask, **kwargs)

    return mask


def _register(original: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = PREFIX + original
    AttentionInterface.register(name, _attention(original))
    AttentionMaskInterface.register(name, _mask(original))
    return name


def packed_inputs(rows: list, device=None) -> dict:
    """The model's keyword arguments for ``rows`` (1-D token id arrays or tensors) as one packed
    sequence: ``input_ids`` and ``position_ids`` (1, N), ``cu_seq_lens_q/k`` (B + 1,) int32,
    ``max_length_q/k``."""
    lens = [len(r) for r in rows]
    ids = torch.cat([torch.as_tensor(r, dtype=torch.long) for r in rows])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    out = {
        "input_ids": ids,
        "position_ids": pos,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lens),
        "max_length_k": max(lens),
    }
    return {k: v.to(device) if device is not None and torch.is_tensor(v) else v for k, v in out.items()}


def _probe_rows(lm) -> list[torch.Tensor]:
    vocab = lm.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g) for n in (5, 11, 3)]


@torch.no_grad()
def _hidden(lm, rows: list[torch.Tensor], packed: bool) -> torch.Tensor:
    """The decoder's last hidden states at the rows' real positions, concatenated (N, H) float32; eval mode."""
    dec, dev = lm.get_decoder(), next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    try:
        if packed:
            return dec(**packed_inputs(rows, dev), use_cache=False).last_hidden_state[0].float()
        L = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), L), dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        out = dec(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state
        return torch.cat([out[i, : len(r)] for i, r in enumerate(rows)]).float()
    finally:
        lm.train(was_training)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def rows_kept_apart(model, tol: float | None = None) -> tuple[bool, float]:
    """Three rows of different lengths through ``model``'s decoder as it is now, packed and padded:
    ``(same within tol, largest relative difference of the last hidden states at the real positions)``."""
    lm = causal_lm(model)
    rows = _probe_rows(lm)
    diff = _rel(_hidden(lm, rows, True), _hidden(lm, rows, False))
    return diff <= (_tolerance(lm) if tol is None else tol), diff


def _tolerance(lm) -> float:
    return 1e-4 if next(lm.parameters()).dtype == torch.float32 else 2e-2


def enable(model) -> str | None:
    """Switch ``model`` (a transformers causal LM, possibly under PEFT) to padding-free attention.
    Returns None when packed rows are proven to give what the model's own attention gives them padded
    (and padded calls through the new function too); otherwise the model is left as it was and the
    reason is returned (the caller pads, saying so in one line)."""
    lm = causal_lm(model)
    original = getattr(lm.config, "_attn_implementation", None) or "eager"
    if original.startswith(PREFIX):
        return None
    kind = type(lm).__name__
    if original not in SUPPORTED:
        return (
            f"{kind} uses attention '{original}', which padding-free batches do not support "
            "(sdpa, eager, flash_attention_2/3 do)"
        )
    if not lm._can_set_attn_implementation():
        return (
            f"{kind} does not route attention through transformers' AttentionInterface, so rows could not be kept apart"
        )
    rows = _probe_rows(lm)
    want = _hidden(lm, rows, packed=False)  # the model's own attention, padded
    lm.set_attn_implementation(_register(original))
    try:
        diff = max(_rel(_hidden(lm, rows, packed=True), want), _rel(_hidden(lm, rows, packed=False), want))
        why = (
            None
            if diff <= _tolerance(lm)
            else (
                f"{kind}: packed rows did not give the padded rows' hidden states (relative difference {diff:.2g}): "
                "some layer ignores the row boundaries (linear attention, convolutions) or its attention has what "
                "PyTorch's SDPA lacks"
            )
        )
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as e:  # e.g. SDPA refusing a softcap
        why = f"{kind}: packed attention failed on this model ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    if why is not None:
        lm.set_attn_implementation(original)
    return why


def disable(model) -> None:
    """Back to the attention kind the model had before :func:`enable` (for saving or sharing it)."""
    lm = causal_lm(model)
    name = getattr(lm.config, "_attn_implementation", None) or ""
    if name.startswith(PREFIX):
        lm.set_attn_implementation(name[len(PREFIX) :])
