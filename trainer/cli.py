"""``pact-train``: a thin command line over :func:`trainer.loop.train`."""

from __future__ import annotations

import argparse
import os
import sys

from pact_cache.cli import OneLineParser, add_storage_option, positive_int, run_command
from pact_cache.storage import parse_storage_options
from pact_cache.errors import PactError

from .losses import METHODS, PactParams
from .loop import TrainConfig, train


PACT_HELP = {"T": "distillation temperature T", "T_gate": "temperature of the gate's competitive index",
             "top_p": "probability mass the competitive index counts tokens to", "alpha": "gate slope",
             "bias": "gate bias", "N": "response steps before the gate decays", "tau": "decay constant of the gate",
             "boost": "gate multiplier"}


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(model="", cache="", out="")
    p = OneLineParser(prog="pact-train", description="Fine-tune with PACT (or plain SFT), one model in memory, reference targets streamed from a pact-cache.")
    p.add_argument("--model", required=True, metavar="MODEL", help="policy to fine-tune: folder, hub id or smollm2-135m-instruct")
    p.add_argument("--cache", required=True, metavar="CACHE", help="cache from `pact-cache build` (built with this model's tokenizer)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="run folder: metrics.jsonl, config.json, checkpoint/, adapter/ or model/, loss.png")
    p.add_argument("--cache-id", metavar="ID", help="pin the cache: refuse it unless its content id is ID (or starts with it, 8+ characters)")
    add_storage_option(p)
    p.add_argument("--method", choices=list(METHODS), default=d.method,
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + f" (default {d.method})")
    p.add_argument("--reference", choices=["cache", "online"], default=d.reference, help="cache (default) or online: a live reference model beside the policy, the paper's way")
    p.add_argument("--ref-model", metavar="MODEL", help="reference for --reference online (default: --model)")
    p.add_argument("--direction", metavar="FILE", help="for --method asft: the alignment direction per LoRA module, made once "
                   "with `pact-cache direction --aligned A --base B -o FILE`")
    p.add_argument("--token-mask", type=float, default=d.token_mask, metavar="FRACTION",
                   help="TOSS: leave the highest-scoring FRACTION of all the cache's response tokens (e.g. 0.2, the paper's) out of "
                   "the CE; needs a cache scored with `pact-cache score`; works with any --method (default 0: none)")
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam, help="weight of the method's term against the cross-entropy (default 1.0)")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (default 8, the paper's)")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout (default 0.05)")
    p.add_argument("--lora-targets", default=d.lora_targets, help="comma-separated module names (default q_proj,v_proj)")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the cache (default 1)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step, weighted by response tokens")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW (default 3e-5)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps (default: 3%% of the run)")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant", "step"], default=d.schedule, help="decay after warmup; step = the paper's StepLR, gamma 0.85 per epoch")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data order, LoRA init and dropout (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="take rows in cache order, batch by batch")
    p.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="rows held for shuffling (memory bound)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--logits-chunk", type=int, default=d.logits_chunk, help="response positions per (positions, vocab) logits block")
    p.add_argument("--save-every", type=int, default=d.save_every, help="optimizer steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    p.add_argument("--merge", action="store_true", help="also write OUT/merged, the base model with the adapter merged in")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("PACT gate and distillation (defaults: the paper's)")
    for name, val in vars(PactParams()).items():
        g.add_argument(f"--pact-{name.lower().replace('_', '-')}", dest=f"pact_{name}", type=type(val), default=val,
                       help=f"{PACT_HELP[name]} (default {val})")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    prog = "pact-train"
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):  # under torchrun / accelerate launch: name the rank
        prog = f"pact-train[rank {os.environ.get('RANK', '?')}]"
    return run_command(prog, _train, a, "interrupted; continue with --resume from the last checkpoint")


def _train(a) -> int:
    pact = PactParams(**{k[5:]: v for k, v in vars(a).items() if k.startswith("pact_")})
    cfg = TrainConfig(model=a.model, cache=a.cache, out=a.output, cache_pin=a.cache_id,
                      storage_options=parse_storage_options(a.storage_option), method=a.method, reference=a.reference, ref_model=a.ref_model, direction=a.direction, token_mask=a.token_mask,
                      lam=a.lam, pact=pact, full=a.full, lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                      lora_targets=a.lora_targets, epochs=a.epochs, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
                      weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, schedule=a.schedule, max_steps=a.max_steps,
                      seed=a.seed, shuffle=not a.no_shuffle, shuffle_buffer=a.shuffle_buffer, grad_checkpointing=a.gradient_checkpointing,
                      logits_chunk=a.logits_chunk, save_every=a.save_every, resume=a.resume, merge=a.merge, device=a.device,
                      progress=not a.no_progress)
    import torch.distributed

    try:
        res = train(cfg)
    except torch.distributed.DistError as err:  # a peer process stopped: its own line says why
        raise PactError(f"another process of this job stopped ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                        "see its message above, then rerun with --resume") from None
    if res.get("main", True):
        print(f"{res['out']}: {res['steps']} steps in {res['seconds']:.0f}s; weights in {res['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def build_eval_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="pact-eval", description="Evaluate a model (optionally with a PEFT adapter): refusal rate on harmful "
                                "and benign prompts, safety-token drift against a cache, task accuracy. Outputs go to OUT as JSONL.")
    p.add_argument("--model", required=True, metavar="MODEL", help="base model: folder, hub id or smollm2-135m-instruct")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT adapter folder (pact-train's OUT/adapter)")
    p.add_argument("--harmful", metavar="FILE", help="harmful prompts: refusal rate (any dataset format; prompt-only rows allowed)")
    p.add_argument("--benign", metavar="FILE", help="benign prompts: the rate of (unwanted) refusals")
    p.add_argument("--task", metavar="FILE", help="classification-style Alpaca/prompt-completion rows: exact-match accuracy")
    p.add_argument("--drift-cache", metavar="CACHE", help="a cache of the reference's own answers: mean safety-token KL to it")
    p.add_argument("--limit", type=positive_int, help="use the first N rows of each file (N >= 1)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="generated tokens per prompt (default 64; 8 suffice for --task)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per generation batch (default 16)")
    p.add_argument("--cache-id", metavar="ID", help="pin --drift-cache: refuse it unless its content id is ID (or starts with it)")
    add_storage_option(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--device-map", choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="a model larger than one GPU: spread its layers over this machine's GPUs and CPU memory (accelerate)")
    p.add_argument("--judge", metavar="MODEL", help="a guard model (e.g. meta-llama/Llama-Guard-3-8B, the paper's judge) that "
                   "labels each answer safe/unsafe: the harmful-content rate beside the keyword refusal rate")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for harmful.jsonl, benign.jsonl, task.jsonl, summary.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main_eval(argv: list[str] | None = None) -> int:
    a = build_eval_parser().parse_args(argv)
    return run_command("pact-eval", _eval, a, "interrupted; nothing was written")


def _eval(a) -> int:
    import json
    import math
    from pathlib import Path

    from pact_cache.format import open_cache

    from pact_cache.storage import atomic_write_json, staged_dir

    from .evaluate import GuardJudge, KeywordJudge, load_eval_model, refusal_rate, safety_token_drift, task_accuracy

    if not (a.harmful or a.benign or a.task or a.drift_cache):
        raise PactError("nothing to evaluate: give --harmful, --benign, --task and/or --drift-cache")
    if a.judge and not (a.harmful or a.benign):
        raise PactError("--judge labels the answers to --harmful (and --benign) prompts; give --harmful")
    out = Path(a.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PactError(f"-o {out}: exists and is not an empty folder; choose another -o (nothing is overwritten)")
    from pact_cache.data import prompts_from

    sets = {k: prompts_from(v, a.limit) for k, v in (("harmful", a.harmful), ("benign", a.benign), ("task", a.task)) if v}
    for name, rows in sets.items():
        if not rows:
            raise PactError(f"{getattr(a, name)}: holds no prompts, so no {name} rate can be computed; give a file with at least one row")
    cache = (open_cache(a.drift_cache, cache_id=a.cache_id, storage_options=parse_storage_options(a.storage_option))
             if a.drift_cache else None)
    if cache is not None and cache.num_rows == 0:
        raise PactError(f"{a.drift_cache}: the cache holds no rows, so no drift can be computed")
    model, tok, device = load_eval_model(a.model, a.adapter, a.device, a.device_map)
    gen = dict(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, device=device, progress=not a.no_progress)
    judge = KeywordJudge()
    guard = GuardJudge.load(a.judge, a.device, a.device_map, a.batch_size) if a.judge else None
    summary = {"model": a.model, "adapter": a.adapter}
    with staged_dir(out) as tmp:  # everything goes here first; OUT appears whole, or not at all
        for name in ("harmful", "benign"):
            if name in sets:
                summary[f"{name}_refusal"] = refusal_rate(model, tok, sets[name], judge, tmp / f"{name}.jsonl", guard=guard, **gen)
        if "task" in sets:
            summary["task"] = task_accuracy(model, tok, sets["task"], tmp / "task.jsonl", **gen)
        if cache is not None:
            summary["drift"] = safety_token_drift(model, cache, device)
            if not math.isfinite(summary["drift"]["mean_kl"]):
                raise PactError(f"{a.drift_cache}: the safety-token drift is {summary['drift']['mean_kl']} (not finite); "
                                "the model's logits overflow on these rows: check the model or adapter")
        atomic_write_json(tmp / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0

