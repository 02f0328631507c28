"""info and verify (pact_cache/report.py)."""

from __future__ import annotations

import json

import pytest
from conftest import CHAT_ROWS, tokens_file, write_jsonl
from hostile import cli, one_line, only_line, run_cli

from pact_cache.cli import main as cache_main


def test_info_and_verify(tiny_model, chat_dataset, tmp_path, capsys):
    tokens = tokens_file(tmp_path, [3, 4, 5])
    out = tmp_path / "cache"
    assert run_cli("build", chat_dataset, "--ref", tiny_model, "--tokens", tokens, "-o", out, "--no-progress") == 0
    capsys.readouterr()
    assert run_cli("info", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == len(CHAT_ROWS) and info["K"] == 3 and info["bytes_per_step"] > 0
    assert info["ratio_to_float16"] == pytest.approx(info["bytes_per_step"] / 14)
    assert run_cli("verify", out, "--dataset", chat_dataset, "--model", tiny_model) == 0
    assert "OK" in capsys.readouterr().out
    other = write_jsonl(tmp_path / "other.jsonl", CHAT_ROWS[:3])
    assert run_cli("verify", out, "--dataset", other) == 1
    assert "gives 3 (at --max-length 2048); it was not built from this dataset" in only_line(capsys)
    part = next(out.glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    assert run_cli("verify", out) == 1
    assert "sha256 differs" in only_line(capsys)


@pytest.mark.parametrize("which", ["q8", "f32"])
def test_recomputed_rows_of_an_honest_cache_agree(made, capsys, which):
    from pact_cache.report import verify_cache

    res = verify_cache(str(made[which]), model=made["model"], recompute=5)
    note = next(c for c in res["checked"] if "recomputed" in c)
    mean = float(note.split("mean |diff| ")[1].split(" ")[0])
    assert note.startswith("5 rows recomputed") and mean < (0.05 if which == "q8" else 1e-4)


def test_verify_dataset_rows_checks_every_row(made, tmp_path, capsys):
    # same rows, other bytes on disk: every row still matches, and verify says so
    reformatted = write_jsonl(tmp_path / "same.jsonl", [json.loads(json.dumps(r)) for r in CHAT_ROWS])
    reformatted.write_text(reformatted.read_text().replace(": ", ":"))
    code, _ = cli(capsys, cache_main, "verify", made["q8"], "--dataset", reformatted)
    assert code == 0
    # one row's answer changed: named by part and row
    rows = [dict(r) for r in CHAT_ROWS]
    rows[9] = {"messages": [rows[9]["messages"][0], {"role": "assistant", "content": "changed"}]}
    changed = write_jsonl(tmp_path / "changed.jsonl", rows)
    line = one_line(capsys, cache_main, "verify", made["q8"], "--dataset", changed)
    assert "part-00001.parquet row 1: example_id differs from" in line and "row 9" in line


def test_info_on_a_corrupt_part_is_one_line(copy, capsys):
    cache = copy()
    part = cache / "part-00000.parquet"
    part.write_bytes(b"\0" * part.stat().st_size)  # same size: info skips checksums but still reads the footer
    assert "part-00000.parquet: not a readable Parquet file" in one_line(capsys, cache_main, "info", cache)
    part.write_bytes(b"PAR1" * 10)
    assert "size is 40 bytes, manifest says" in one_line(capsys, cache_main, "info", cache)
