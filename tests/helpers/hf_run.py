"""A transformers Trainer run from a cache with PactTrainer, for tests/trainer/test_distributed.py (under
torchrun: each process one rank). argv: MODEL CACHE OUT BATCH_PER_DEVICE GRAD_ACCUM STEPS [GATE_AT]; with
GATE_AT, clip="split" and a hard row gate at that step-0 refusal mass.
Rank 0 writes OUT/log_history.json and OUT/run.json (how accelerate ran it)."""

import gc
import json
import sys
from pathlib import Path

import torch
from pact_train.hf import CacheDataset, PactCollator, PactTrainer
from pact_train.loop import TrainConfig, load_policy
from pact_train.losses import LossParams
from pact_train.stream import RowGate
from transformers import TrainingArguments

from pact_cache.format import open_cache

model_path, cache_path, out, batch, accum, steps = sys.argv[1:7]
gate_at = float(sys.argv[7]) if len(sys.argv) > 7 else None
torch.manual_seed(0)
model, tok, _ = load_policy(TrainConfig(model=model_path, cache="", out="", lora_dropout=0.0).policy_settings(), "cpu")
cache = open_cache(cache_path)
args = TrainingArguments(
    output_dir=out,
    remove_unused_columns=False,
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    per_device_train_batch_size=int(batch),
    gradient_accumulation_steps=int(accum),
    max_steps=int(steps),
    logging_steps=1,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    warmup_steps=0,
    ddp_backend="gloo",
    disable_tqdm=True,
)
trainer = PactTrainer(
    model=model,
    args=args,
    train_dataset=CacheDataset(cache),
    data_collator=PactCollator(
        tok.pad_token_id, row_gate=None if gate_at is None else RowGate.of_cache(cache, "hard", gate_at)
    ),
    cache=cache,
    loss_params=LossParams(lam=1.0),
    clip="joint" if gate_at is None else "split",
)
trainer.train()
if trainer.is_world_process_zero():
    Path(out, "log_history.json").write_text(json.dumps(trainer.state.log_history))
    Path(out, "run.json").write_text(
        json.dumps(
            {
                "distributed_type": trainer.accelerator.distributed_type.value,
                "processes": trainer.accelerator.num_processes,
            }
        )
    )
# free what holds the process group, then leave it explicitly: gloo's threads still alive at interpreter
# exit can abort the process ("terminate called without an active exception"), as tests/helpers/fsdp_check.py saw
del trainer, model
gc.collect()
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
