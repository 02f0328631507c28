#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, measured in one call on a lent accelerator: at most 8 minutes on one
# H100 from a clean checkout with the GPU build of torch present (PYTHON, else .venv/bin/python, else python3), the
# project's dependencies and the embedded model's tokenizer (GPU_CHECK_TOKENIZER names another chat model folder).
#
#   tools/gpu_check.sh              # on the GPU: JSON files into tools/bench_results/gpu_*.json
#   tools/gpu_check.sh --dry-run    # the same steps on the CPU with the tiny preset and two steps each, into a
#                                   # temporary folder (or --out DIR): what the test suite runs, so it cannot rot
#
# Models: random bf16 weights with the shapes of Llama-3.2-1B and Llama-3.1-8B (tools/bench.py random-model) and
# one tokenizer, so the cache the first of them builds (the paper's SST-2 rows, or synthetic rows of their shape)
# fits both; memory and time need no trained weights. Each figure is one JSON with its provenance (commit, date, device, versions, command): the build's
# tokens/s and model FLOPs utilisation; sft / pact / live reference at batch 16 with and without gradient
# checkpointing; LoRA vs QLoRA vs QLoRA + paged 8-bit AdamW with the memory estimate beside each peak.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-}"
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python; } || PY=python3
# installed or not, found without importing them (an import of torch costs seconds)
"$PY" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('pact_cache', 'pact_train', 'bitsandbytes'))))" \
  2>/dev/null || "$PY" -m pip install -q -e ".[qlora]"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; PRESETS="tiny"; STEPS=2; WARMUP=1; BATCH=2; ROWS=16; LIMIT=300
  export PACT_BENCH_IN_PROCESS=1  # each bench's variants one after the other in its process: the steps, fast
  OUT="${OUT:-$WORK/results}"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA device visible; run with --dry-run on a CPU" >&2; exit 1; }
  DEVICE=cuda; PRESETS="llama-3.2-1b llama-3.1-8b"; STEPS=12; WARMUP=3; BATCH=16; ROWS=512; LIMIT=240
  OUT="${OUT:-tools/bench_results}"
fi
mkdir -p "$OUT"
BENCH=("$PY" tools/bench.py)
TOKENIZER="${GPU_CHECK_TOKENIZER:-smollm2-135m-instruct}"  # any chat tokenizer; the presets set the vocabulary size
failed=()
skipped=()
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-450}"  # seconds for all the steps (8 minutes less set-up); later steps are skipped
step() {  # step NAME TIMEOUT CMD...: one figure; a step that fails or runs out of time is named at the end
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then skipped+=("$name"); return 0; fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "[gpu_check] $name (at most ${limit}s)" >&2
  # SIGINT first: bench.py then stops the child process it is waiting for (subprocess.run kills it)
  if ! timeout -s INT -k 20 "$limit" "$@" >"$WORK/$name.log" 2>&1; then
    failed+=("$name"); tail -5 "$WORK/$name.log" >&2
  else
    tail -8 "$WORK/$name.log"
  fi
}

# the cache every run trains from, built by the first (smallest) random model: the paper's SST-2 rows when
# ../shared/data has them, else synthetic rows of the same shape (the figures depend on lengths, not on text)
DATA=../shared/data/SST2_5k_p_0.1.json
if [ "$DRY" = 1 ] || [ ! -f "$DATA" ]; then
  DATA="$WORK/rows.jsonl"
  "$PY" - "$DATA" "$([ "$DRY" = 1 ] && echo 40 || echo 1000)" <<'PYEOF'
import json, random, sys
rng = random.Random(0)
words = "the film a story plot actor funny dull bright slow scene ending music moving flat warm long".split()
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        review = " ".join(rng.choice(words) for _ in range(rng.randint(8, 60)))
        f.write(json.dumps({"prompt": f"Is this review positive or negative? {review}",
                            "completion": rng.choice(["positive", "negative"])}) + "\n")
PYEOF
fi
first="${PRESETS%% *}"
"${BENCH[@]}" random-model --preset "$first" -o "$WORK/$first" --device "$DEVICE" --tokenizer "$TOKENIZER" >&2
"$PY" -m pact_cache build "$DATA" --ref "$WORK/$first" -o "$WORK/cache" --device "$DEVICE" --no-progress \
  >"$WORK/cache.log" 2>&1 || { cat "$WORK/cache.log" >&2; exit 1; }

for preset in $PRESETS; do
  tag="$preset"; [ "$DRY" = 1 ] && tag="dry-$preset"
  if [ $((BUDGET - ($(date +%s) - START))) -lt 120 ]; then skipped+=("every $preset step"); continue; fi
  [ -d "$WORK/$preset" ] || "${BENCH[@]}" random-model --preset "$preset" -o "$WORK/$preset" --device "$DEVICE" \
    --tokenizer "$TOKENIZER" >&2
  common=(--model "$WORK/$preset" --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP")
  step "build_$tag" "$LIMIT" "${BENCH[@]}" build --model "$WORK/$preset" --device "$DEVICE" --rows "$ROWS" \
    --batch-size "$BATCH" --repeats 1 --json "$OUT/gpu_build_$tag.json"
  step "train_$tag" "$LIMIT" "${BENCH[@]}" train "${common[@]}" --cache "$WORK/cache" --batch-size "$BATCH" \
    --only none --json "$OUT/gpu_train_$tag.json"
  step "qlora_$tag" "$LIMIT" "${BENCH[@]}" qlora "${common[@]}" --cache "$WORK/cache" --batch-size "$BATCH" \
    --json "$OUT/gpu_qlora_$tag.json"
  if [ "$DRY" = 0 ]; then  # the dry run leaves out the checkpointed repeats: the same code, one flag
    step "train_ckpt_$tag" "$LIMIT" "${BENCH[@]}" train "${common[@]}" --cache "$WORK/cache" --batch-size "$BATCH" \
      --only none --grad-checkpointing --json "$OUT/gpu_train_ckpt_$tag.json"
    step "qlora_ckpt_$tag" "$LIMIT" "${BENCH[@]}" qlora "${common[@]}" --cache "$WORK/cache" --batch-size "$BATCH" \
      --grad-checkpointing --json "$OUT/gpu_qlora_ckpt_$tag.json"
  fi
  rm -rf "${WORK:?}/$preset"
done

echo "[gpu_check] JSON files in $OUT:" >&2
ls -1 "$OUT" >&2
if [ ${#skipped[@]} -gt 0 ]; then
  echo "[gpu_check] skipped, past the ${BUDGET}s budget: ${skipped[*]}" >&2
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "[gpu_check] failed or out of time: ${failed[*]} (their logs are above)" >&2
  exit 1
fi
