"""TOSS scores (pact_cache/score.py): the selection by hand, and the scored cache."""

import json

import numpy as np
import pytest
import torch

from pact_cache.cli import main as cache_main
from pact_cache.errors import CacheError, PactError
from pact_cache.format import MANIFEST, open_cache
from pact_cache.rows import token_mask


def test_global_selection_by_hand():
    """6 tokens, fraction 0.5: the three highest (0.9 of a, 0.9 of b, 0.5 of a) leave, across rows."""
    m = token_mask([("a", [0.1, 0.9, 0.5]), ("b", [0.9, 0.2]), ("c", [0.3])], 0.5)
    assert (m.total, m.dropped, m.threshold) == (6, 3, pytest.approx(0.5))
    assert m.keep("a", np.array([0.1, 0.9, 0.5], np.float32)).tolist() == [True, False, False]
    assert m.keep("b", np.array([0.9, 0.2], np.float32)).tolist() == [False, True]
    assert m.keep("c", np.array([0.3], np.float32)).tolist() == [True]


def test_ties_at_the_boundary_are_taken_in_cache_order():
    """Three tokens score 1.0 and two must go: the first two in cache order (both of a), not b's."""
    rows = [("a", [1.0, 1.0]), ("b", [1.0, 0.0])]
    m = token_mask(rows, 0.5)
    kept = [m.keep(e, np.array(s, np.float32)) for e, s in rows]
    assert [k.tolist() for k in kept] == [[False, False], [True, True]]
    assert token_mask(rows, 0.0).keep("a", np.array([5.0, 5.0], np.float32)).all()
    with pytest.raises(PactError, match=r"must be in \[0, 1\)"):
        token_mask(rows, 1.0)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.37])
def test_selection_drops_exactly_the_fraction_and_only_the_highest(fraction):
    g = np.random.default_rng(0)
    rows = [(f"r{i}", np.round(g.normal(size=g.integers(1, 30)), 1).astype(np.float32)) for i in range(40)]  # many ties
    m = token_mask(rows, fraction)
    keep = [m.keep(e, s) for e, s in rows]
    dropped = np.concatenate([s[~k] for (_, s), k in zip(rows, keep)])
    kept = np.concatenate([s[k] for (_, s), k in zip(rows, keep)])
    assert dropped.size == m.dropped == round(fraction * m.total) and dropped.min() >= kept.max()


def test_scores_are_the_two_models_log_prob_difference(tiny_model, tiny_base_model, scored):
    from transformers import AutoModelForCausalLM

    src, out = scored
    a, b = open_cache(src), open_cache(out)
    assert b.cache_id != a.cache_id and b.manifest.scores.algorithm == "toss/1"
    assert b.manifest.scores.degraded["weights_sha256"] and b.manifest.scores.utility["weights_sha256"]
    deg, util = (AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32) for m in (tiny_model, tiny_base_model))
    rows = list(b.iter_rows())
    assert len(rows) == a.num_rows and all(r.score is not None and len(r.score) == r.steps for r in rows)
    for r in rows[:5]:
        ids = torch.tensor(r.input_ids)[None]
        pos = torch.arange(r.response_start - 1, len(r.input_ids) - 1)
        tgt = ids[0, pos + 1]
        with torch.no_grad():
            want = (
                torch.log_softmax(deg(ids).logits[0, pos].float(), -1).gather(1, tgt[:, None])[:, 0]
                - torch.log_softmax(util(ids).logits[0, pos].float(), -1).gather(1, tgt[:, None])[:, 0]
            )
        assert np.allclose(r.score, want.numpy(), atol=1e-4)
    # the rest of the cache is the source's, row for row
    for x, y in zip(a.iter_rows(), rows):
        assert x.example_id == y.example_id and np.array_equal(x.ref["full"], y.ref["full"])


def test_scored_cache_is_checked_copied_and_refused_when_edited(scored, tmp_path, capsys):
    import shutil

    _, out = scored
    assert cache_main(["verify", out]) == 0
    assert cache_main(["info", out]) == 0
    assert "token scores   toss/1" in capsys.readouterr().out
    assert cache_main(["cp", out, str(tmp_path / "copy"), "--no-progress"]) == 0
    assert open_cache(str(tmp_path / "copy")).cache_id == open_cache(out).cache_id
    assert any(p.name.startswith("scores-") for p in (tmp_path / "copy").iterdir())
    capsys.readouterr()

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    sidecar = next(p for p in bad.iterdir() if p.name.startswith("scores-"))
    data = bytearray(sidecar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    sidecar.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="score file is corrupt"):
        list(open_cache(str(bad)).iter_rows())

    stripped = tmp_path / "stripped"
    shutil.copytree(out, stripped)
    m = json.loads((stripped / MANIFEST).read_text())
    del m["scores"]
    (stripped / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CacheError, match="does not match the manifest's content"):
        open_cache(str(stripped))

    assert cache_main(["score", out, "--degraded", "x", "--utility", "y", "-o", str(tmp_path / "again")]) != 0
    assert "already carries token scores" in capsys.readouterr().err
    assert cache_main(["score", out, "--degraded", "x", "--utility", "y", "-o", out]) != 0


def test_a_score_that_fails_midway_leaves_nothing_and_the_retry_works(
    tiny_model, tiny_base_model, made, tmp_path, monkeypatch
):
    """The second part's scores come out non-finite (as from a model that gives a token probability
    0): one typed error, OUT left absent though the first part's files were published, and the same
    call works afterwards."""
    import numpy as np

    import pact_cache.score as score_mod
    from pact_cache.errors import PactError
    from pact_cache.score import score_cache

    real, calls = score_mod.row_scores, []

    def flaky(*args, **kw):
        out = real(*args, **kw)
        calls.append(1)
        return [np.full_like(s, np.nan) for s in out] if len(calls) > 1 else out

    monkeypatch.setattr(score_mod, "row_scores", flaky)
    out = tmp_path / "scored"
    with pytest.raises(PactError, match="a score is not finite"):
        score_cache(str(made["q8"]), tiny_model, tiny_base_model, str(out), device="cpu", progress=False, batch_size=8)
    assert len(calls) > 1 and not out.exists()
    monkeypatch.setattr(score_mod, "row_scores", real)
    m = score_cache(str(made["q8"]), tiny_model, tiny_base_model, str(out), device="cpu", progress=False, batch_size=8)
    assert m.scores is not None and len(m.scores.files) == len(m.parts)
