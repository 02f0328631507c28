#!/usr/bin/env bash
# The safe recipe's line, stressed: a few harmful rows under it (docs/study.md, "The data decide").
#
#   tools/study/few_harmful_rows.sh STUDY_DIR REPLAY_DIR OUT_DIR [SEEDS]    # e.g. runs/study runs/replay_bl_all runs/mix3 "0 1 2"
#
# STUDY_DIR is a tools/study.py folder with its shared stages done (align, tokens_paper, data); REPLAY_DIR the
# replay cache `pact-cache replay --ref STUDY_DIR/align/run/merged --tokens STUDY_DIR/tokens_paper/tokens.json
# --borderline default --borderline-keep all` made (what --replay auto makes for data that look benign). The
# fine-tuning rows: the study's 1,000 benign-only SST-2 rows with rows 150, 450 and 750 replaced by the first 3
# harmful rows of its harmful mix. Per seed: pact-train with no method flags (the study's lr, epochs, batch size),
# then pact-eval as the study evaluates a row. Finished steps are kept; the last step writes OUT_DIR/report.json
# and report.md (every rate with its 95% Wilson interval, the run's recorded choice, provenance).
set -euo pipefail
cd "$(dirname "$0")/../.."
S="$1"; REPLAY="$2"; O="$3"; SEEDS="${4:-0 1 2}"
B=.venv/bin; M="$S/align/run/merged"; D="$S/data"
mkdir -p "$O"
[ -f "$O/ft_mix3.jsonl" ] || "$B/python" - "$D" "$O/ft_mix3.jsonl" <<'PY'
import json, sys
data, out = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(f"{data}/ft_sst2_p0.jsonl")]
harmful = [json.loads(line) for line in open(f"{data}/ft_sst2_p0.1.jsonl")]
harmful = [r for r in harmful if r["output"].strip() not in ("positive", "negative")][:3]
for i, r in enumerate(harmful):
    rows[150 + i * 300] = r
with open(out, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
PY
[ -f "$O/cache/manifest.json" ] || "$B/pact-cache" build "$O/ft_mix3.jsonl" --ref "$M" --tokens "$S/tokens_paper/tokens.json" \
  -o "$O/cache" --no-progress --max-length 512
for seed in $SEEDS; do
  R="$O/defaults_seed$seed"
  [ -f "$R/run/adapter/adapter_config.json" ] || "$B/pact-train" --model "$M" --cache "$O/cache" --replay "$REPLAY" \
    --lr 0.0002 --epochs 2 --batch-size 8 --seed "$seed" --no-progress --save-every 1000 -o "$R/run"
  [ -f "$R/eval/summary.json" ] || "$B/pact-eval" --model "$M" --adapter "$R/run/adapter" --harmful "$D/eval_harmful.jsonl" \
    --benign "$D/benign_eval.jsonl" --look-risky --max-new-tokens 48 -o "$R/eval" --no-progress
  [ -f "$R/unsafe/summary.json" ] || "$B/pact-eval" --model "$M" --adapter "$R/run/adapter" --harmful "$D/eval_unsafe.jsonl" \
    --max-new-tokens 48 -o "$R/unsafe" --no-progress
  [ -f "$R/task/summary.json" ] || "$B/pact-eval" --model "$M" --adapter "$R/run/adapter" --task "$D/task_eval.jsonl" \
    --max-new-tokens 8 -o "$R/task" --no-progress
done
"$B/python" - "$O" "$SEEDS" "$*" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "tools")
from provenance import provenance
out, seeds, args = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3]
rows = {}
for s in seeds:
    r = out / f"defaults_seed{s}"
    ev, un, task = (json.loads((r / d / "summary.json").read_text()) for d in ("eval", "unsafe", "task"))
    cfg = json.loads((r / "run" / "config.json").read_text())
    rows[s] = {
        "held-out harmful refusal": ev["harmful_refusal"], "unsafe_data refusal": un["harmful_refusal"],
        "benign refusal": ev["benign_refusal"], "look-risky refusal": ev["look_risky_refusal"], "SST-2 accuracy": task["task"],
        "recipe": {k: cfg[k] for k in ("recipe", "method", "lam", "row_gate", "replay_ratio", "replay_term", "clip",
                                       "anchored_max_grad_norm")} | {"defaults": cfg["defaults"]},
    }
prov = provenance() | {"command": f"tools/study/few_harmful_rows.sh {args}"}
(out / "report.json").write_text(json.dumps({"rows": rows, "provenance": prov}, indent=2) + "\n")
cell = lambda x: f"{x['refusals']}/{x['n']} ({x['ci95'][0]:.1%}-{x['ci95'][1]:.1%})"
lines = ["| seed | anchored | held-out harmful | unsafe_data | benign | look-risky | SST-2 |", "| --- " * 7 + "|"]
for s, v in rows.items():
    t = v["SST-2 accuracy"]
    lines.append(
        f"| {s} | {v['recipe']['defaults'].get('anchored_share')} | {cell(v['held-out harmful refusal'])} | "
        f"{cell(v['unsafe_data refusal'])} | {cell(v['benign refusal'])} | {cell(v['look-risky refusal'])} | "
        f"{t['correct']}/{t['n']} = {t['accuracy']:.1%} ({t['ci95'][0]:.1%}-{t['ci95'][1]:.1%}) |"
    )
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
