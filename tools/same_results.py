"""Check that a change keeps results: build caches and train short runs with two checkouts of this
repository, and compare the cache ids and every logged metric (step times aside).

    python tools/same_results.py OLD_CHECKOUT NEW_CHECKOUT [--embedded]

Each side runs in its own process with its own checkout first on sys.path: the tiny random Llama
of the tests (tests/conftest.py), CHAT_ROWS, q8 and f32 caches, 4 steps of pact, pact-rest, str and
constrained-sft on each; with --embedded also the embedded model's cache and 2 steps of pact.
Prints the ids and "same" or the first difference; exits 1 on a difference. (A git worktree of the
old commit is an OLD_CHECKOUT: `git worktree add /tmp/old HEAD~1`.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SIDE = r"""
import json, sys
from pathlib import Path
root, out, embedded = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
sys.path[:0] = [root, root + "/tests"]
import importlib.util
# pact_train is the checkout's trainer/ folder (installed under that name), not the installed project's
spec = importlib.util.spec_from_file_location("pact_train", root + "/trainer/__init__.py",
                                              submodule_search_locations=[root + "/trainer"])
sys.modules["pact_train"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["pact_train"])
from conftest import CHAT_ROWS, make_tiny_model, write_jsonl
import pact_cache, pact_train.loop
assert pact_cache.__file__.startswith(root), pact_cache.__file__
assert pact_train.loop.__file__.startswith(root), pact_train.loop.__file__
from pact_cache.build import BuildConfig, build
from pact_train.loop import TrainConfig, train
def metrics(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "step_time_s"} for line in lines]
model = str(make_tiny_model(out / "model"))
data = write_jsonl(out / "d.jsonl", CHAT_ROWS)
res = {}
for enc in ("q8", "f32"):
    c = build(BuildConfig(str(data), model, str(out / f"c-{enc}"), encoding=enc, rows_per_part=8, progress=False))
    res[f"cache_id {enc}"] = c.cache_id
    for method in ("pact", "pact-rest", "str", "constrained-sft"):
        run = out / f"run-{enc}-{method}"
        train(TrainConfig(model=model, cache=c.out, out=str(run), method=method, batch_size=4, max_steps=4,
                          progress=False, plot=False, lr=1e-3))
        res[f"metrics {enc} {method}"] = metrics(run)
if embedded:
    c = build(BuildConfig(str(data), "smollm2-135m-instruct", str(out / "c-emb"), progress=False))
    res["cache_id embedded"] = c.cache_id
    train(TrainConfig(model="smollm2-135m-instruct", cache=c.out, out=str(out / "run-emb"), method="pact", batch_size=4,
                      max_steps=2, progress=False, plot=False))
    res["metrics embedded pact"] = metrics(out / "run-emb")
print("RESULT " + json.dumps(res, sort_keys=True))
"""


def side(checkout: str, embedded: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-c", SIDE, str(Path(checkout).resolve()), tmp, "1" if embedded else "0"],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{checkout}: failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--embedded", action="store_true", help="also the embedded model (downloads it once)")
    a = p.parse_args()
    old, new = side(a.old, a.embedded), side(a.new, a.embedded)
    for k in sorted(old):
        if k.startswith("cache_id"):
            print(f"{k}: {old[k][:16]} -> {new.get(k, '?')[:16]}")
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        print(f"DIFFERENT: {diff[0]}\n  old: {old.get(diff[0])}\n  new: {new.get(diff[0])}")
        return 1
    print(f"same: {len(old)} results (cache ids and every metric of every step) are equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
