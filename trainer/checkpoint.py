"""Checkpoints: safetensors for tensors, JSON for everything else; no pickle anywhere.

A checkpoint folder holds the trainable weights (the PEFT adapter in ``PeftModel.save_pretrained``
layout, or the full model), the optimizer state, the RNG state and ``trainer_state.json`` (step,
data position, scheduler, metrics count). It is written to a temporary folder and renamed into
place, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pact_cache.errors import PactError


def _optimizer_to_files(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, val in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, model, optimizer, trainer_state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "weights", safe_serialization=True)
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "optimizer": opt_meta}, indent=2))
    replace_dir(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final``; the old one stays whole until the new one is in
    place (a kill between the renames leaves ``.{name}.old-*``, which :func:`find_checkpoint` uses)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder, or the previous one if a kill landed between the two renames."""
    path = Path(path)
    if (path / "trainer_state.json").exists():
        return path
    old = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return old[-1] if old and (old[-1] / "trainer_state.json").exists() else None


def load_checkpoint(path: Path, model, optimizer, is_peft: bool) -> dict:
    """Restore weights, optimizer and RNG in place; return the trainer state."""
    path = find_checkpoint(path)
    state = json.loads((path / "trainer_state.json").read_text())
    weights = path / "weights"
    if is_peft:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(weights / "adapter_model.safetensors")))
    else:
        sd = {}
        for f in sorted(weights.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or any("lm_head" not in k for k in missing):  # tied heads are not saved twice
            raise PactError(f"{weights}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                            "resume with the --model the run started from, or start a new run in another -o")
    _optimizer_from_files(optimizer, load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = sorted((k for k in rng if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        torch.cuda.set_rng_state_all([rng[k] for k in cuda])
    return state
