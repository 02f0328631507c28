"""merge, diff and filter (pact_cache/combine.py)."""

import json

import numpy as np
import pytest
from conftest import CHAT_ROWS, masses_cache, write_jsonl
from hostile import cli, one_line, program_lines, snapshot

from pact_cache.build import BuildConfig, build
from pact_cache.cli import main
from pact_cache.combine import filter_cache
from pact_cache.format import open_cache
from pact_cache.rows import step0_refusal_mass


@pytest.fixture(scope="module")
def parts(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    tokens = root / "tokens.json"
    tokens.write_text(
        json.dumps({"format": "pact-tokens/1", "ids": [3, 17, 42, 99], "weights": [1.0] * 4, "method": "test"})
    )
    a = write_jsonl(root / "ds" / "a.jsonl", CHAT_ROWS[:10])
    b = write_jsonl(root / "ds" / "b.jsonl", CHAT_ROWS[10:])

    def mk(data, name, **kw):
        return build(
            BuildConfig(
                str(data), tiny_model, str(root / name), tokens=str(tokens), rows_per_part=4, progress=False, **kw
            )
        ).out

    return {
        "root": root,
        "tokens": tokens,
        "A": mk(a, "A"),
        "B": mk(b, "B", batch_size=3),
        "AB_f32": mk(root / "ds", "AB_f32", encoding="f32"),
        "AB": mk(root / "ds", "AB"),
        "model": tiny_model,
    }


def test_merge_is_the_cache_of_the_concatenated_datasets(parts, tmp_path, capsys):
    out = tmp_path / "M"
    assert main(["merge", parts["A"], parts["B"], "-o", str(out), "--rows-per-part", "5", "--no-progress"]) == 0
    m = open_cache(out)
    assert (
        m.num_rows == len(CHAT_ROWS)
        and len(m.parts) == 5
        and m.manifest.build.reused == (open_cache(parts["A"]).cache_id, open_cache(parts["B"]).cache_id)
    )
    # the folder of both source files, read in order, is exactly this cache's dataset
    assert main(["verify", str(out), "--dataset", str(parts["root"] / "ds")]) == 0
    src = list(open_cache(parts["A"]).iter_rows()) + list(open_cache(parts["B"]).iter_rows())
    for g, s in zip(m.iter_rows(), src):
        assert g.input_ids.tolist() == s.input_ids.tolist()
        assert np.array_equal(g.ref["full"], s.ref["full"]) and np.array_equal(g.ref["target"], s.ref["target"])
    capsys.readouterr()
    assert main(["merge", parts["A"], parts["B"], "-o", str(out)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


def test_merge_refuses_caches_built_otherwise(parts, tmp_path, capsys):
    other = tmp_path / "t.json"
    other.write_text(json.dumps({"format": "pact-tokens/1", "ids": [3, 17], "weights": [1.0, 1.0], "method": "test"}))
    c = build(
        BuildConfig(
            str(write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS[:3])),
            parts["model"],
            str(tmp_path / "C"),
            tokens=str(other),
            progress=False,
        )
    ).out
    assert main(["merge", parts["A"], c, "-o", str(tmp_path / "M")]) == 1
    err = program_lines(capsys.readouterr().err, ("pact-cache",))
    assert len(err) == 1 and "only caches built alike can be merged" in err[0]
    assert not (tmp_path / "M").exists()


def test_diff(parts, capsys):
    assert main(["diff", parts["A"], parts["AB"], "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["rows"] == {"common": 10, "added": 13, "removed": 0, "changed": 0}
    assert "dataset" in d["identity_differs"] and d["max_abs_diff"]["full_logprobs"] == 0
    assert main(["diff", parts["AB"], parts["A"]]) == 0
    assert "10 in both, 0 added in B, 13 removed from A" in capsys.readouterr().out
    assert main(["diff", parts["AB_f32"], parts["AB"], "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["identity_differs"] == ["encoding"] and d["rows"]["common"] == len(CHAT_ROWS) and d["rows"]["changed"] > 0
    assert 0 < d["max_abs_diff"]["full_logprobs"] < 1.0  # q8's error
    assert main(["diff", parts["AB"], parts["AB"]]) == 0
    assert "the same cache" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["merge", "filter"])
def test_a_failed_merge_or_filter_leaves_nothing_and_the_retry_works(parts, tmp_path, capsys, command):
    """Midway through, a damaged input part (a flipped byte in the last part, met after earlier parts
    were published): one line, OUT left as it was (absent), and the same command works once the input
    is whole again."""
    import shutil

    damaged = tmp_path / "B"
    shutil.copytree(parts["B"], damaged)
    last = sorted(damaged.glob("part-*.parquet"))[-1]
    good = last.read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 0x01
    last.write_bytes(bytes(blob))
    out = tmp_path / "OUT"
    args = (
        ["merge", str(parts["A"]), str(damaged)] if command == "merge" else ["filter", str(damaged), "--above", "1.0"]
    ) + ["-o", str(out), "--no-progress", "--rows-per-part", "2"]
    assert main(args) == 1
    err = program_lines(capsys.readouterr().err, ("pact-cache",))
    assert len(err) == 1 and last.name in err[0] and "sha256" in err[0], err
    assert not out.exists()
    last.write_bytes(good)
    assert main(args) == 0
    assert main(["verify", str(out)]) == 0


def test_a_filter_or_merge_that_would_write_an_empty_cache_is_refused(tmp_path, capsys):
    """build refuses to write an empty cache; filter and merge do too: one line naming the threshold and the input's
    step-0 mass range, nothing written, and a retry with a threshold that keeps rows works."""
    from conftest import masses_cache
    from hostile import one_line

    src = masses_cache(tmp_path, [0.4, 0.95, 0.6])
    line = one_line(capsys, main, "filter", src, "--above", "0", "-o", tmp_path / "none", "--no-progress")
    assert "--above 0: keeps none of the 3 rows of" in line
    assert "whose step-0 refusal masses run from 0.4 to 0.95; nothing written: raise --above (to at least 0.4" in line
    assert not (tmp_path / "none").exists()
    assert main(["filter", str(src), "--above", "0.5", "-o", str(tmp_path / "none"), "--no-progress"]) == 0
    assert open_cache(tmp_path / "none").num_rows == 1
    assert "--above nan: must be a probability mass in [0, 1]" in one_line(
        capsys, main, "filter", src, "--above", "nan", "-o", tmp_path / "x"
    )


# ----------------------------------------------------------------------------- filter


def test_filter_keeps_the_rows_at_or_below_the_mass_with_a_new_id(tmp_path, capsys):
    step0 = [0.05, 0.92, 0.2, 0.9, 0.1, 0.3, 0.99]
    src = masses_cache(tmp_path, step0)
    keep = np.array([True, True, False])
    assert [round(step0_refusal_mass(r, keep), 6) for r in open_cache(src).iter_rows()] == [round(m, 6) for m in step0]
    m, dropped = filter_cache(src, tmp_path / "out", 0.9, progress=False)
    got = list(open_cache(tmp_path / "out").iter_rows())
    want = [r for r, m0 in zip(open_cache(src).iter_rows(), step0) if m0 <= 0.9]
    assert dropped == 2 and m.counts.rows == len(got) == 5
    assert [g.example_id.split("-", 1)[1] for g in got] == [w.example_id.split("-", 1)[1] for w in want]
    assert [g.example_id[:8] for g in got] == [f"{i:08d}" for i in range(5)]  # renumbered
    for g, w in zip(got, want):
        assert all(np.array_equal(g.ref[k], w.ref[k]) for k in w.ref)
    assert m.cache_id != open_cache(src).cache_id and m.build.reused == (open_cache(src).cache_id,)
    assert m.counts.skipped["step0_refusal_mass_above"] == 2
    # another threshold is another cache; the same threshold again is the same cache
    m2, _ = filter_cache(src, tmp_path / "out2", 0.5, progress=False)
    m3, _ = filter_cache(src, tmp_path / "out3", 0.9, progress=False)
    assert m2.cache_id != m.cache_id and m3.cache_id == m.cache_id and m2.counts.rows == 4


def test_filter_cli_and_its_refusals(tmp_path, capsys):
    src = masses_cache(tmp_path, [0.05, 0.95, 0.2])
    code, _ = cli(capsys, main, "filter", src, "--above", "0.9", "-o", tmp_path / "out", "--no-progress")
    assert code == 0 and open_cache(tmp_path / "out").num_rows == 2
    assert cli(capsys, main, "verify", tmp_path / "out")[0] == 0
    before = snapshot(tmp_path / "out")
    assert "exists and is not empty" in one_line(capsys, main, "filter", src, "--above", "0.5", "-o", tmp_path / "out")
    assert snapshot(tmp_path / "out") == before
    assert "--above 1.5: must be a probability mass in [0, 1]" in one_line(
        capsys, main, "filter", src, "--above", "1.5", "-o", tmp_path / "x"
    )
    assert not (tmp_path / "x").exists()
