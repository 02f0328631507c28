#!/usr/bin/env bash
# One command from a clean clone: set up .venv, obtain the embedded model, and run
# tokens -> build -> info -> verify on the demo dataset shipped in the package.
source "$(dirname "$0")/_env.sh"
OUT="${1:-$ROOT/out/demo}"
MODEL="${MODEL:-smollm2-135m-instruct}"
DEMO="$("$VPY" -c 'from importlib import resources; print(resources.files("pact_cache") / "resources" / "demo.jsonl")')"
mkdir -p "$OUT"
rm -rf "$OUT/cache" "$OUT/tokens.json"   # the demo always starts fresh
set -x
"$ROOT/.venv/bin/pact-cache" tokens --aligned "$MODEL" -o "$OUT/tokens.json"
"$ROOT/.venv/bin/pact-cache" build "$DEMO" --ref "$MODEL" --tokens "$OUT/tokens.json" -o "$OUT/cache"
"$ROOT/.venv/bin/pact-cache" info "$OUT/cache"
"$ROOT/.venv/bin/pact-cache" verify "$OUT/cache" --dataset "$DEMO" --model "$MODEL"
set +x
echo
echo "demo cache: $OUT/cache (manifest.json + Parquet parts); read it with pact_cache.open_cache(\"$OUT/cache\")"
