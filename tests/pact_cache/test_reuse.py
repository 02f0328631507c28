"""build --reuse (pact_cache/build.py): rows an older cache holds are copied, not computed."""

import json

import numpy as np
import pytest
from conftest import write_jsonl

from pact_cache.build import BuildConfig, build
from pact_cache.cli import main
from pact_cache.format import MANIFEST, open_cache


def chat(i, answer):
    return {
        "messages": [
            {"role": "user", "content": f"Review {i}: is it positive or negative?"},
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("incr")
    old_rows = [chat(i, ("positive" if i % 2 else "negative") + " indeed" * (i % 5)) for i in range(16)]
    new_rows = (
        [chat(100, "positive"), chat(101, "negative sure")]
        + old_rows[:7]
        + [chat(7, "changed answer")]
        + old_rows[8:]
        + [chat(200 + i, "negative" + " really" * i) for i in range(5)]
    )
    tokens = root / "tokens.json"
    tokens.write_text(
        json.dumps({"format": "pact-tokens/1", "ids": [3, 17, 42, 99, 150], "weights": [1.0] * 5, "method": "test"})
    )
    return {
        "old": write_jsonl(root / "old.jsonl", old_rows),
        "new": write_jsonl(root / "new.jsonl", new_rows),
        "tokens": tokens,
        "root": root,
        "reusable": 15,
    }  # 16 old rows, one of them changed


@pytest.mark.parametrize("enc", ["f32", "q8"])
def test_reuse_equals_a_full_rebuild_row_for_row(tiny_model, sets, tmp_path, enc):
    def cfg(data, out, **kw):
        kw = {"batch_size": 3, **kw}
        return BuildConfig(
            str(data),
            tiny_model,
            str(tmp_path / out),
            tokens=str(sets["tokens"]),
            encoding=enc,
            rows_per_part=5,
            progress=False,
            **kw,
        )

    old = build(cfg(sets["old"], "old", batch_size=4))  # another batch size: rows are still interchangeable
    incr = build(cfg(sets["new"], "incr", reuse=[old.out]))
    full = build(cfg(sets["new"], "full"))
    assert incr.rows_reused == sets["reusable"] and incr.rows_computed == 23 - sets["reusable"]
    assert incr.manifest.build.reused == (old.cache_id,)
    old_rows = {tuple(r.input_ids): r for r in open_cache(old.out).iter_rows()}
    got, want = list(open_cache(incr.out).iter_rows()), list(open_cache(full.out).iter_rows())
    assert [r.example_id for r in got] == [r.example_id for r in want]
    copied = 0
    for g, w in zip(got, want):
        assert g.input_ids.tolist() == w.input_ids.tolist() and g.response_start == w.response_start
        src = old_rows.get(tuple(g.input_ids))
        if src is not None:  # copied bit for bit from the old cache
            copied += 1
            for a, b in (
                (g.ref["full"], src.ref["full"]),
                (g.ref["post"], src.ref["post"]),
                (g.ref["target"], src.ref["target"]),
            ):
                assert np.array_equal(a, b)
        for a, b in (
            (g.ref["full"], w.ref["full"]),
            (g.ref["post"], w.ref["post"]),
            (g.ref["target"], w.ref["target"]),
        ):
            if enc == "f32":
                np.testing.assert_allclose(a, b, atol=1e-4)
            else:  # at most one code apart where batch noise crosses a rounding boundary
                assert np.abs(a - b).max() <= 0.05
    assert copied == sets["reusable"]


def test_reuse_of_a_cache_built_otherwise_is_refused(tiny_model, sets, tmp_path, capsys):
    old = build(
        BuildConfig(str(sets["old"]), tiny_model, str(tmp_path / "old"), tokens=str(sets["tokens"]), progress=False)
    )
    other = tmp_path / "tokens2.json"
    other.write_text(json.dumps({"format": "pact-tokens/1", "ids": [3, 17], "weights": [1.0, 1.0], "method": "test"}))
    code = main(
        [
            "build",
            str(sets["new"]),
            "--ref",
            tiny_model,
            "--tokens",
            str(other),
            "-o",
            str(tmp_path / "new"),
            "--reuse",
            str(old.out),
            "--no-progress",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pact-cache")]
    assert code == 1 and len(err) == 1 and "its rows are not this build's rows" in err[0]
    assert not (tmp_path / "new").exists()
    code = main(
        [
            "build",
            str(sets["new"]),
            "--ref",
            tiny_model,
            "--tokens",
            str(sets["tokens"]),
            "-o",
            str(tmp_path / "new"),
            "--reuse",
            str(tmp_path / "nope"),
            "--no-progress",
        ]
    )
    assert code == 1 and "no such cache folder" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # through the command line, with the counts said
    assert (
        main(
            [
                "build",
                str(sets["new"]),
                "--ref",
                tiny_model,
                "--tokens",
                str(sets["tokens"]),
                "-o",
                str(tmp_path / "new"),
                "--reuse",
                str(old.out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert f"{sets['reusable']} rows reused, {23 - sets['reusable']} computed" in capsys.readouterr().out
    assert json.loads((tmp_path / "new" / MANIFEST).read_text())["build"]["reused"] == [old.cache_id]
