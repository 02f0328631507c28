"""Integration tests on the embedded default model and real rows of the paper's data."""

import json

import numpy as np
import pytest
import torch
from conftest import naive_reference, write_jsonl
from pact_train.losses import PactParams, pact_kl

from pact_cache.build import BuildConfig, build
from pact_cache.columns import q8_bound
from pact_cache.format import open_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sst2_rows(shared_data, tmp_path_factory):
    rows = json.loads((shared_data / "SST2_5k_p_0.1.json").read_text())
    harmful = [r for r in rows if r["output"].strip() not in ("positive", "negative")][:10]
    benign = [r for r in rows if r["output"].strip() in ("positive", "negative")][:20]
    assert len(harmful) == 10 and len(benign) == 20
    mixed = [r for pair in zip(benign[::2], benign[1::2], harmful) for r in pair]
    return write_jsonl(tmp_path_factory.mktemp("sst2") / "sst2_30.jsonl", mixed)


@pytest.fixture(scope="module")
def built(embedded_model, sst2_rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    q8 = build(BuildConfig(str(sst2_rows), embedded_model, str(root / "q8"), batch_size=4, progress=False))
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps(q8.manifest.tokens.to_json()))
    f32 = build(
        BuildConfig(
            str(sst2_rows),
            embedded_model,
            str(root / "f32"),
            tokens=str(tokens),
            encoding="f32",
            batch_size=4,
            progress=False,
        )
    )
    return q8, f32


def test_every_stored_value_matches_a_plain_forward_pass(built, embedded_model, sst2_rows):
    q8, f32 = built
    enc = q8.manifest.encoding
    ids = list(q8.manifest.tokens.ids)
    want = naive_reference(embedded_model, sst2_rows, ids)
    got_q8 = list(open_cache(q8.out).iter_rows())
    got_f32 = list(open_cache(f32.out).iter_rows())
    assert len(want) == len(got_q8) == len(got_f32) == 30
    assert sum(r.steps for r in got_q8) > 150  # the harmful rows have long responses
    worst_q8 = worst_f32 = 0.0
    for q, f, (eid, full, post, target) in zip(got_q8, got_f32, want):
        assert q.example_id == f.example_id == eid
        for dec_q, dec_f, true in ((q.ref["full"], f.ref["full"], full), (q.ref["post"], f.ref["post"], post)):
            d = true.max(1, keepdims=True) - true
            inside = d <= enc.floor
            excess = np.abs(dec_q - true)[inside] - q8_bound(d[inside], enc)
            worst_q8 = max(worst_q8, float(excess.max()))
            assert (dec_q[~inside] >= true[~inside] - q8_bound(np.float32(enc.floor), enc) - 1e-4).all()
            worst_f32 = max(worst_f32, float(np.abs(dec_f - true).max()))
        assert np.abs(q.ref["target"] - target).max() <= 2**-9 + 1e-4
        worst_f32 = max(worst_f32, float(np.abs(f.ref["target"] - target).max()))
    assert worst_q8 <= 1e-4, f"q8 exceeds its stated bound by {worst_q8}"
    assert worst_f32 <= 1e-3, f"f32 differs from a plain forward pass by {worst_f32}"  # batching/padding only


def test_pact_loss_from_q8_within_half_a_percent_of_exact(built):
    q8, f32 = built
    rows_q, rows_e = list(open_cache(q8.out).iter_rows()), list(open_cache(f32.out).iter_rows())
    K, T = len(list(q8.manifest.tokens.ids)), max(r.steps for r in rows_e)

    def stack(rows, attr):
        out = torch.zeros(len(rows), T, K)
        for i, r in enumerate(rows):
            out[i, : r.steps] = torch.from_numpy(r.ref[attr])
        return out

    mask = torch.arange(T)[None, :] < torch.tensor([r.steps for r in rows_e])[:, None]
    w = torch.tensor(q8.manifest.tokens.weights)
    ea, eb, qa, qb = (stack(rows_e, "full"), stack(rows_e, "post"), stack(rows_q, "full"), stack(rows_q, "post"))
    g = torch.Generator().manual_seed(0)
    for sigma in (0.5, 2.0):
        policy = ea + sigma * torch.randn(ea.shape, generator=g)
        kq, _ = pact_kl(policy, qa, qb, w, mask, PactParams())
        ke, _ = pact_kl(policy, ea, eb, w, mask, PactParams())
        assert abs(kq.item() / ke.item() - 1) < 0.005, (sigma, kq.item(), ke.item())


REFUSAL_MARKERS = {
    "'m",
    "'t",
    " I",
    "I",
    " sorry",
    "Sorry",
    " can",
    " cannot",
    " assist",
    " afraid",
    " unable",
    " not",
    " won",
}
FUNCTION_WORDS = {
    ",",
    ".",
    " the",
    " a",
    " an",
    " of",
    " and",
    " in",
    " is",
    " it",
    "The",
    "To",
    " to",
    "When",
    " for",
    " with",
    " but",
    " that",
    " this",
    " on",
    " you",
    " your",
    " be",
}


def test_default_safety_tokens_are_led_by_refusal_tokens(built, embedded_model):
    """build without --tokens on the embedded model (the self-contrast: its refusals after harmful
    prompts against the same refusals after benign prompts and against its own benign answers): the
    top 10 by weight holds at least 4 refusal markers and the top 5 no function word."""
    from pact_cache.models import load_tokenizer, resolve_model

    tokens = built[0].manifest.tokens
    tok = load_tokenizer(resolve_model(embedded_model))
    ranked = [tok.decode([i]) for w, i in sorted(zip(tokens.weights, tokens.ids), reverse=True)]
    print("default S by weight:", ranked[:12])
    assert tokens.method == "pact-self-contrast"
    assert len(REFUSAL_MARKERS & set(ranked[:10])) >= 4, ranked[:10]
    assert not FUNCTION_WORDS & set(ranked[:5]), ranked[:5]
    assert ranked[0] in REFUSAL_MARKERS


def test_info_reports_bytes_per_step(built, capsys):
    from pact_cache.cli import main

    q8, _ = built
    assert main(["info", str(q8.out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 30 and 0 < info["bytes_per_step"] < 202 and info["token_method"] == "pact-self-contrast"


def test_pact_train_cached_equals_online_on_real_rows(built, embedded_model, tmp_path):
    """Same batches, same seed: CE identical, KL from an f32 cache equal to the live reference's,
    KL from the q8 cache within its measured error (largest where the policy equals the reference)."""
    from pact_train.loop import TrainConfig, train

    q8, f32 = built
    runs = {}
    for name, cache, reference in (("online", f32.out, "online"), ("f32", f32.out, "cache"), ("q8", q8.out, "cache")):
        cfg = TrainConfig(
            model=embedded_model,
            cache=str(cache),
            out=str(tmp_path / name),
            reference=reference,
            recipe="plain",
            batch_size=6,
            max_steps=2,
            shuffle=False,
            progress=False,
            plot=False,
            lr=1e-3,
            lora_dropout=0.0,
        )
        train(cfg)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    gaps = []
    for on, ex, q in zip(runs["online"], runs["f32"], runs["q8"]):
        assert on["tokens"] == ex["tokens"] == q["tokens"]
        assert ex["ce"] == pytest.approx(on["ce"], rel=1e-5) and q["ce"] == pytest.approx(on["ce"], rel=1e-3)
        assert ex["pact_kl"] == pytest.approx(on["pact_kl"], rel=1e-3)
        gaps.append(abs(q["pact_kl"] / on["pact_kl"] - 1))
        assert abs(q["loss"] / on["loss"] - 1) < 0.005
    print("q8 KL relative gaps per step:", gaps)
    assert max(gaps) < 0.02
