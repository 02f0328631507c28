"""Data-parallel pact-train on torch.distributed: one process per GPU (or per CPU share, gloo).

``torchrun --nproc-per-node N -m pact_train ...`` and ``accelerate launch --multi_gpu -m pact_train ...``
start N copies of pact-train with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address in the environment; :func:`setup` joins the process group from them (NCCL on CUDA, gloo on
CPU). What each rank does is decided in :func:`pact_train.loop.train`:

* every rank reads the same seeded row order and takes the rows ``rank, rank + N, ...`` of each
  global micro-batch of ``batch_size * N`` rows, so the shares are disjoint, deterministic, and
  the same global batches as one process with ``batch_size * N`` (a rank left without a row in
  the last, short batch runs one row at weight 0, so that every rank joins every all-reduce);
* the loss of a micro-batch is its sum divided by the response tokens of the whole accumulation
  window on all ranks, times N (DDP averages gradients over ranks): the gradient is exactly the
  token-weighted mean over the global window, as in one process;
* only rank 0 writes (config, metrics, checkpoints, adapter); all ranks resume from the same
  checkpoint and data position.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pact_cache.errors import PactError, preview


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float], device) -> list[float]:
        """Sum of each value over all ranks (float64), in one all-reduce."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def mean_split_(self, params: list, task_grads: list) -> None:
        """``--clip split``: the two groups' gradients (``task_grads`` and the parameters' ``.grad``), kept out of
        DDP's all-reduce, replaced in place by their mean over all ranks (the average DDP's own all-reduce
        makes). A rank that had no row of a group in the window reduces zeros, so every rank reduces the same
        tensors."""
        if self.world == 1:
            return
        for j, p in enumerate(params):
            task_grads[j] = torch.zeros_like(p) if task_grads[j] is None else task_grads[j]
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        for t in task_grads + [p.grad for p in params]:
            dist.all_reduce(t)
            t.div_(self.world)

    def wrap(self, model, device: str):
        """The model under DistributedDataParallel (itself when there is one process)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None
        )

    @staticmethod
    def no_sync(wrapped, sync: bool):
        """Skip the gradient all-reduce on the micro-batches before the last of a window."""
        if sync or not hasattr(wrapped, "no_sync"):
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def take(self, rows: list) -> tuple[list, float]:
        """This rank's rows of a global micro-batch and the weight of their loss (0 for a stand-in row)."""
        mine = rows[self.rank :: self.world]
        return (mine, 1.0) if mine else (rows[:1], 0.0)


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise PactError(
            f"environment variable {name}={preview(raw)} is not an integer; start pact-train with torchrun "
            f"or "
            "accelerate launch, which set it"
        ) from None


def ranks_from_env() -> Ranks:
    """The process's place in a torchrun / accelerate launch job; one process when WORLD_SIZE is unset or 1."""
    if os.environ.get("WORLD_SIZE", "").strip() == "" or _env_int("WORLD_SIZE") <= 1:
        return Ranks()
    r = Ranks(_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK"))
    if not 0 <= r.rank < r.world:
        raise PactError(
            f"RANK={r.rank} is outside 0..{r.world - 1} (WORLD_SIZE={r.world}); check the launcher's settings"
        )
    return r


def setup(device: str) -> tuple[Ranks, str]:
    """Join the process group (if launched as several processes) and pick this process's device."""
    from pact_cache.models import pick_device

    r = ranks_from_env()
    if r.world == 1:
        return r, pick_device(device)
    if device not in ("auto", "cuda", "cpu"):
        raise PactError(
            f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; use --device auto, cuda or cpu"
        )
    if device != "cpu" and torch.cuda.is_available():
        dev, backend = f"cuda:{r.local_rank}", "nccl"
        torch.cuda.set_device(r.local_rank)
    elif device == "cuda":
        raise PactError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    else:
        dev, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return r, dev


def teardown(r: Ranks) -> None:
    """Leave the process group once nothing holds it: the run's model (DDP/FSDP wrappers keep the group)
    is collected first, since gloo objects left to interpreter exit can abort a finished rank."""
    if r.world > 1 and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
