"""Refusal replay (--replay CACHE --replay-ratio R, trainer/stream.Replay): rows of a second cache mixed
into the stream, seeded and resumable; ratio 0 is today's run exactly; the replay term choice."""

import json
import re

import pytest
import torch
from conftest import CHAT_ROWS, build_f32_cache
from hostile import one_line
from pact_train.cli import main as train_main
from pact_train.core import policy_losses
from pact_train.hf import CacheDataset, PactCollator
from pact_train.loop import TrainConfig, train
from pact_train.losses import LossParams
from pact_train.stream import Replay, ReplayRow, batches, collate
from safetensors.torch import load_file

from pact_cache.errors import PactError
from pact_cache.format import open_cache

REFUSALS = [
    {
        "prompt": f"Explain how to break into house number {i} without a key.",
        "completion": "I'm sorry, I can't help with that." + " I won't." * (i % 3),
    }
    for i in range(7)
]


@pytest.fixture(scope="module")
def replay_cache(tiny_model, tmp_path_factory) -> str:
    """The tiny model's cache of refusals, with f32_cache's safety tokens (build_f32_cache's defaults)."""
    return build_f32_cache(tmp_path_factory.mktemp("replay"), tiny_model, rows=REFUSALS)


def run(model, cache, out, **kw):
    base = dict(
        recipe="plain", batch_size=4, max_steps=4, shuffle=True, progress=False, plot=False, lr=1e-3, lora_dropout=0.0
    )
    train(TrainConfig(model=model, cache=cache, out=str(out), **{**base, **kw}))
    return [
        {k: v for k, v in json.loads(line).items() if k != "step_time_s"}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def stream(cache, replay, **kw):
    return [
        (e, t, [(type(r).__name__, r.example_id) for r in rows])
        for e, t, rows in batches(cache, 4, 3, True, epochs=3, replay=replay, **kw)
    ]


def test_the_mix_is_the_ratio_seeded_and_resumes_mid_epoch(f32_cache, replay_cache):
    main, rep = open_cache(f32_cache), open_cache(replay_cache)
    mix = Replay.of(main, rep, 0.2, seed=3)
    assert [mix.count(g) for g in (0, 3, 4, 8, 92)] == [0, 0, 1, 2, 23]  # floor(g * 0.2 / 0.8)
    full = stream(main, mix)
    replayed = [rid for _, _, rows in full for kind, rid in rows if kind == "ReplayRow"]
    assert len(replayed) == mix.count(3 * main.num_rows) == 17  # a share 0.2 of 69 + 17 rows
    assert sorted(replayed[:7]) == sorted(r.example_id for r in rep.iter_rows())  # every replay row once per round
    assert replayed[:7] != replayed[7:14]  # a new order each round
    assert stream(main, Replay.of(main, rep, 0.2, seed=3)) == full  # the same seed, the same mix
    assert stream(main, Replay.of(main, rep, 0.2, seed=4)) != full
    # resumed from any batch boundary, the rest of the stream is the same
    for k in (1, 5, 6, 8, 13):
        e, t, _ = full[k - 1]
        e, t = (e + 1, 0) if t == main.num_rows else (e, t)  # the end of an epoch: the next one from its start
        assert stream(main, mix, start_epoch=e, skip_rows=t) == full[k:]
    # no replay and ratio 0: the plain stream, row for row
    assert stream(main, Replay.of(main, rep, 0.0, seed=3)) == stream(main, None)


def test_ratio_zero_is_todays_run_exactly(tiny_model, f32_cache, replay_cache, tmp_path):
    plain = run(tiny_model, f32_cache, tmp_path / "plain", method="pact")
    zero = run(tiny_model, f32_cache, tmp_path / "zero", method="pact", replay=replay_cache, replay_ratio=0.0)
    assert zero == plain
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("plain", "zero"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rec = json.loads((tmp_path / "zero" / "config.json").read_text())
    assert rec["replay_ratio"] == 0.0 and rec["replay_cache_id"] == open_cache(replay_cache).cache_id


def test_a_mixed_run_resumed_mid_epoch_is_the_same_run(tiny_model, f32_cache, replay_cache, tmp_path):
    kw = dict(
        method="str", replay=replay_cache, replay_ratio=0.3, schedule="constant", warmup_steps=0, epochs=2, save_every=4
    )
    whole = run(tiny_model, f32_cache, tmp_path / "whole", max_steps=9, **kw)
    assert whole[0]["tokens"] > 0 and len(whole) == 9
    run(tiny_model, f32_cache, tmp_path / "cut", max_steps=4, **kw)  # stops at step 4 (epoch 0, 16 of 23 rows)
    resumed = run(tiny_model, f32_cache, tmp_path / "cut", max_steps=9, resume=True, **kw)
    assert resumed == whole
    plain = run(tiny_model, f32_cache, tmp_path / "plain", max_steps=9, **{**kw, "replay": None, "replay_ratio": None})
    assert [r["tokens"] for r in whole] != [r["tokens"] for r in plain]  # the replay rows are in the windows


def test_what_the_replay_rows_are_trained_with(tiny_model, f32_cache, replay_cache):
    from pact_cache.models import load_model, resolve_model

    main, rep = open_cache(f32_cache), open_cache(replay_cache)
    rows = list(main.iter_rows())[:3]
    replayed = [ReplayRow.of(r) for r in list(rep.iter_rows())[:2]]
    both, ce, term = (collate(rows + replayed, 0, replay_term=t) for t in ("both", "ce", "term"))
    assert both.row_gate.tolist() == [1.0] * 5 and both.ce_weight is None
    assert ce.row_gate.tolist() == [1, 1, 1, 0, 0] and ce.ce_weight is None
    assert term.row_gate.tolist() == [1.0] * 5 and term.ce_weight.tolist() == [1, 1, 1, 0, 0]
    assert collate(rows, 0).row_gate is None and collate(rows, 0).ce_weight is None  # no replay row: as before
    model, _, _ = load_model(resolve_model(tiny_model), torch.float32, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that has moved away from the reference: a term that is not zero
        for q in model.parameters():
            q.add_(torch.randn_like(q) * 0.05)
    ids, w = torch.tensor(main.ids), torch.tensor(main.tokens.weights)
    p = LossParams(method="str")

    def losses(b):
        return [x.item() for x in policy_losses(model, b, ids, w, p)[:2]]

    (ce_m, t_m), (ce_r, t_r) = losses(collate(rows, 0)), losses(collate(replayed, 0))
    assert t_m > 1e-3 and t_r > 1e-3
    assert losses(both) == pytest.approx([ce_m + ce_r, t_m + t_r], rel=1e-5)
    assert losses(ce) == pytest.approx([ce_m + ce_r, t_m], rel=1e-5)
    assert losses(term) == pytest.approx([ce_m, t_m + t_r], rel=1e-5)


def test_the_trainer_dataset_mixes_the_same_share(f32_cache, replay_cache):
    ds = CacheDataset(f32_cache, shuffle=True, seed=3, replay=replay_cache, replay_ratio=0.2)
    items = list(ds)
    assert len(items) == len(ds) == len(CHAT_ROWS) + 5  # floor(23 * 0.25)
    assert sum(isinstance(it["row"], ReplayRow) for it in items) == 5
    ds.set_epoch(1)
    assert len(list(ds)) == len(ds) == len(CHAT_ROWS) + 6  # floor(46 * 0.25) - 5: the share holds over epochs
    out = PactCollator(0, replay_term="term")(items[:8])
    assert out["pact_ce_weight"].tolist() == [0.0 if isinstance(it["row"], ReplayRow) else 1.0 for it in items[:8]]
    assert PactCollator(0)(items[:8])["pact_ce_weight"].tolist() == [1.0] * 8


def test_replay_refusals(tiny_model, f32_cache, made, tmp_path, capsys):
    base = (
        "--model",
        tiny_model,
        "--cache",
        f32_cache,
        "-o",
        tmp_path / "r",
        "--no-progress",
        "--max-steps",
        1,
        "--method",
        "pact",
    )
    line = one_line(capsys, train_main, *base, "--replay", made["q8"])  # other safety tokens
    assert f"--replay {made['q8']}: was built with other safety tokens than the fine-tuning cache" in line
    line = one_line(capsys, train_main, *base, "--replay-ratio", "0.1")
    assert "--replay-ratio: applies to the rows of --replay CACHE" in line
    for ratio in ("1", "0.6", "nan"):
        line = one_line(capsys, train_main, *base, "--replay", f32_cache, "--replay-ratio", ratio, code=1)
        assert (
            f"--replay-ratio {float(ratio)}: must be a finite number in [0, 0.5]; it is the share of the rows" in line
        )
    line = one_line(capsys, train_main, *base, "--replay", f32_cache, code=1)
    assert f"--replay {f32_cache}: is the fine-tuning cache itself (cache id" in line
    line = one_line(capsys, train_main, *base, "--replay", f32_cache, "--method", "sft", "--replay-term", "term")
    assert "--replay-term term: splits the cross-entropy from a per-step term" in line
    assert not (tmp_path / "r").exists()
    with pytest.raises(PactError, match="replay_term='half'"):
        PactCollator(0, replay_term="half")
    with pytest.raises(PactError, match=r"PactCollator\(replay_term=\['ce'\]\): use one of both, ce, term"):
        PactCollator(0, replay_term=["ce"])
    for bad, why in (
        ("0.1", re.escape("must be a number (a float such as 0.05), not a str")),
        (
            0.6,
            r"must be a share "
            r"of the rows in \[0, 0.5\]",
        ),
        (float("nan"), r"must be a share of the rows in \[0, 0.5\]"),
    ):
        with pytest.raises(PactError, match=r"CacheDataset\(replay=...\): ratio .*" + why):
            CacheDataset(f32_cache, replay=made["q8"], replay_ratio=bad)
    with pytest.raises(PactError, match="is the fine-tuning cache itself"):
        CacheDataset(f32_cache, replay=f32_cache)


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.02])
def test_a_micro_batch_never_holds_more_than_its_batch_size(f32_cache, replay_cache, ratio):
    """Replay rows take slots (one rule with the Trainer path's interleaved rows): a micro-batch holds at most
    batch_size rows whatever the ratio, the share holds, and a resume from any batch boundary is exact."""
    main, rep = open_cache(f32_cache), open_cache(replay_cache)
    mix = Replay.of(main, rep, ratio, seed=3)
    for size in (1, 2, 4):
        full = [
            (e, t, [(type(r).__name__, r.example_id) for r in rows])
            for e, t, rows in batches(main, size, 3, True, epochs=2, replay=mix)
        ]
        assert max(len(rows) for _, _, rows in full) <= size
        kinds = [kind for _, _, rows in full for kind, _ in rows]
        assert kinds.count("CacheRow") == 2 * main.num_rows and kinds.count("ReplayRow") == mix.count(2 * main.num_rows)
        ds = CacheDataset(f32_cache, shuffle=True, seed=3, replay=replay_cache, replay_ratio=ratio)
        assert [(type(it["row"]).__name__, it["row"].example_id) for it in ds] == [
            x for e, _, rows in full if e == 0 for x in rows
        ]
        for k in range(1, len(full)):
            e, t, _ = full[k - 1]
            again = [
                (e2, t2, [(type(r).__name__, r.example_id) for r in rows])
                for e2, t2, rows in batches(main, size, 3, True, start_epoch=e, skip_rows=t, epochs=2, replay=mix)
            ]
            assert again == full[k:]
