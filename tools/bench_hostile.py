#!/usr/bin/env python
"""Peak memory of pact-cache on hostile inputs, against a normal run on the same cache.

    python tools/bench_hostile.py --cache SCORED_CACHE --model MODEL [--inflate-mib 400] [--json FILE]

Decompression bombs (below), then pact-train's hostile options: a YAML alias bomb under ``lr:``, a
config of 1.1 MB, ``--config /dev/zero``, a 540 MB file that is not text as ``--config`` (sparse:
nothing is read unless the reader reads it), ``--replay-ratio 0.999`` at ``--batch-size 2`` (refused
above 0.5) and the largest ratio allowed, 0.5, with a replay cache made by ``filter --above 1`` of
the same cache (its rows under another id); each in a fresh process beside one normal step.

From a cache that carries TOSS scores (``pact-cache score``; without scores the sidecar bomb is left
out), three copies are made: the cache itself; a *part bomb*, whose first row's ``full_q`` (q8) or
``full_f32`` blob is replaced by ``--inflate-mib`` MiB of zeros (zstd turns it into a few KB); a
*score bomb*, whose first score-sidecar row is the same. Both are resealed: sizes, sha256 and the
cache id agree, as a hostile sender would make them. Then ``pact-cache verify`` and one step of
``pact-train`` (with ``--token-mask 0.2`` on the scored copies) run on each in a fresh process,
and the peak RSS of each (``ru_maxrss`` of that process alone) is printed with its exit status and
first error line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRAP = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
    "repr((r.stderr.strip().splitlines() or [''])[-1]))"
)


def peak(cmd: list[str]) -> tuple[int, float, str]:
    """(exit status, peak RSS in MiB, last stderr line) of one command in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-c", WRAP, *map(str, cmd)], capture_output=True, text=True, check=True
    ).stdout.split(" ", 2)
    return int(out[0]), int(out[1]) / 1024, eval(out[2])


def reseal(cache: Path, fn_name: str, table_fn) -> None:
    """Rewrite one Parquet file of ``cache`` with ``table_fn`` and make the manifest agree (bytes,
    sha256, cache id)."""
    import pyarrow.parquet as pq

    from pact_cache.format import MANIFEST
    from pact_cache.manifest import Manifest
    from pact_cache.storage import sha256_path

    path = cache / fn_name
    pq.write_table(table_fn(pq.read_table(path)), path, compression="zstd")
    m = json.loads((cache / MANIFEST).read_text())
    for entry in m["parts"] + (m.get("scores") or {}).get("files", []):
        if entry["name"] == fn_name:
            entry.update(bytes=path.stat().st_size, sha256=sha256_path(path))
    m["cache_id"] = Manifest.parse(m, "bomb", check_id=False).content_id()
    (cache / MANIFEST).write_text(json.dumps(m))


def inflate(table, column: str, mib: int):
    import pyarrow as pa

    values = table.column(column).to_pylist()
    values[0] = b"\0" * (mib << 20)
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.binary()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="a cache (with TOSS scores for the sidecar bomb)")
    p.add_argument("--model", required=True, help="the model the cache was built for (pact-train's --model)")
    p.add_argument("--inflate-mib", type=int, default=400)
    p.add_argument("--json", help="also write every figure, with the commit, date, machine, versions and command")
    a = p.parse_args()
    results = []
    from pact_cache.format import open_cache

    src = Path(a.cache)
    cache = open_cache(src)
    blob = "full_q" if cache.encoding.name == "q8" else "full_f32"
    scored = cache.manifest.scores is not None
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        copies = {"normal": Path(tmp) / "normal", "part bomb": Path(tmp) / "part_bomb"}
        for c in copies.values():
            shutil.copytree(src, c)
        reseal(copies["part bomb"], cache.parts[0].name, lambda t: inflate(t, blob, a.inflate_mib))
        if scored:
            copies["score bomb"] = Path(tmp) / "score_bomb"
            shutil.copytree(src, copies["score bomb"])
            reseal(
                copies["score bomb"], cache.manifest.scores.files[0].name, lambda t: inflate(t, "score", a.inflate_mib)
            )
        print(
            f"{cache.num_rows} rows; bombs inflate one value to {a.inflate_mib} MiB; files on disk: "
            + ", ".join(f"{k} {sum(f.stat().st_size for f in v.iterdir()) / 1024:.0f} KiB" for k, v in copies.items())
        )
        for name, c in copies.items():
            for what, cmd in (
                ("verify", [bin_dir / "pact-cache", "verify", c]),
                (
                    "pact-train 1 step",
                    [
                        bin_dir / "pact-train",
                        "--method",
                        "pact",
                        "--model",
                        a.model,
                        "--cache",
                        c,
                        "-o",
                        Path(tmp) / f"run-{c.name}",
                        "--max-steps",
                        1,
                        "--no-progress",
                        "--batch-size",
                        2,
                        *(["--token-mask", 0.2] if scored else []),
                    ],
                ),
            ):
                code, mib, last = peak(cmd)
                print(f"  {name:10s} {what:18s} exit {code}  peak RSS {mib:7.0f} MiB  {last[:160]}")
                results.append(
                    {"input": name, "command": what, "exit": code, "peak_rss_mib": round(mib), "last_line": last[:300]}
                )
        results += hostile_options(Path(tmp), src, a.model, bin_dir)
    if a.json:
        sys.path.insert(0, str(ROOT / "tools"))
        from study import provenance  # commit, date, machine, versions, command

        Path(a.json).write_text(json.dumps({"results": results, "provenance": provenance()}, indent=2) + "\n")


def hostile_options(tmp: Path, cache: Path, model: str, bin_dir: Path) -> list[dict]:
    """pact-train's config files and replay ratio, each against one normal step on the same cache."""
    bomb, prev = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n', "a"
    for name in "bcdefghi":
        bomb += f"{name}: &{name} [" + ", ".join(["*" + prev] * 9) + "]\n"
        prev = name
    (tmp / "bomb.yaml").write_text(bomb + "lr: *i\n")
    (tmp / "big.yaml").write_text("# padding\n" * 110_000 + "lr: 1.0e-3\n")
    with open(tmp / "weights.bin", "wb") as f:
        f.truncate(540_000_000)
    replay = tmp / "replay"
    subprocess.run([bin_dir / "pact-cache", "filter", cache, "--above", "1", "-o", replay, "--no-progress"], check=True)
    train = [
        bin_dir / "pact-train",
        "--method",
        "pact",
        "--model",
        model,
        "--cache",
        cache,
        "--max-steps",
        1,
        "--no-progress",
        "--batch-size",
        2,
    ]
    print("pact-train's options (one step at batch 2 where it runs):")
    results = []
    for i, (name, extra) in enumerate(
        (
            ("normal", []),
            ("alias bomb", ["--config", tmp / "bomb.yaml"]),
            ("1.1 MB config", ["--config", tmp / "big.yaml"]),
            ("/dev/zero", ["--config", "/dev/zero"]),
            ("540 MB binary", ["--config", tmp / "weights.bin"]),
            ("replay 0.999", ["--replay", replay, "--replay-ratio", 0.999]),
            ("replay 0.5", ["--replay", replay, "--replay-ratio", 0.5]),
        )
    ):
        code, mib, last = peak([*train, "-o", tmp / f"opt-{i}", *extra])
        print(f"  {name:14s} exit {code}  peak RSS {mib:7.0f} MiB  {last[:160]}")
        results.append(
            {
                "input": name,
                "command": "pact-train 1 step",
                "exit": code,
                "peak_rss_mib": round(mib),
                "last_line": last[:300],
            }
        )
    return results


if __name__ == "__main__":
    main()
