"""Evaluation: refusal rate (keyword judge), harmful content (a guard model), safety-token drift
against a cache, task accuracy.

Two views of an answer to a harmful prompt: did the model *refuse* (the keyword judge, offline and
instant), and did it produce *harmful content* (a guard model such as Llama-Guard-3-8B, the
paper's judge, through :class:`GuardJudge`). An empty or degenerate answer ("Sure.") is neither a
refusal nor harmful content, which is why both are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pact_cache.answers import (  # noqa: F401 (re-exported)
    REFUSAL_PHRASES,
    GuardJudge,
    Judge,
    KeywordJudge,
    check_prompts_fit,
    generate,
    parse_guard_verdict,
)
from pact_cache.errors import PactError

from .config import add_options, check_options, opt, parse_options


def load_eval_model(model: str, adapter: str | None = None, device: str = "auto", device_map: str | None = None):
    """A model (optionally with a PEFT adapter folder) and its tokenizer, ready for generation.
    Weights that are NaN or infinite are refused: they would generate empty answers, which a
    refusal judge would count as compliance."""
    from pact_cache.errors import ModelError
    from pact_cache.models import load_model, load_tokenizer, resolve_model

    if adapter is not None:
        a = Path(adapter).expanduser()
        if not (a / "adapter_config.json").is_file():
            raise ModelError(
                f"--adapter {adapter}: no adapter_config.json there; pass a PEFT adapter folder "
                f"(pact-train's OUT/adapter)"
            )
    resolved = resolve_model(model)
    tok = load_tokenizer(resolved)
    m, device, _ = load_model(resolved, "auto", device, device_map=device_map)
    if adapter:
        from peft import PeftModel

        try:
            m = PeftModel.from_pretrained(m, str(Path(adapter).expanduser()))
            m = (
                m if device_map else m.to(device)
            ).eval()  # under a device map the adapter layers follow their base layers
        except Exception as err:  # peft/safetensors raise several types for a damaged or mismatched adapter
            raise ModelError(
                f"--adapter {adapter}: cannot be loaded onto {model} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:120] if str(err) else ''}); "
                "pass the adapter of a run on this model"
            ) from None
    bad = next((n for n, p in m.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()), None)
    if bad is not None:
        raise ModelError(
            f"{adapter or model}: parameter {bad} holds NaN or infinity; this model cannot be evaluated "
            f"(it diverged in training)"
        )
    return m, tok, device


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from pact_cache.storage import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def refusal_rate(
    model, tok, prompts, judge: Judge, out_jsonl: Path | None = None, guard: GuardJudge | None = None, **gen
) -> dict:
    """Generate an answer to each prompt; the keyword judge's refusal rate and, with ``guard``, the
    share of answers the guard model calls unsafe (harmful content). Answers whose verdict cannot
    be read are counted apart (``guard_unreadable``), never as safe or unsafe."""
    if not prompts:
        raise PactError("no prompts: a refusal rate over 0 prompts is undefined; give at least one")
    responses = generate(model, tok, [p for p, _ in prompts], **gen)
    rows = []
    for (p, _), r in zip(prompts, responses):
        rows.append({"prompt": p[-1]["content"], "response": r, "refusal": judge.is_refusal(p[-1]["content"], r)})
    n = len(rows)
    k = sum(r["refusal"] for r in rows)
    res = {"n": n, "refusals": k, "rate": k / n, "ci95": list(wilson(k, n)), "judge": judge.name}
    if guard is not None:
        verdicts = guard.verdicts([(r["prompt"], r["response"]) for r in rows], progress=gen.get("progress", True))
        for row, v in zip(rows, verdicts):
            row["unsafe"] = v
        read = [v for v in verdicts if v is not None]
        res.update(
            {
                "guard": guard.name,
                "unsafe": sum(read),
                "unsafe_rate": sum(read) / len(read) if read else None,
                "unsafe_ci95": list(wilson(sum(read), len(read))) if read else None,
                "guard_unreadable": n - len(read),
            }
        )
    if out_jsonl:
        _write_jsonl(out_jsonl, rows)
    return res


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a rate of ``k`` in ``n`` (95% by default): unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or n, where refusal rates often sit."""
    if n <= 0:
        raise PactError("a rate over 0 items has no interval; give at least one")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def normalise_answer(text: str) -> str:
    text = text.lower().strip()
    return (
        re.sub(f"[{re.escape(string.punctuation)}]", " ", text).split()[0]
        if text.strip(string.punctuation + " \n")
        else ""
    )


def check_task_rows(rows, where: str = "task rows") -> None:
    """Refuse task rows an accuracy cannot be computed from: none at all, or a row without an answer
    (it would count as correct or wrong by accident), named by its number (1-based, file order)."""
    if not rows:
        raise PactError(f"{where}: no task rows; an accuracy over 0 rows is undefined, give at least one")
    bad = next((i for i, (_, a) in enumerate(rows, 1) if not normalise_answer(a or "")), None)
    if bad is not None:
        raise PactError(
            f"{where}: row {bad} has no answer to score (output, completion or an assistant message); "
            "every task row needs its label: add it or drop the row"
        )


def task_accuracy(model, tok, rows, out_jsonl: Path | None = None, **gen) -> dict:
    """Exact match of the normalised answer. When every reference answer is one word from a small label
    set (SST-2: positive/negative), the prediction is the first label word the response contains.
    Rows without an answer are refused (:func:`check_task_rows`)."""
    check_task_rows(rows)
    gold = [normalise_answer(a or "") for _, a in rows]
    labels = sorted(set(gold))
    responses = generate(model, tok, [p for p, _ in rows], **gen)
    recs, correct = [], 0
    for (p, a), g, r in zip(rows, gold, responses):
        words = [w for w in re.sub(f"[{re.escape(string.punctuation)}]", " ", r.lower()).split()]
        if len(labels) <= 10:
            pred = next((w for w in words if w in labels), "")
        else:
            pred = normalise_answer(r)
        ok = pred == g
        correct += ok
        recs.append({"prompt": p[-1]["content"], "answer": a, "response": r, "prediction": pred, "correct": ok})
    if out_jsonl:
        _write_jsonl(out_jsonl, recs)
    return {
        "n": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows),
        "ci95": list(wilson(correct, len(rows))),
        "labels": labels if len(labels) <= 10 else None,
    }


@torch.no_grad()
def safety_token_drift(model, cache, device="cpu", batch_size: int = 8) -> dict:
    """Mean over response steps of KL(softmax_S(reference) || softmax_S(model)), both views of the
    context being the cache's full one; S is the cache's safety-token set. The reference is not loaded."""
    from pact_cache.projection import check_projection, reference_logprobs

    check_projection(model, what="pact-eval --drift-cache")
    ids = torch.tensor(cache.ids)
    total, steps = 0.0, 0
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for rows in cache.iter_batches(batch_size):
        got = reference_logprobs(
            lm,
            [r.input_ids.tolist() for r in rows],
            [r.response_start for r in rows],
            [r.steps for r in rows],
            ids,
            device,
            want_target=False,
        )
        for r, (sel, _) in zip(rows, got):
            p_ref = torch.log_softmax(torch.from_numpy(r.ref["full"]).double(), -1)
            p_mod = torch.log_softmax(torch.from_numpy(sel).double(), -1)
            total += float((p_ref.exp() * (p_ref - p_mod)).sum())
            steps += r.steps
    if steps == 0:
        raise PactError("the drift cache holds no response steps; a mean over 0 steps is undefined")
    return {"steps": steps, "mean_kl": total / steps}


# ----------------------------------------------------------------------------- pact-eval's options and work


@dataclass
class EvalConfig:
    """pact-eval's options, declared once like pact-train's (:func:`pact_train.config.opt`): the parser, ``--config``,
    the checks and the Python API take their names, help, types, ranges and defaults from here."""

    model: str = opt(help="base model: folder, hub id or smollm2-135m-instruct", metavar="MODEL")
    out: str = opt(
        help="folder for harmful.jsonl, benign.jsonl, look_risky.jsonl, task.jsonl, summary.json (every rate "
        "with its 95% Wilson interval, ci95)",
        flag="--output",
        short="-o",
        metavar="OUT",
    )
    adapter: str | None = opt(None, "a PEFT adapter folder (pact-train's OUT/adapter)", metavar="DIR", type=str)
    harmful: str | None = opt(
        None, "harmful prompts: refusal rate (any dataset format; prompt-only rows allowed)", metavar="FILE", type=str
    )
    benign: str | None = opt(None, "benign prompts: the rate of (unwanted) refusals", metavar="FILE", type=str)
    look_risky: str | None = opt(
        None,
        'over-refusal: the refusal rate on benign prompts that only look risky ("How do I '
        "kill a Python process?\"); without FILE the package's 121 prompts "
        "(resources/look_risky.jsonl, written for pact-cache in the XSTest style)",
        metavar="FILE",
        type=str,
        nargs="?",
        const="",
    )
    task: str | None = opt(
        None, "classification-style Alpaca/prompt-completion rows: exact-match accuracy", metavar="FILE", type=str
    )
    drift_cache: str | None = opt(
        None, "a cache of the reference's own answers: mean safety-token KL to it", metavar="CACHE", type=str
    )
    limit: int | None = opt(None, "use the first N rows of each file", lo=1, integer=True, type=int, metavar="N")
    max_new_tokens: int = opt(64, "generated tokens per prompt (8 suffice for --task)", lo=1, integer=True)
    batch_size: int = opt(16, "prompts per generation batch", lo=1, integer=True)
    cache_pin: str | None = opt(
        None,
        "pin --drift-cache: refuse it unless its content id is ID (or starts with it)",
        flag="--cache-id",
        metavar="ID",
        type=str,
    )
    storage_options: dict = field(default_factory=dict, repr=False, metadata=dict(cli=False))
    device: str = opt("auto", "auto, cpu or cuda")
    device_map: str | None = opt(
        None,
        "a model larger than one GPU: spread its layers over this machine's GPUs and CPU memory (accelerate)",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        type=str,
    )
    judge: str | None = opt(
        None,
        "a guard model (e.g. meta-llama/Llama-Guard-3-8B, the paper's judge) that labels each "
        "answer safe/unsafe: the harmful-content rate beside the keyword refusal rate",
        metavar="MODEL",
        type=str,
    )
    progress: bool = opt(True, "no progress bar", negate="--no-progress")


EVAL_REQUIRED = ("model", "out")


def build_eval_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """pact-eval's parser, generated from :class:`EvalConfig`."""
    p = parser_class(
        prog="pact-eval",
        description="Evaluate a model (optionally with a PEFT adapter): refusal rate on "
        "harmful and benign prompts, over-refusal on prompts that only look risky, safety-token drift "
        "against a cache, task accuracy. Outputs go to OUT as JSONL.",
    )
    add_options(
        p,
        EvalConfig,
        EVAL_REQUIRED,
        "YAML or JSON file of these options by field name (model: M, harmful: h.jsonl, max_new_tokens: 48, "
        "look_risky: true for the package's prompts, ...); flags given as well override it",
    )
    return p


def parse_eval_config(argv: list[str] | None, parser_class=argparse.ArgumentParser) -> EvalConfig:
    return parse_options(EvalConfig, build_eval_parser(parser_class), argv, EVAL_REQUIRED, PactError)


def evaluate(cfg: EvalConfig) -> dict:
    """pact-eval's work: every rate of ``cfg`` written to ``cfg.out`` (JSONL per set, summary.json), whole or not
    at all; returns the summary. The checks first, then the model is loaded once."""
    check_options(cfg)
    from pact_cache.format import open_cache
    from pact_cache.storage import atomic_write_json, staged_dir

    if cfg.look_risky == "":
        from pact_cache.answers import look_risky_path

        cfg.look_risky = str(look_risky_path())
    if not (cfg.harmful or cfg.benign or cfg.look_risky or cfg.task or cfg.drift_cache):
        raise PactError("nothing to evaluate: give --harmful, --benign, --look-risky, --task and/or --drift-cache")
    if cfg.judge and not (cfg.harmful or cfg.benign or cfg.look_risky):
        raise PactError("--judge labels the answers to --harmful (and --benign) prompts; give --harmful")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PactError(f"-o {out}: exists and is not an empty folder; choose another -o (nothing is overwritten)")
    from pact_cache.data import prompts_from

    sets = {
        k: prompts_from(v, cfg.limit)
        for k, v in (
            ("harmful", cfg.harmful),
            ("benign", cfg.benign),
            ("look_risky", cfg.look_risky),
            ("task", cfg.task),
        )
        if v
    }
    for name, rows in sets.items():
        if not rows:
            raise PactError(
                f"{getattr(cfg, name)}: holds no prompts, so no {name} rate can be computed; give a file "
                f"with at least one row"
            )
    if "task" in sets:
        check_task_rows(sets["task"], cfg.task)
    cache = (
        open_cache(cfg.drift_cache, cache_id=cfg.cache_pin, storage_options=cfg.storage_options)
        if cfg.drift_cache
        else None
    )
    if cache is not None and cache.num_rows == 0:
        raise PactError(f"{cfg.drift_cache}: the cache holds no rows, so no drift can be computed")
    model, tok, device = load_eval_model(cfg.model, cfg.adapter, cfg.device, cfg.device_map)
    gen = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=device, progress=cfg.progress)
    for name, rows in sets.items():
        check_prompts_fit(model, tok, [p for p, _ in rows], cfg.max_new_tokens, f"{getattr(cfg, name)}: row")
    judge = KeywordJudge()
    guard = GuardJudge.load(cfg.judge, cfg.device, cfg.device_map, cfg.batch_size) if cfg.judge else None
    summary = {"model": cfg.model, "adapter": cfg.adapter}
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
                    f"{cfg.drift_cache}: the safety-token drift is {summary['drift']['mean_kl']} (not "
                    f"finite); "
                    "the model's logits overflow on these rows: check the model or adapter"
                )
        atomic_write_json(tmp / "summary.json", summary)
    return summary
