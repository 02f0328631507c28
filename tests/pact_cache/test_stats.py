"""stats (pact_cache/stats.py): the audit against a naive computation."""

import json

import numpy as np
import pytest
from conftest import row_result, write_manifest

from pact_cache.cli import main
from pact_cache.format import ENCODINGS, open_cache, write_part
from pact_cache.stats import cache_stats


def view(masses, rng):
    """(n, 3) log-probs: tokens 0 and 1 share each step's mass m equally (a 60/40 split), token 2 gets 0.01."""
    out = np.empty((len(masses), 3))
    out[:, 0] = np.log(0.6 * np.asarray(masses))
    out[:, 1] = np.log(0.4 * np.asarray(masses))
    out[:, 2] = np.log(0.01)
    return out.astype(np.float32)


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    step0 = [0.05, 0.9, 0.2, 0.7, 0.1, 0.3, 0.95]  # rows 1, 3 and 6 look like refusal prompts
    rows = []
    for i, m0 in enumerate(step0):
        n = 2 + i % 3
        masses = [m0] + list(rng.uniform(0.01, 0.9, n - 1))
        rows.append(
            row_result(
                f"{i:08d}-x",
                list(range(3, 8 + n)),
                5,
                view(masses, rng),
                view(masses[::-1], rng),
                -rng.random(n).astype(np.float32),
            )
        )
    out = tmp_path / "c"
    out.mkdir()
    parts = [
        write_part(out / "part-00000.parquet", rows[:4], ENCODINGS["f32"]),
        write_part(out / "part-00001.parquet", rows[4:], ENCODINGS["f32"]),
    ]
    write_manifest(out, parts, ENCODINGS["f32"], 3, weights=[0.7, 0.2, -0.3])  # token 2 is not constrained: not counted
    return out, rows


def test_stats_equal_a_naive_computation(cache):
    out, rows = cache
    s = cache_stats(open_cache(out), top=3, flag_at=0.5)
    assert [r["example_id"] for r in s.top] == ["00000006-x", "00000001-x", "00000003-x"]
    assert s.top[0]["step0_mass"] == pytest.approx(0.95, rel=1e-5)
    assert s.step0["flagged"] == 3 and s.tokens == 2
    T = max(r.ref["full"].shape[0] for r in rows)
    for t in range(T):
        have = [r.ref["full"][t, :2].astype(np.float64) for r in rows if r.ref["full"].shape[0] > t]
        mass = [np.exp(v).sum() for v in have]
        ent = [-(np.exp(v) / np.exp(v).sum() * (v - np.log(np.exp(v).sum()))).sum() for v in have]
        assert s.position["rows"][t] == len(have)
        assert s.position["mass_mean"][t] == pytest.approx(np.mean(mass), rel=1e-5)
        assert s.position["entropy_mean"][t] == pytest.approx(np.mean(ent), rel=1e-5)
        assert s.position["entropy_mean"][t] == pytest.approx(-(0.6 * np.log(0.6) + 0.4 * np.log(0.4)), rel=1e-4)
        # quantiles come from 0.001-wide histograms (memory does not grow with the cache): within a bin of numpy's
        lower = np.quantile(mass, 0.5, method="inverted_cdf")
        assert abs(s.position["mass_median"][t] - lower) <= 1e-3


def test_stats_cli_json_and_plots(cache, tmp_path, capsys):
    out, _ = cache
    assert main(["stats", str(out), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["step0"]["flagged"] == 1 and js["flag_at"] == 0.9 and sum(js["step0"]["histogram"]["counts"]) == 7
    assert main(["stats", str(out), "--flag-at", "nan"]) == 1
    assert "--flag-at nan: must be a probability mass" in capsys.readouterr().err
    assert main(["stats", str(out), "--plot", str(tmp_path / "plots"), "--flag-at", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "3 row(s) above 0.5" in text and "00000006-x" in text
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["mass_by_position.png", "step0_mass.png"]
    before = (tmp_path / "plots" / "step0_mass.png").read_bytes()
    assert main(["stats", str(out), "--plot", str(tmp_path / "plots")]) == 1
    assert "exists; choose another --plot folder" in capsys.readouterr().err
    assert (tmp_path / "plots" / "step0_mass.png").read_bytes() == before
    for empty in ("", "  "):  # an empty folder name wrote no plot and said nothing
        assert main(["stats", str(out), "--plot", empty]) == 1
        assert "--plot '': give the folder the plots go into" in capsys.readouterr().err
