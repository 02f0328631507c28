"""Checkpoints: safetensors for tensors, JSON for everything else; no pickle anywhere.

A checkpoint folder holds the trainable weights (the PEFT adapter in ``PeftModel.save_pretrained``
layout, or the full model), the optimizer state, the RNG state and ``trainer_state.json`` (step,
data position, scheduler, metrics count). It is written to a temporary folder and renamed into
place, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pact_cache.errors import PactError, preview
from pact_cache.storage import read_limited, staged_dir, stale_tmp
from pact_cache.typedjson import load_json


def _optimizer_to_files(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    seen: set = set()  # bitsandbytes shares one quantization map between parameters: safetensors wants copies
    for pid, st in sd["state"].items():
        for key, val in st.items():
            # bitsandbytes' 8-bit optimizers keep a parameter's tensors in one dict under one key:
            # stored as "pid.key.name", put back as that dict
            for name, v in val.items() if isinstance(val, dict) else [(None, val)]:
                where = f"{pid}.{key}" if name is None else f"{pid}.{key}.{name}"
                if isinstance(v, torch.Tensor):
                    shared = v.numel() and v.untyped_storage().data_ptr() in seen
                    seen.add(v.untyped_storage().data_ptr())
                    tensors[where] = (v.detach().clone() if shared else v.detach()).contiguous().cpu()
                else:
                    scalars[where] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _same_kind(value, like) -> bool:
    """Whether a recorded optimizer setting is of the kind the optimizer's own is: a flag, a finite number, a
    string, a sequence of as many of them; None where the optimizer has None (or a flag)."""
    if isinstance(like, bool) or like is None:
        return isinstance(value, bool) or (like is None and value is None)
    if isinstance(like, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(like, (list, tuple)):
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(like)
            and all(_same_kind(v, w) for v, w in zip(value, like))
        )
    return isinstance(value, type(like))


def _check_param_groups(optimizer, groups, where: Path) -> None:
    """The recorded ``param_groups`` against the optimizer's own: as many groups, the same parameter indices, each
    setting of the same kind (a setting the optimizer lacks, the scheduler's ``initial_lr``, a finite number). An
    edited trainer_state.json would otherwise load, and fail at the first step or train with a setting of the
    wrong type."""
    now = optimizer.state_dict()["param_groups"]
    bad = None
    if not isinstance(groups, list) or len(groups) != len(now):
        bad = f"{len(now)} parameter group(s) expected"
    for i, (g, n) in enumerate(zip(groups, now) if bad is None else ()):
        if not isinstance(g, dict) or g.get("params") != n["params"]:
            bad = f"group {i}: its parameters are not the model's"
        else:
            bad = next(
                (
                    f"group {i}: {preview(k)} is {preview(v)}"
                    for k, v in g.items()
                    if k != "params" and not _same_kind(v, n.get(k, 0.0))
                ),
                None,
            )
        if bad:
            break
    if bad:
        raise PactError(
            f"{where}/trainer_state.json: optimizer {bad}; the checkpoint is damaged: delete the run folder and start "
            "again, or restore it from a copy"
        )


def _optimizer_from_files(optimizer, tensors: dict, meta: dict, folder: Path) -> None:
    _check_param_groups(optimizer, meta.get("param_groups") if isinstance(meta, dict) else None, folder)
    state: dict = {}
    for where, val in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key, *name = where.split(".", 2)
        st = state.setdefault(int(pid), {})
        if name:
            st.setdefault(key, {})[name[0]] = val
        else:
            st[key] = val
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, model, optimizer, trainer_state: dict) -> None:
    path = Path(path)
    with staged_dir(path, replace=True) as tmp:  # the previous checkpoint stays whole until this one is in place
        model.save_pretrained(tmp / "weights", safe_serialization=True)
        opt_tensors, opt_meta = _optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "optimizer": opt_meta}, indent=2))
    for old in path.parent.glob(f".{path.name}.old-*"):  # a previous kill's fallback, now superseded
        shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(out: Path) -> None:
    """Remove what killed runs left in ``out``: temporary folders of dead processes, and old
    checkpoints once a complete one is in place."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if stale_tmp(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    if (out / "checkpoint" / "trainer_state.json").exists():
        for old in out.glob(".checkpoint.old-*"):
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder, or the previous one if a kill landed between the two renames of
    :func:`pact_cache.storage.publish_dir` (left as ``.checkpoint.old-*``)."""
    path = Path(path)
    if (path / "trainer_state.json").exists():
        return path
    old = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return old[-1] if old and (old[-1] / "trainer_state.json").exists() else None


def load_checkpoint(path: Path, model, optimizer, is_peft: bool) -> dict:
    """Restore weights, optimizer and RNG in place; return the trainer state. A damaged checkpoint
    (truncated file, edited JSON, tensors of the wrong shape) is one ``PactError``."""
    found = find_checkpoint(path)
    if found is None:
        raise PactError(f"{path}: no checkpoint to resume from; start a new run in another -o")
    try:
        where = str(found / "trainer_state.json")
        state = load_json(
            read_limited(found / "trainer_state.json", 1 << 16, where, PactError, "checkpoint state"),
            where,
            PactError,
            "checkpoint state",
            fix="the checkpoint is damaged: delete the run folder and start again, or restore it from a copy",
        )
        if not isinstance(state, dict) or not all(
            isinstance(state.get(k), int) and not isinstance(state[k], bool) and 0 <= state[k] < 2**63
            for k in ("step", "epoch", "rows_taken", "tokens_total")
        ):
            raise PactError(
                f"{found}/trainer_state.json: step, epoch, rows_taken and tokens_total must be non-negative "
                "integers below 2**63; the checkpoint is damaged: delete the run folder and start again, or restore it "
                "from a copy"
            )
        weights = found / "weights"
        if is_peft:
            from peft import set_peft_model_state_dict

            sd = load_file(str(weights / "adapter_model.safetensors"))
            _check_finite(sd, weights)
            res = set_peft_model_state_dict(model, sd)
            if getattr(res, "unexpected_keys", None):
                raise PactError(
                    f"{weights}: checkpoint does not fit the model (unexpected {res.unexpected_keys[:3]}); "
                    "resume with the --model and LoRA settings the run started from"
                )
        else:
            sd = {}
            for f in sorted(weights.glob("*.safetensors")):
                sd.update(load_file(str(f)))
            _check_finite(sd, weights)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if unexpected or any("lm_head" not in k for k in missing):  # tied heads are not saved twice
                raise PactError(
                    f"{weights}: checkpoint does not fit the model (missing {missing[:3]}, unexpected "
                    f"{unexpected[:3]}); "
                    "resume with the --model the run started from, or start a new run in another -o"
                )
        opt = load_file(str(found / "optimizer.safetensors"))
        _check_finite(opt, found / "optimizer.safetensors")
        _optimizer_from_files(optimizer, opt, state.pop("optimizer"), found)
        rng = load_file(str(found / "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = sorted((k for k in rng if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
            if cuda:
                torch.cuda.set_rng_state_all([rng[k] for k in cuda])
    except PactError:
        raise
    except Exception as err:  # safetensors, torch and KeyError on truncated or edited files
        raise PactError(
            f"{found}: the checkpoint is damaged ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120] if str(err) else ''}); "
            "delete the run folder and start again, or restore it from a copy"
        ) from None
    return state


def _check_finite(tensors: dict, where: Path) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PactError(
                f"{where}: tensor {name} holds NaN or infinity; the checkpoint is damaged, start again "
                f"from an earlier copy"
            )
