"""Row-gated anchoring (--row-gate, trainer/stream.RowGate): each row's term weighs g in [0, 1],
from the reference's step-0 refusal mass in the cache. g = 1 is the ungated method exactly, g = 0 is SFT."""

import json

import numpy as np
import pytest
import torch
from conftest import masses_cache
from hostile import one_line
from pact_train.cli import main as train_main
from pact_train.hf import PactCollator
from pact_train.loop import TrainConfig, train
from pact_train.losses import METHODS, LossParams, PactParams, Steps
from pact_train.stream import RowGate, collate

from pact_cache.format import open_cache


def run(model, cache, out, **kw):
    base = dict(
        recipe="plain", batch_size=4, max_steps=3, shuffle=False, progress=False, plot=False, lr=1e-3, lora_dropout=0.0
    )
    train(TrainConfig(model=model, cache=cache, out=str(out), **{**base, **kw}))
    return [
        {k: v for k, v in json.loads(line).items() if k != "step_time_s"}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_hand_made_cache_gets_the_expected_gates(tmp_path):
    step0 = [0.05, 0.92, 0.2, 0.95, 0.1, 0.3, 0.99]
    cache = open_cache(masses_cache(tmp_path, step0))  # weights 0.7, 0.2, -0.3: the third token does not count
    rows = list(cache.iter_rows())
    hard, soft = RowGate.of_cache(cache, "hard", 0.9), RowGate.of_cache(cache, "soft")
    assert [hard(r) for r in rows] == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert np.allclose([soft(r) for r in rows], step0, atol=1e-6)
    b = collate(rows, 0, row_gate=hard)
    assert b.row_gate.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    out = PactCollator(0, row_gate=soft)([{"row": r} for r in rows])
    assert torch.allclose(out["pact_row_gate"], torch.tensor(step0, dtype=torch.float32), atol=1e-6)
    assert PactCollator(0)([{"row": r} for r in rows])["pact_row_gate"].tolist() == [1.0] * 7


@pytest.mark.parametrize("method", ["pact", "pact-rest", "str"])
def test_a_weighted_mask_is_the_rows_terms_times_their_gates(method):
    """Each per-step term with float step weights equals the sum over rows of g_row times the row's
    own term (the row alone, its steps unweighted): the naive definition of a row gate."""
    g = torch.Generator().manual_seed(5)
    B, T, K = 4, 6, 5
    lens = [6, 2, 4, 1]
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
    sel = torch.randn(B, T, K, generator=g) * 3
    lse = torch.logsumexp(torch.cat([sel, torch.randn(B, T, 50, generator=g) * 3], -1), -1)
    full = torch.log_softmax(torch.randn(B, T, K + 20, generator=g) * 2, -1)[..., :K]
    post = torch.log_softmax(torch.randn(B, T, K + 20, generator=g) * 2, -1)[..., :K]
    tgt = -torch.rand(B, T, generator=g)
    w = torch.tensor([0.5, 0.1, -0.2, 0.7, 0.3])
    gates = torch.tensor([1.0, 0.0, 0.35, 0.8])
    m, p = METHODS[method], LossParams(method=method, pact=PactParams())
    ref = {"full": full, "post": post, "target": tgt}
    got = m.term(Steps(mask.float() * gates[:, None], sel, lse, tgt, w, {c: ref[c] for c in m.columns}), p)
    want = sum(
        float(gates[b])
        * m.term(
            Steps(
                mask[b : b + 1],
                sel[b : b + 1],
                lse[b : b + 1],
                tgt[b : b + 1],
                w,
                {c: ref[c][b : b + 1] for c in m.columns},
            ),
            p,
        )
        for b in range(B)
    )
    assert got.item() == pytest.approx(float(want), rel=1e-5)


def test_gate_one_everywhere_is_the_ungated_method_and_zero_is_sft(tiny_model, f32_cache, tmp_path):
    plain = run(tiny_model, f32_cache, tmp_path / "plain", method="pact")
    ones = run(tiny_model, f32_cache, tmp_path / "ones", method="pact", row_gate="hard", gate_at=0.0)  # every mass >= 0
    assert ones == plain  # exactly: every metric of every step
    sft = run(tiny_model, f32_cache, tmp_path / "sft", method="sft")
    zeros = run(
        tiny_model, f32_cache, tmp_path / "zeros", method="pact", row_gate="hard", gate_at=1.0
    )  # no mass reaches 1
    for z, s in zip(zeros, sft):
        assert z["pact_kl"] == 0.0
        assert {k: v for k, v in z.items() if k != "pact_kl"} == s
    rec = json.loads((tmp_path / "zeros" / "config.json").read_text())
    assert rec["row_gate"] == "hard" and rec["gate_at"] == 1.0
    soft = run(tiny_model, f32_cache, tmp_path / "soft", method="pact", row_gate="soft")
    assert 0 < soft[0]["pact_kl"] < plain[0]["pact_kl"] and soft[0]["ce"] == plain[0]["ce"]


@pytest.mark.parametrize("method", ["sft", "constrained-sft"])
def test_a_gate_on_a_method_without_an_added_term_is_refused(tiny_model, f32_cache, tmp_path, capsys, method):
    line = one_line(
        capsys,
        train_main,
        "--model",
        tiny_model,
        "--cache",
        f32_cache,
        "-o",
        tmp_path / "r",
        "--method",
        method,
        "--row-gate",
        "hard",
        "--no-progress",
    )
    assert (
        "--row-gate hard: gates a per-step term added to the cross-entropy (pact, pact-rest, pact-rest-ref, str), "
        f"not --method {method}" in line
    )
    assert not (tmp_path / "r").exists()
