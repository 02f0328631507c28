"""pact-cache cp (pact_cache/copy.py) between folders: checked, resumable, never over another cache.
(The same over a real S3 server: tests/e2e/test_remote.py.)"""

import json
import shutil

from hostile import cli, one_line, snapshot

from pact_cache.cli import main as cache_main
from pact_cache.format import MANIFEST, open_cache


def test_a_copy_is_the_same_cache_and_a_second_copy_does_nothing(made, tmp_path, capsys):
    dst = tmp_path / "dst"
    code, lines = cli(capsys, cache_main, "cp", made["q8"], dst, "--no-progress")
    assert code == 0 and lines == []
    assert open_cache(dst).cache_id == open_cache(made["q8"]).cache_id
    assert snapshot(dst) == snapshot(made["q8"])
    assert cli(capsys, cache_main, "verify", dst, "--dataset", made["data"])[0] == 0
    assert cli(capsys, cache_main, "cp", made["q8"], dst, "--no-progress")[0] == 0
    assert snapshot(dst) == snapshot(made["q8"])


def test_a_damaged_destination_of_the_same_cache_is_checked_and_repaired(made, tmp_path, capsys):
    """The destination already holds this cache's manifest, but one part has a flipped byte and
    another is gone: cp hashes every part anyway, copies those two again and says so; verify passes."""
    src, dst = made["q8"], tmp_path / "dst"
    assert cli(capsys, cache_main, "cp", src, dst, "--no-progress")[0] == 0
    parts = sorted(p.name for p in dst.glob("part-*.parquet"))
    blob = bytearray((dst / parts[0]).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (dst / parts[0]).write_bytes(bytes(blob))
    (dst / parts[1]).unlink()
    assert cli(capsys, cache_main, "verify", dst)[0] == 1
    assert cache_main(["cp", str(src), str(dst), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (
        "2 part(s) copied" in out and "2 of the copied were damaged or missing at the destination and replaced" in out
    )
    assert snapshot(dst) == snapshot(src)
    assert cli(capsys, cache_main, "verify", dst)[0] == 0


def test_a_stopped_copy_resumes_and_replaces_what_it_cannot_prove(made, tmp_path, capsys):
    """A copy stopped after its first part (state file, one good part, one truncated part, no
    manifest) finishes on the next run: the good part is kept, the truncated one copied again."""
    src, dst = made["q8"], tmp_path / "dst"
    m = json.loads((src / MANIFEST).read_text())
    dst.mkdir()
    (dst / ".pact-copy.json").write_text(json.dumps({"cache_id": m["cache_id"]}))
    first, second = m["parts"][0]["name"], m["parts"][1]["name"]
    shutil.copy(src / first, dst / first)
    (dst / second).write_bytes((src / second).read_bytes()[:100])
    assert cli(capsys, cache_main, "cp", src, dst, "--no-progress")[0] == 0
    assert snapshot(dst) == snapshot(src)


def test_a_destination_with_something_else_is_refused_and_left_alone(made, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(made["theirs"], other)
    before = snapshot(other)
    assert "holds a different cache" in one_line(capsys, cache_main, "cp", made["q8"], other, "--no-progress")
    assert snapshot(other) == before
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    assert "is not empty and is not a copy of this cache under way" in one_line(
        capsys, cache_main, "cp", made["q8"], junk, "--no-progress"
    )
    assert [p.name for p in junk.iterdir()] == ["notes.txt"]


def test_a_damaged_source_publishes_nothing(copy, tmp_path, capsys):
    src = copy("q8")
    part = sorted(src.glob("part-*.parquet"))[1]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    dst = tmp_path / "dst"
    assert "sha256 differs from the manifest" in one_line(capsys, cache_main, "cp", src, dst, "--no-progress")
    assert not (dst / MANIFEST).exists() and not (dst / part.name).exists()
