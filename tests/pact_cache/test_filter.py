"""pact-cache filter (pact_cache/combine.py): the rows at or below a step-0 refusal mass, as a new cache."""

import numpy as np
from conftest import masses_cache
from hostile import cli, one_line, snapshot

from pact_cache.cli import main as cache_main
from pact_cache.combine import filter_cache
from pact_cache.format import open_cache
from pact_cache.rows import step0_refusal_mass


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
    code, _ = cli(capsys, cache_main, "filter", src, "--above", "0.9", "-o", tmp_path / "out", "--no-progress")
    assert code == 0 and open_cache(tmp_path / "out").num_rows == 2
    assert cli(capsys, cache_main, "verify", tmp_path / "out")[0] == 0
    before = snapshot(tmp_path / "out")
    assert "exists and is not empty" in one_line(
        capsys, cache_main, "filter", src, "--above", "0.5", "-o", tmp_path / "out"
    )
    assert snapshot(tmp_path / "out") == before
    assert "--above 1.5: must be a probability mass in [0, 1]" in one_line(
        capsys, cache_main, "filter", src, "--above", "1.5", "-o", tmp_path / "x"
    )
    assert not (tmp_path / "x").exists()
