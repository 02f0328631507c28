"""Where a figure comes from: the commit, the date, the machine (and its GPU), the versions, the command.
Every JSON under tools/bench_results/ and tools/study/ carries this record (docs/benchmarks.md)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "pact-cache")


def provenance(note: str = "") -> dict:
    git = lambda *args: subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout  # noqa: E731
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    device = f"{platform.machine()} {os.cpu_count()} CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            device += ", " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    versions = {}
    for m in PACKAGES:
        try:
            versions[m] = version(m)
        except PackageNotFoundError:
            versions[m] = None
    return {
        "commit": git("rev-parse", "HEAD").strip() + ("+changes" if dirty else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device + (f", {note}" if note else ""),
        "versions": versions,
        "command": " ".join(["python", *sys.argv]),
    }
