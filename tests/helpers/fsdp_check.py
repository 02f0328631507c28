"""FSDP2 (torch's fully_shard: every decoder layer and the root, gloo on CPU) around the loss core,
for tests/trainer/test_distributed.py. argv: MODEL CACHE. Each rank takes its rows of the first 4; the
sharded gradients, gathered and summed over ranks, must equal one process's on all 4 rows.
Prints the largest relative difference; exit status 1 if it exceeds 1e-5."""

import copy
import gc
import sys

import torch
import torch.distributed as dist
from pact_train.loop import TrainConfig, load_policy, policy_losses
from pact_train.losses import LossParams
from pact_train.stream import collate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from pact_cache.format import open_cache

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cache = open_cache(sys.argv[2])
rows = list(cache.iter_rows())[:4]
ids, weights = torch.tensor(cache.ids), torch.tensor(cache.tokens.weights)
params = LossParams(lam=0.7, logits_chunk=3)
torch.manual_seed(0)
model, tok, _ = load_policy(TrainConfig(model=sys.argv[1], cache="", out="", full=True).policy_settings(), "cpu")

one = copy.deepcopy(model)  # one process, all rows
batch = collate(rows, tok.pad_token_id)
ce, kl, n = policy_losses(one, batch, ids, weights, params)
((ce + params.lam * kl) / n).backward()
want = {k: p.grad for k, p in one.named_parameters()}

mesh = init_device_mesh("cpu", (world,))
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
ce, kl, _ = policy_losses(model, collate(rows[rank::world], tok.pad_token_id), ids, weights, params)
((ce + params.lam * kl) * world / n).backward()  # FSDP averages the gradients over ranks
worst = max(
    ((p.grad.full_tensor() - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-12)).item()
    for k, p in model.named_parameters()
)
if rank == 0:
    print(f"FSDP2 largest relative gradient difference {worst:.3g}")
# free the sharded model and its mesh (they hold the process group) before leaving the group: left to
# interpreter exit, gloo's threads aborted one rank in about 1 run of 13 here ("terminate called without
# an active exception", after both ranks had passed destroy_process_group); 0 of 80 with this
del model, mesh
gc.collect()
dist.destroy_process_group()
sys.exit(0 if worst < 1e-5 else 1)
