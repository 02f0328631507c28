#!/usr/bin/env bash
# One command from a clean clone: set up .venv with the test extra and run the test suite.
EXTRAS="[test]" source "$(dirname "$0")/_env.sh"
"$VPY" -m pytest -q -ra "$@"
