#!/usr/bin/env bash
# One command from a clean clone: set up .venv, obtain the embedded model, and run the main job
# on the demo dataset shipped in the package: tokens -> build -> info -> verify -> replay -> pact-train.
source "$(dirname "$0")/_env.sh"
OUT="${1:-$ROOT/out/demo}"
MODEL="${MODEL:-smollm2-135m-instruct}"
DEMO="$("$VPY" -c 'from importlib import resources; print(resources.files("pact_cache") / "resources" / "demo.jsonl")')"
mkdir -p "$OUT"
rm -rf "$OUT/cache" "$OUT/tokens.json" "$OUT/replay" "$OUT/run"   # the demo always starts fresh
set -x
"$ROOT/.venv/bin/pact-cache" tokens --aligned "$MODEL" -o "$OUT/tokens.json"
"$ROOT/.venv/bin/pact-cache" build "$DEMO" --ref "$MODEL" --tokens "$OUT/tokens.json" -o "$OUT/cache"
"$ROOT/.venv/bin/pact-cache" info "$OUT/cache"
"$ROOT/.venv/bin/pact-cache" verify "$OUT/cache" --dataset "$DEMO" --model "$MODEL"
# the reference's own refusals to the package's harmful prompts, and its answers to benign prompts that only look
# risky (the first 50 of each set, for time; what --replay auto makes for data that look benign to the reference;
# the embedded model is a small instruct model that refuses few of them, so expect the warning that it does not
# look aligned)
"$ROOT/.venv/bin/pact-cache" replay --ref "$MODEL" --tokens "$OUT/tokens.json" -o "$OUT/replay" --limit 50 \
    --borderline default --borderline-keep all --no-progress
# 30 optimizer steps from the cache with pact-train's defaults (the study's recipe: STR on the rows the reference
# would refuse, plus its refusals replayed, the anchored rows' gradient clipped apart from the others'; the demo
# rows look benign to the reference, so the replay rows train on the anchor alone and the anchored rows' clip is
# half the task's, as its first line says): one model in memory, the reference never loaded
"$ROOT/.venv/bin/pact-train" --model "$MODEL" --cache "$OUT/cache" --replay "$OUT/replay" -o "$OUT/run" --epochs 6 --batch-size 4 \
    --lr 2e-4 --save-every 1000 --no-progress
set +x
echo
"$VPY" - "$OUT/run" <<'PY'
import json, sys
m = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
def epoch(e, key):  # token-weighted mean over one pass over every row
    r = [x for x in m if x["epoch"] == e]
    return sum(x[key] * x["tokens"] for x in r) / sum(x["tokens"] for x in r)
first, last = m[0]["epoch"], m[-1]["epoch"]
cfg = json.load(open(f"{sys.argv[1]}/config.json"))
from pact_train.losses import METHODS
term = METHODS[cfg["method"]].metric  # the method's value in metrics.jsonl
print(f"what changed: {len(m)} steps of --method {cfg['method']} --lambda {cfg['lam']:g} --row-gate {cfg['row_gate']} "
      f"--clip {cfg['clip']} with "
      f"{cfg['replay_ratio']:g} of the rows replayed refusals (the {cfg['recipe']} recipe filled {', '.join(cfg['defaults']['filled'])}); cross-entropy over "
      f"an epoch {epoch(first, 'ce'):.3f} -> {epoch(last, 'ce'):.3f}, {cfg['method']} term ({term}) "
      f"{epoch(first, term):.4f} -> {epoch(last, term):.4f}; adapter in {sys.argv[1]}/adapter")
PY
echo "demo cache: $OUT/cache (manifest.json + Parquet parts); read it with pact_cache.open_cache(\"$OUT/cache\")"
