#!/usr/bin/env bash
# One command from a clean clone: set up .venv with the test extra and run the test suite.
EXTRAS="[test]" source "$(dirname "$0")/_env.sh"
# the formatter and linter first (pyproject.toml's [tool.ruff]): a change that is not formatted fails here, in seconds
"$VPY" -m ruff format --check --quiet . || { echo "[test] not formatted: run .venv/bin/ruff format ." >&2; exit 1; }
"$VPY" -m ruff check --quiet . || { echo "[test] lint errors above: fix them (.venv/bin/ruff check --fix . for imports)" >&2; exit 1; }
# one worker per core (pytest-xdist; each worker's torch on one thread: tests/conftest.py), a test file's tests in one
# worker so its module fixtures are made once; PACT_TEST_WORKERS=0 runs everything in this process (-n given wins)
"$VPY" -m pytest -q -ra -n "${PACT_TEST_WORKERS:-auto}" --dist loadfile "$@"
