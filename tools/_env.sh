# Sourced by tools/demo.sh and tools/test.sh: create .venv and install the project into it.
# A machine that already has torch (for example a CUDA build) keeps it: the venv then sees the
# system site-packages and pip finds torch already satisfied.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] creating .venv (keeping this machine's torch $("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages .venv
  else
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
  fi
fi
VPY="$ROOT/.venv/bin/python"
# pip, minus one machine-specific warning line; pip's own exit status is kept
pipq() {
  local rc
  set +o pipefail
  "$VPY" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  rc=${PIPESTATUS[0]}
  set -o pipefail
  return "$rc"
}
pipq install --quiet --upgrade pip
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # A pinned CPU build by default; set TORCH_SPEC (e.g. "torch --index-url ...") for another one.
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  pipq install --quiet ${TORCH_SPEC:-torch==2.13.0}
fi
echo "[setup] installing pact-cache${EXTRAS:-}"
pipq install --quiet -e ".${EXTRAS:-}"
"$VPY" -c "import pact_cache, torch, transformers; print(f'[setup] pact-cache {pact_cache.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
