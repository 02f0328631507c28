"""pact-cache upgrade (pact_cache/upgrade.py): a pact-cache/1 cache becomes an equal pact-cache/2 one."""

from __future__ import annotations

import json
import shutil

from hostile import cli, one_line
from pact_train.cli import main as train_main

from pact_cache.cli import main as cache_main
from pact_cache.format import MANIFEST


def test_a_version_1_cache_is_refused_and_upgrade_writes_an_equal_version_2(made, tmp_path, capsys):
    old = tmp_path / "v1"
    shutil.copytree(made["q8"], old)
    m = json.loads((old / MANIFEST).read_text())
    m["format"] = "pact-cache/1"
    m["cache_id"] = "1" * 64
    for e in m["parts"]:
        e.pop("rows_sha256")
    m["build"].pop("algorithm")
    (old / MANIFEST).write_text(json.dumps(m))
    line = one_line(
        capsys, train_main, "--method", "pact", "--model", made["model"], "--cache", old, "-o", tmp_path / "run"
    )
    assert "format pact-cache/1 has no content-checked id or row digests" in line and "pact-cache upgrade" in line
    assert cli(capsys, cache_main, "upgrade", old, "-o", tmp_path / "v2")[0] == 0
    assert (tmp_path / "v2" / "README.md").read_text().startswith("---\n")  # its card
    assert (
        json.loads((tmp_path / "v2" / MANIFEST).read_text())["cache_id"]
        == json.loads((made["q8"] / MANIFEST).read_text())["cache_id"]
    )
    assert "exists" in one_line(capsys, cache_main, "upgrade", old, "-o", tmp_path / "v2")
    # a damaged version-1 part is not carried over
    part = sorted(old.glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:-4] + b"abcd")
    assert "sha256 differs" in one_line(capsys, cache_main, "upgrade", old, "-o", tmp_path / "v2b")
    assert not (tmp_path / "v2b").exists() and not list(tmp_path.glob(".v2b*"))
