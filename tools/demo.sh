#!/usr/bin/env bash
# One command from a clean clone: set up .venv, obtain the embedded model, and run the main job
# on the demo dataset shipped in the package: tokens -> build -> info -> verify -> pact-train.
source "$(dirname "$0")/_env.sh"
OUT="${1:-$ROOT/out/demo}"
MODEL="${MODEL:-smollm2-135m-instruct}"
DEMO="$("$VPY" -c 'from importlib import resources; print(resources.files("pact_cache") / "resources" / "demo.jsonl")')"
mkdir -p "$OUT"
rm -rf "$OUT/cache" "$OUT/tokens.json" "$OUT/run"   # the demo always starts fresh
set -x
"$ROOT/.venv/bin/pact-cache" tokens --aligned "$MODEL" -o "$OUT/tokens.json"
"$ROOT/.venv/bin/pact-cache" build "$DEMO" --ref "$MODEL" --tokens "$OUT/tokens.json" -o "$OUT/cache"
"$ROOT/.venv/bin/pact-cache" info "$OUT/cache"
"$ROOT/.venv/bin/pact-cache" verify "$OUT/cache" --dataset "$DEMO" --model "$MODEL"
# 30 optimizer steps of PACT from the cache: one model in memory, the reference never loaded
"$ROOT/.venv/bin/pact-train" --model "$MODEL" --cache "$OUT/cache" -o "$OUT/run" --epochs 6 --batch-size 4 --lr 2e-4 \
    --save-every 1000 --no-progress
set +x
echo
"$VPY" - "$OUT/run" <<'PY'
import json, sys
m = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
def epoch(e, key):  # token-weighted mean over one pass over every row
    r = [x for x in m if x["epoch"] == e]
    return sum(x[key] * x["tokens"] for x in r) / sum(x["tokens"] for x in r)
first, last = m[0]["epoch"], m[-1]["epoch"]
print(f"what changed: {len(m)} PACT steps; cross-entropy over an epoch {epoch(first, 'ce'):.3f} -> {epoch(last, 'ce'):.3f}, "
      f"PACT term (KL to the reference's weighted safety-token target) {epoch(first, 'pact_kl'):.4f} -> {epoch(last, 'pact_kl'):.4f}; "
      f"adapter in {sys.argv[1]}/adapter")
PY
echo "demo cache: $OUT/cache (manifest.json + Parquet parts); read it with pact_cache.open_cache(\"$OUT/cache\")"
