"""``pact-train``: a thin command line over :func:`pact_train.loop.train`."""

from __future__ import annotations

import argparse
import os
import sys

from pact_cache.cliutil import OneLineParser, add_storage_option, add_version, positive_int, run_command
from pact_cache.errors import PactError
from pact_cache.storage import parse_storage_options

from .config import parse_config
from .loop import train


def build_parser() -> argparse.ArgumentParser:
    """pact-train's parser (generated from :class:`pact_train.config.TrainConfig`)."""
    from .config import build_parser as generated

    return generated(OneLineParser)


def main(argv: list[str] | None = None) -> int:
    prog = "pact-train"
    if os.environ.get("WORLD_SIZE", "1").strip() not in (
        "",
        "0",
        "1",
    ):  # under torchrun / accelerate launch: name the rank
        prog = f"pact-train[rank {os.environ.get('RANK', '?')}]"
    return run_command(
        prog,
        lambda _: _train(parse_config(argv, OneLineParser)),
        None,
        "interrupted; continue with --resume from the last checkpoint",
    )


def _train(cfg) -> int:
    import torch.distributed

    try:
        res = train(cfg)
    except torch.distributed.DistError as err:  # a peer process stopped: its own line says why
        raise PactError(
            f"another process of this job stopped ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120]}); "
            "see its message above, then rerun with --resume"
        ) from None
    if res.get("main", True):
        print(f"{res['out']}: {res['steps']} steps in {res['seconds']:.0f}s; weights in {res['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def build_eval_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="pact-eval",
        description="Evaluate a model (optionally with a PEFT adapter): refusal rate "
        "on harmful "
        "and benign prompts, safety-token drift against a cache, task accuracy. Outputs go to "
        "OUT as JSONL.",
    )
    add_version(p)
    p.add_argument(
        "--model", required=True, metavar="MODEL", help="base model: folder, hub id or smollm2-135m-instruct"
    )
    p.add_argument("--adapter", metavar="DIR", help="a PEFT adapter folder (pact-train's OUT/adapter)")
    p.add_argument(
        "--harmful", metavar="FILE", help="harmful prompts: refusal rate (any dataset format; prompt-only rows allowed)"
    )
    p.add_argument("--benign", metavar="FILE", help="benign prompts: the rate of (unwanted) refusals")
    p.add_argument(
        "--look-risky",
        nargs="?",
        const="",
        metavar="FILE",
        help="over-refusal: the refusal rate on benign "
        "prompts that "
        'only look risky ("How do I kill a Python process?"); without FILE the package\'s 121 prompts '
        "(resources/look_risky.jsonl, written for pact-cache in the XSTest style)",
    )
    p.add_argument(
        "--task", metavar="FILE", help="classification-style Alpaca/prompt-completion rows: exact-match accuracy"
    )
    p.add_argument(
        "--drift-cache", metavar="CACHE", help="a cache of the reference's own answers: mean safety-token KL to it"
    )
    p.add_argument("--limit", type=positive_int, help="use the first N rows of each file (N >= 1)")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=64,
        help="generated tokens per prompt (default 64; 8 suffice for --task)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per generation batch (default 16)")
    p.add_argument(
        "--cache-id", metavar="ID", help="pin --drift-cache: refuse it unless its content id is ID (or starts with it)"
    )
    add_storage_option(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="a model larger than one GPU: spread its layers over this machine's GPUs and CPU memory (accelerate)",
    )
    p.add_argument(
        "--judge",
        metavar="MODEL",
        help="a guard model (e.g. meta-llama/Llama-Guard-3-8B, the paper's "
        "judge) that "
        "labels each answer safe/unsafe: the harmful-content rate beside the keyword refusal rate",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="folder for harmful.jsonl, benign.jsonl, "
        "look_risky.jsonl, "
        "task.jsonl, summary.json (every rate with its 95%% Wilson interval, ci95)",
    )
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

    from .evaluate import (
        GuardJudge,
        KeywordJudge,
        check_task_rows,
        load_eval_model,
        refusal_rate,
        safety_token_drift,
        task_accuracy,
    )

    if a.look_risky == "":
        from pact_cache.replay import look_risky_path

        a.look_risky = str(look_risky_path())
    if not (a.harmful or a.benign or a.look_risky or a.task or a.drift_cache):
        raise PactError("nothing to evaluate: give --harmful, --benign, --look-risky, --task and/or --drift-cache")
    if a.judge and not (a.harmful or a.benign or a.look_risky):
        raise PactError("--judge labels the answers to --harmful (and --benign) prompts; give --harmful")
    out = Path(a.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PactError(f"-o {out}: exists and is not an empty folder; choose another -o (nothing is overwritten)")
    from pact_cache.data import prompts_from

    sets = {
        k: prompts_from(v, a.limit)
        for k, v in (("harmful", a.harmful), ("benign", a.benign), ("look_risky", a.look_risky), ("task", a.task))
        if v
    }
    for name, rows in sets.items():
        if not rows:
            raise PactError(
                f"{getattr(a, name)}: holds no prompts, so no {name} rate can be computed; give a file "
                f"with at least one row"
            )
    if "task" in sets:
        check_task_rows(sets["task"], a.task)
    cache = (
        open_cache(a.drift_cache, cache_id=a.cache_id, storage_options=parse_storage_options(a.storage_option))
        if a.drift_cache
        else None
    )
    if cache is not None and cache.num_rows == 0:
        raise PactError(f"{a.drift_cache}: the cache holds no rows, so no drift can be computed")
    model, tok, device = load_eval_model(a.model, a.adapter, a.device, a.device_map)
    gen = dict(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, device=device, progress=not a.no_progress)
    judge = KeywordJudge()
    guard = GuardJudge.load(a.judge, a.device, a.device_map, a.batch_size) if a.judge else None
    summary = {"model": a.model, "adapter": a.adapter}
    with staged_dir(out) as tmp:  # everything goes here first; OUT appears whole, or not at all
        for name in ("harmful", "benign", "look_risky"):
            if name in sets:
                summary[f"{name}_refusal"] = refusal_rate(
                    model, tok, sets[name], judge, tmp / f"{name}.jsonl", guard=guard, **gen
                )
        if "task" in sets:
            summary["task"] = task_accuracy(model, tok, sets["task"], tmp / "task.jsonl", **gen)
        if cache is not None:
            summary["drift"] = safety_token_drift(model, cache, device)
            if not math.isfinite(summary["drift"]["mean_kl"]):
                raise PactError(
                    f"{a.drift_cache}: the safety-token drift is {summary['drift']['mean_kl']} (not "
                    f"finite); "
                    "the model's logits overflow on these rows: check the model or adapter"
                )
        atomic_write_json(tmp / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0
