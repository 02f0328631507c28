"""The storage layer (pact_cache/storage.py): the same checks through any fsspec filesystem."""

from __future__ import annotations

import json

import pytest
from conftest import CHAT_ROWS
from hostile import cli, one_line

from pact_cache.cli import main as cache_main
from pact_cache.errors import OutputExistsError
from pact_cache.format import MANIFEST, open_cache


def test_the_same_checks_through_fsspec_on_an_in_memory_store(made, capsys):
    """memory:// stands in for an object store: plain objects are read, a pseudo-folder where a
    part should be is refused, and an edited manifest fails its id the same way."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "/trust-mem/cache"
    for p in made["q8"].iterdir():
        fs.pipe(f"{root}/{p.name}", p.read_bytes())
    url = f"memory://{root}"
    assert cli(capsys, cache_main, "verify", url, "--dataset", made["data"])[0] == 0
    cache = open_cache(url)
    assert sum(1 for _ in cache.iter_rows()) == len(CHAT_ROWS)
    fs.rm(f"{root}/part-00001.parquet")
    fs.pipe(f"{root}/part-00001.parquet/inner", b"x")  # now a "folder" of the store
    assert "part-00001.parquet: is a directory, not a plain object" in one_line(capsys, cache_main, "verify", url)
    m = json.loads(fs.cat(f"{root}/{MANIFEST}"))
    m["counts"]["input_tokens"] += 1
    fs.pipe(f"{root}/{MANIFEST}", json.dumps(m).encode())
    assert "does not match the manifest's content" in one_line(capsys, cache_main, "info", url)
    fs.rm(root, recursive=True)


def test_staged_dir_publishes_whole_or_leaves_nothing(tmp_path):
    from pact_cache.storage import staged_dir

    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "a.json").write_text("{}")
            raise RuntimeError("killed halfway")
    assert not final.exists() and list(tmp_path.iterdir()) == []  # nothing of its own is left
    with staged_dir(final) as tmp:
        (tmp / "a.json").write_text("{}")
        assert not final.exists()  # not visible until complete
    assert (final / "a.json").read_text() == "{}"
    with pytest.raises(OutputExistsError, match="exists and is not an empty folder"):
        with staged_dir(final) as tmp:
            (tmp / "b.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["a.json"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    final.joinpath("a.json").unlink()
    with staged_dir(final) as tmp:  # an empty folder may be filled (a user's mkdir)
        (tmp / "c.json").write_text("{}")
    assert [p.name for p in final.iterdir()] == ["c.json"]


def test_staged_dir_with_replace_keeps_the_old_folder_until_the_new_one_is_whole(tmp_path):
    from pact_cache.storage import staged_dir

    final = tmp_path / "checkpoint"
    with staged_dir(final, replace=True) as tmp:
        (tmp / "step").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_dir(final, replace=True) as tmp:
            (tmp / "step").write_text("2")
            raise RuntimeError("killed halfway")
    assert (final / "step").read_text() == "1"
    with staged_dir(final, replace=True) as tmp:
        (tmp / "step").write_text("3")
    assert (final / "step").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_leftovers_of_a_dead_writer_are_told_from_a_live_ones(tmp_path):
    import os
    import subprocess
    import sys

    from pact_cache.storage import is_tmp_name, stale_tmp, tmp_name

    mine = tmp_name(tmp_path / "part.parquet")
    assert is_tmp_name(mine.name) and not stale_tmp(mine)  # this process is alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ghost = mine.with_name(mine.name.replace(f"-{os.getpid()}", f"-{int(dead.stdout)}"))
    assert stale_tmp(ghost) and not stale_tmp(tmp_path / "part.parquet")


def test_atomic_writes_never_show_half_a_file(tmp_path):
    from pact_cache.storage import atomic_write_json, json_bytes

    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1.5]})
    assert (tmp_path / "m.json").read_bytes() == json_bytes({"a": [1.5], "b": 1})
    with pytest.raises(ValueError):  # strict JSON: a NaN is refused before anything is written
        atomic_write_json(tmp_path / "n.json", {"x": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
