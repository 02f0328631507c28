"""AsFT's alignment direction, computed once, offline (``pact-cache direction``).

AsFT (arXiv 2506.08473, PKU-YuanGroup/AsFT) keeps the aligned and the base weights in memory and,
for every LoRA module, regularises the update ``B A`` with ``||(I - C) B A||_F^2`` where
``V = W_aligned - W_base`` (out, in) and ``C = V V^T / ||V||_F`` (out, out), as its code defines C
(``torch.mm(vec, vec.t()) / torch.norm(vec)``; not a projector unless ``||V||_F = 1``). The term
needs only ``V V^T`` and ``||V||_F``, so a direction file stores, per module, a factor ``P`` with
``P P^T = V V^T`` and the scalar ``||V||_F``; the trainer then forms ``(I - C) B = B - P (P^T B) /
||V||_F`` and never a d x d matrix.

File format ``pact-direction/1``, a safetensors file:

- tensors, for each module name ``M`` (its dotted path in the plain model, e.g.
  ``model.layers.0.self_attn.q_proj``): ``M.P`` float32 (out, p) and ``M.norm`` float32 of shape ().
  With the full direction ``P = V`` (p = in); with ``--rank r``, ``P = U_r diag(s_r)`` from the SVD of
  ``V`` (p = r), and ``P P^T`` is the best rank-r approximation of ``V V^T``.
- metadata ``pact``: JSON ``{"format", "modules", "rank" (null: full), "errors" ({module: the relative
  Frobenius error of P P^T against V V^T}), "aligned", "base" (model fingerprints)}``.

A reader MUST reject a file whose metadata is missing or of another format, whose tensors do not
match the module list, that holds a non-finite value, whose norm is not positive, or whose
``||P||_F^2 / norm`` exceeds 1e30 (the penalty's float32 products would overflow); it MAY ignore
modules a run does not train.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PactError

DIRECTION_FORMAT = "pact-direction/1"


class DirectionError(PactError):
    """A direction file is malformed or does not fit the model."""


@dataclass(frozen=True)
class Direction:
    """Per module: ``P`` (out, p) with ``P P^T = V V^T`` and ``norm = ||V||_F``."""

    factors: dict  # module name -> (P, norm) tensors
    rank: int | None = None
    errors: dict = field(default_factory=dict)
    aligned: dict | None = None
    base: dict | None = None

    def metadata(self) -> dict:
        return {
            "format": DIRECTION_FORMAT,
            "modules": sorted(self.factors),
            "rank": self.rank,
            "errors": self.errors,
            "aligned": self.aligned,
            "base": self.base,
        }


def compute_direction(
    aligned, base, modules: list[str], rank: int | None = None, aligned_fp=None, base_fp=None, progress=None
) -> Direction:
    """``V = W_aligned - W_base`` for every ``nn.Linear`` whose last name is in ``modules`` (the LoRA
    targets); the full ``V`` or its rank-``rank`` SVD factor. Both models must have the same layout."""
    import torch

    b_mods = dict(base.named_modules())
    factors, errors = {}, {}
    found = [
        (n, m) for n, m in aligned.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in modules
    ]
    if not found:
        raise DirectionError(
            f"--modules {','.join(modules)}: no linear layer of the aligned model has one of these names"
        )
    for name, mod in progress(found) if progress else found:
        other = b_mods.get(name)
        if not isinstance(other, torch.nn.Linear) or other.weight.shape != mod.weight.shape:
            raise DirectionError(
                f"{name}: the base model has no linear layer of shape {tuple(mod.weight.shape)} "
                f"there; "
                "--aligned and --base must be the same architecture"
            )
        V = mod.weight.detach().float() - other.weight.detach().float()
        norm = torch.linalg.matrix_norm(V)
        if not torch.isfinite(V).all():
            raise DirectionError(f"{name}: the weights hold non-finite values")
        if norm == 0:
            raise DirectionError(
                f"{name}: the aligned and base weights are equal there (V = 0); AsFT has no direction "
                f"to "
                "anchor to: are --aligned and --base the same model?"
            )
        if rank is None or rank >= min(V.shape):
            P, err = V, 0.0
        else:
            U, s, _ = torch.linalg.svd(V, full_matrices=False)
            P = U[:, :rank] * s[:rank]
            err = float((s[rank:] ** 4).sum().sqrt() / (s**4).sum().sqrt())  # ||VV^T - PP^T||_F / ||VV^T||_F
        factors[name] = (P.contiguous(), norm.reshape(()))
        errors[name] = err
    return Direction(factors, rank, errors, aligned_fp, base_fp)


def save_direction(direction: Direction, path: Path) -> None:
    """Atomic write; nothing existing is overwritten (the caller checks)."""
    from safetensors.torch import save

    from .storage import atomic_write_bytes

    tensors = {}
    for name, (P, norm) in direction.factors.items():
        tensors[f"{name}.P"], tensors[f"{name}.norm"] = P.float().contiguous().cpu(), norm.float().cpu()
    atomic_write_bytes(Path(path), save(tensors, metadata={"pact": json.dumps(direction.metadata())}))


FLOAT32_SAFE = 1e30  # well below float32's 3.4e38: room for the LoRA factors' own scale


def read_direction(path: str | Path) -> Direction:
    """Parse and validate a ``pact-direction/1`` file (see the module docstring)."""
    import torch
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    fix = "make it again with `pact-cache direction`"
    if not p.is_file():
        raise DirectionError(
            f"{path}: no such direction file; make one with `pact-cache direction --aligned A --base B -o {path}`"
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("pact")
            keys = set(f.keys())
            if meta_raw is None:
                raise DirectionError(f"{path}: a safetensors file without pact-direction metadata; {fix}")
            try:
                meta = json.loads(meta_raw)
            except ValueError:
                raise DirectionError(f"{path}: its metadata is not JSON; {fix}") from None
            if not isinstance(meta, dict) or meta.get("format") != DIRECTION_FORMAT:
                raise DirectionError(f"{path}: not a {DIRECTION_FORMAT} file; {fix}")
            modules = meta.get("modules")
            rank = meta.get("rank")
            errors = meta.get("errors")
            if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
                raise DirectionError(f"{path}: metadata 'modules' must be a non-empty list of module names; {fix}")
            if rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
                raise DirectionError(f"{path}: metadata 'rank' must be null or a positive integer; {fix}")
            if not isinstance(errors, dict) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in errors.values()
            ):
                raise DirectionError(f"{path}: metadata 'errors' must map modules to finite numbers; {fix}")
            want = {f"{m}.{s}" for m in modules for s in ("P", "norm")}
            if keys != want:
                odd = sorted(keys ^ want)[:3]
                raise DirectionError(f"{path}: its tensors do not match its module list (e.g. {odd}); {fix}")
            factors = {}
            for m in modules:
                P, norm = f.get_tensor(f"{m}.P"), f.get_tensor(f"{m}.norm")
                if P.dim() != 2 or norm.dim() != 0 or P.dtype != torch.float32 or norm.dtype != torch.float32:
                    raise DirectionError(f"{path}: {m}: P must be a float32 matrix and norm a float32 scalar; {fix}")
                if not (torch.isfinite(P).all() and torch.isfinite(norm) and norm > 0):
                    raise DirectionError(f"{path}: {m}: non-finite values or a norm that is not positive; {fix}")
                # the penalty forms P (P^T B) / norm in float32: ||P||_F^2 / norm bounds its scale, so it must be a
                # float32 number (finite values whose products overflow would stop training with NaN later)
                scale = float((P.double() ** 2).sum() / norm.double())
                if not math.isfinite(scale) or scale > FLOAT32_SAFE:
                    raise DirectionError(
                        f"{path}: {m}: values whose products overflow float32 (||P||^2 / norm = {scale:.3g}); {fix}"
                    )
                factors[m] = (P, norm)
    except SafetensorError as err:
        raise DirectionError(f"{path}: not a readable safetensors file ({err}); {fix}") from None
    except OSError as err:
        raise DirectionError(f"{path}: cannot be read ({err.strerror or err})") from None
    aligned, base = meta.get("aligned"), meta.get("base")
    return Direction(
        factors,
        rank,
        dict(errors),
        aligned if isinstance(aligned, dict) else None,
        base if isinstance(base, dict) else None,
    )
