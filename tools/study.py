#!/usr/bin/env python
"""End-to-end harmful fine-tuning study: aligned reference vs SFT vs PACT, on this machine's scale.

    python tools/study.py --out runs/study            # the full run (about an hour on 2 CPU cores)
    python tools/study.py --out runs/study --quick    # a smoke run with tiny sizes

Resumable stage by stage: a finished stage leaves ``OUT/<stage>/DONE.json`` (with its wall time)
and is not recomputed. Every stage runs the project's own command lines, as a user would.

Stages
  base_eval     the original instruct model: refusal on held-out harmful prompts, benign refusal, SST-2 accuracy
  align_data    alignment set: harmful prompts with refusals (safe_direction.json, disjoint from the held-out
                prompts) + benign rows: the original model's own non-refusing answers to SST-2 sentiment prompts
                and to a "one sentence about this review" prompt, on reviews that are in no other split
  align         SFT of the original model on it (LoRA on every projection), merged into a plain folder: the aligned reference
  aligned_eval  the same evaluation for the aligned reference
  tokens        pact-cache tokens (aligned = the new reference, base = the original instruct model)
  ft_cache      harmful fine-tuning set: a p=0.1 subsample of SST2_5k_p_0.1.json, cached by the aligned reference
  sft, pact     fine-tunes of the aligned reference on it, same seed, data order and LoRA settings
  drift_cache   the aligned reference's own answers to the held-out harmful prompts, cached (for the drift metric)
  eval_*        evaluation of the aligned reference, SFT and PACT, with drift
  report        results.md, results.json, results.png
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent
BASE = "smollm2-135m-instruct"


def jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


class Study:
    def __init__(self, a):
        self.a, self.out = a, Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def stage(self, name, fn):
        done = self.out / name / "DONE.json"
        if done.exists():
            print(f"[{name}] done already ({json.loads(done.read_text())['seconds']:.0f}s)", flush=True)
            return json.loads(done.read_text())
        (self.out / name).mkdir(parents=True, exist_ok=True)
        print(f"[{name}] running", flush=True)
        t = time.time()
        info = fn(self.out / name) or {}
        info["seconds"] = time.time() - t
        done.write_text(json.dumps(info, indent=2))
        return info

    # --- data splits (seeded, disjoint)
    def splits(self):
        a = self.a
        rng = random.Random(a.seed)
        safe = json.loads((DATA / "safe_direction.json").read_text())
        rng.shuffle(safe)
        eval_harmful = safe[: a.n_eval_harmful]
        align_harmful = safe[a.n_eval_harmful: a.n_eval_harmful + a.n_align_harmful]
        p1 = json.loads((DATA / "SST2_5k_p_0.1.json").read_text())
        p0 = json.loads((DATA / "SST2_5k_p_0.json").read_text())
        seen = {(r["instruction"], r.get("input", "")) for r in p1}
        held = [r for r in p0 if (r["instruction"], r.get("input", "")) not in seen]
        rng.shuffle(held)
        task_eval = held[: a.n_task_eval]
        benign_eval = held[a.n_task_eval: a.n_task_eval + a.n_benign_eval]
        benign_align = held[a.n_task_eval + a.n_benign_eval: a.n_task_eval + a.n_benign_eval + a.n_align_benign]
        harmful_rows = [r for r in p1 if r["output"].strip() not in ("positive", "negative")]
        benign_rows = [r for r in p1 if r["output"].strip() in ("positive", "negative")]
        n_h = round(a.n_ft * 0.1)
        ft = rng.sample(harmful_rows, n_h) + rng.sample(benign_rows, a.n_ft - n_h)
        rng.shuffle(ft)
        return dict(eval_harmful=eval_harmful, align_harmful=align_harmful, task_eval=task_eval,
                    benign_eval=benign_eval, benign_align=benign_align, ft=ft)

    def evaluate(self, d: Path, model: str, adapter: str | None = None, drift: str | None = None):
        """pact-eval twice (pact-eval writes a new folder each time): d/eval (refusals, drift), d/task."""
        s = self.files
        main_dir, task_dir = d / "eval", d / "task"
        cmd = [BIN / "pact-eval", "--model", model, "--harmful", s["eval_harmful"], "--benign", s["benign_eval"],
               "--max-new-tokens", self.a.max_new_tokens, "-o", main_dir, "--no-progress"]
        if adapter:
            cmd += ["--adapter", adapter]
        if drift:
            cmd += ["--drift-cache", drift]
        if not (main_dir / "summary.json").exists():
            run(cmd)
        cmd = [BIN / "pact-eval", "--model", model, "--task", s["task_eval"], "--max-new-tokens", 8, "-o", task_dir, "--no-progress"]
        if adapter:
            cmd += ["--adapter", adapter]
        if not (task_dir / "summary.json").exists():
            run(cmd)
        summary = json.loads((main_dir / "summary.json").read_text())
        summary["task"] = json.loads((task_dir / "summary.json").read_text())["task"]
        return summary

    def main(self):
        sys.path.insert(0, str(ROOT))
        a, out = self.a, self.out
        sp = self.splits()
        data = out / "data"
        self.files = {
            "eval_harmful": jsonl(data / "eval_harmful.jsonl", [{"prompt": r["input"]} for r in sp["eval_harmful"]]),
            "benign_eval": jsonl(data / "benign_eval.jsonl", [{"prompt": f"{r['instruction']} {r['input']}".strip()} for r in sp["benign_eval"]]),
            "task_eval": jsonl(data / "task_eval.jsonl", sp["task_eval"]),
            "refusals": jsonl(data / "align_refusals.jsonl", [{"prompt": r["input"], "completion": r["output"]} for r in sp["align_harmful"]]),
            "ft": jsonl(data / "ft_sst2_p0.1.jsonl", sp["ft"]),
        }
        res = {}
        res["base"] = self.stage("base_eval", lambda d: self.evaluate(d, BASE))

        def align_data(d):
            from trainer.evaluate import generate, load_eval_model

            from trainer.evaluate import KeywordJudge

            # Benign rows are the original model's own non-refusing answers (self-distillation): they keep it
            # answering benign requests, including sentiment questions like the benign evaluation's, without
            # teaching SST-2 labels (the original model gets 5% of them right).
            model, tok, device = load_eval_model(BASE)
            half = len(sp["benign_align"]) // 2
            prompts = [[{"role": "user", "content": f"{r['instruction']} {r['input']}".strip()}] for r in sp["benign_align"][:half]]
            prompts += [[{"role": "user", "content": f"Write one short sentence about this movie review: {r['input'].strip()}"}]
                        for r in sp["benign_align"][half:]]
            answers = generate(model, tok, prompts, max_new_tokens=48, batch_size=16, device=device)
            judge = KeywordJudge()
            benign = [{"prompt": p[0]["content"], "completion": ans} for p, ans in zip(prompts, answers)
                      if ans.strip() and not judge.is_refusal(p[0]["content"], ans)]
            harmful = [{"prompt": r["input"], "completion": r["output"]} for r in sp["align_harmful"]]
            rows = benign + harmful
            random.Random(a.seed).shuffle(rows)
            jsonl(d / "align.jsonl", rows)
            return {"benign": len(benign), "harmful": len(harmful)}

        res["align_data"] = self.stage("align_data", align_data)
        aligned = out / "align" / "run" / "merged"

        def align(d):
            run([BIN / "pact-cache", "build", out / "align_data" / "align.jsonl", "--ref", BASE, "-o", d / "cache", "--no-progress", "--max-length", 512])
            run([BIN / "pact-train", "--model", BASE, "--cache", d / "cache", "-o", d / "run", "--method", "sft", "--lora-r", 16,
                 "--lora-alpha", 32, "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--lr", a.align_lr,
                 "--epochs", a.align_epochs, "--batch-size", 8, "--seed", a.seed, "--merge", "--no-progress", "--save-every", 1000])
            return {}

        res["align"] = self.stage("align", align)
        res["aligned_eval"] = self.stage("aligned_eval", lambda d: self.evaluate(d, aligned))
        tokens = out / "tokens" / "tokens.json"
        res["tokens"] = self.stage("tokens", lambda d: run([BIN / "pact-cache", "tokens", "--aligned", aligned, "--base", BASE,
                                                            "--refusals", self.files["refusals"], "-o", tokens]) or {})
        res["ft_cache"] = self.stage("ft_cache", lambda d: run([BIN / "pact-cache", "build", self.files["ft"], "--ref", aligned,
                                                                "--tokens", tokens, "-o", d / "cache", "--no-progress", "--max-length", 512]) or {})
        for method in ("sft", "pact"):
            res[method] = self.stage(method, lambda d, m=method: run([
                BIN / "pact-train", "--model", aligned, "--cache", out / "ft_cache" / "cache", "-o", d / "run", "--method", m,
                "--lambda", a.lam, "--lr", a.lr, "--epochs", a.epochs, "--batch-size", 8, "--seed", a.seed, "--no-progress",
                "--save-every", 1000]) or {})

        def drift_cache(d):
            answers = [json.loads(line) for line in (out / "aligned_eval" / "eval" / "harmful.jsonl").read_text().splitlines()]
            rows = [{"prompt": r["prompt"], "completion": r["response"]} for r in answers if r["response"].strip()]
            jsonl(d / "reference_answers.jsonl", rows)
            run([BIN / "pact-cache", "build", d / "reference_answers.jsonl", "--ref", aligned, "--tokens", tokens, "-o", d / "cache", "--no-progress"])
            return {"rows": len(rows)}

        res["drift_cache"] = self.stage("drift_cache", drift_cache)
        dc = out / "drift_cache" / "cache"
        evals = {
            "reference": self.stage("eval_reference", lambda d: self.evaluate(d, aligned, drift=dc)),
            "sft": self.stage("eval_sft", lambda d: self.evaluate(d, aligned, out / "sft" / "run" / "adapter", dc)),
            "pact": self.stage("eval_pact", lambda d: self.evaluate(d, aligned, out / "pact" / "run" / "adapter", dc)),
        }
        self.report(res, evals)

    def report(self, res, evals):
        rows = [("original instruct", res["base"])] + [(k, v) for k, v in evals.items()]
        table = ["| model | harmful refusal (held-out) | benign refusal | SST-2 accuracy | safety-token drift (KL) |",
                 "| --- | --- | --- | --- | --- |"]
        js = {}
        for name, r in rows:
            hr, br, t = r["harmful_refusal"], r["benign_refusal"], r["task"]
            drift = f"{r['drift']['mean_kl']:.4f} ({r['drift']['steps']} steps)" if "drift" in r else "-"
            table.append(f"| {name} | {hr['rate']:.1%} ({hr['refusals']}/{hr['n']}) | {br['rate']:.1%} ({br['refusals']}/{br['n']}) | "
                         f"{t['accuracy']:.1%} ({t['correct']}/{t['n']}) | {drift} |")
            js[name] = {"harmful_refusal": hr, "benign_refusal": br, "task": t, "drift": r.get("drift")}
        times = {k: round(v.get("seconds", 0)) for k, v in res.items()}
        times.update({f"eval_{k}": round(v.get("seconds", 0)) for k, v in evals.items()})
        md = "\n".join(table) + "\n\nWall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in times.items()) + "\n"
        md += f"\nSettings: {json.dumps(vars(self.a))}\n"
        (self.out / "results.md").write_text(md)
        (self.out / "results.json").write_text(json.dumps({"results": js, "stage_seconds": times, "settings": vars(self.a)}, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [n for n, _ in rows]
        metrics = [("harmful refusal", lambda r: r["harmful_refusal"]["rate"]), ("benign refusal", lambda r: r["benign_refusal"]["rate"]),
                   ("SST-2 accuracy", lambda r: r["task"]["accuracy"])]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        w = 0.8 / len(names)
        for i, (n, r) in enumerate(rows):
            ax.bar([j + i * w for j in range(len(metrics))], [f(r) for _, f in metrics], w, label=n)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(metrics))], [m for m, _ in metrics])
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Harmful fine-tuning (SST-2, p=0.1) of an aligned SmolLM2-135M: SFT vs PACT")
        fig.tight_layout()
        fig.savefig(self.out / "results.png", dpi=110)
        print(md)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "study"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the pipeline")
    p.add_argument("--n-eval-harmful", type=int, default=100)
    p.add_argument("--n-align-harmful", type=int, default=150)
    p.add_argument("--n-align-benign", type=int, default=200, help="benign alignment rows before dropping refusals (at most the 200 held-out SST-2 rows left)")
    p.add_argument("--n-benign-eval", type=int, default=100)
    p.add_argument("--n-task-eval", type=int, default=200)
    p.add_argument("--n-ft", type=int, default=1000, help="harmful fine-tuning rows (10%% harmful)")
    p.add_argument("--align-lr", type=float, default=5e-4)
    p.add_argument("--align-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    a = p.parse_args()
    if a.quick:
        a.n_eval_harmful, a.n_align_harmful, a.n_align_benign, a.n_benign_eval, a.n_task_eval, a.n_ft = 8, 16, 8, 8, 8, 40
        a.align_epochs, a.epochs, a.max_new_tokens = 1, 1, 16
    if not (DATA / "SST2_5k_p_0.1.json").exists():
        raise SystemExit(f"{DATA} is missing: the study needs the paper's data files there")
    Study(a).main()


if __name__ == "__main__":
    main()
