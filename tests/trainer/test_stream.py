"""Streaming batches (trainer/stream.py): seeded order, bounded memory, exact resume; row gates (RowGate,
--row-gate) and refusal replay (Replay, --replay), through pact-train and the Trainer integration too."""

import gc
import json
import re
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import CHAT_ROWS, build_f32_cache, masses_cache, row_result, write_manifest
from hostile import one_line
from pact_train.cli import main as train_main
from pact_train.core import policy_losses
from pact_train.hf import CacheDataset, PactCollator
from pact_train.loop import TrainConfig, train
from pact_train.losses import METHODS, LossParams, PactParams, Steps
from pact_train.stream import Replay, ReplayRow, RowGate, batches, collate, epoch_rows
from safetensors.torch import load_file

from pact_cache.errors import PactError
from pact_cache.format import ENCODINGS, CacheRow, open_cache, write_part


def small_cache(tmp_path, n_rows=23, per_part=5, K=3, name="cache"):
    rng = np.random.default_rng(0)
    out = tmp_path / name
    out.mkdir()
    rows = []
    for i in range(n_rows):
        n = 1 + i % 4
        low = np.log(K) + 0.1  # K log-probs whose probabilities sum below 1, as real ones do
        rows.append(
            row_result(
                f"{i:08d}-x",
                list(range(5 + n)),
                5,
                -(low + rng.random((n, K))).astype(np.float32),
                -(low + rng.random((n, K))).astype(np.float32),
                -rng.random(n).astype(np.float32),
            )
        )
    parts = [
        write_part(out / f"part-{j:05d}.parquet", rows[j * per_part : (j + 1) * per_part], ENCODINGS["f32"])
        for j in range((n_rows + per_part - 1) // per_part)
    ]
    write_manifest(out, parts, ENCODINGS["f32"], K)
    return open_cache(out)


def ids(rows):
    return [r.example_id for r in rows]


def test_no_shuffle_is_cache_order_batch_by_batch(tmp_path):
    cache = small_cache(tmp_path)
    got = [(e, t, ids(b)) for e, t, b in batches(cache, 4, seed=0, shuffle=False, epochs=2)]
    order = ids(cache.iter_rows())
    assert [x for e, _, b in got if e == 0 for x in b] == order
    assert [len(b) for e, _, b in got if e == 0] == [4, 4, 4, 4, 4, 3]  # batches never straddle epochs
    assert got[0][1] == 4 and got[5][1] == 23


def test_shuffle_is_a_seeded_permutation_per_epoch_with_a_bounded_buffer(tmp_path):
    cache = small_cache(tmp_path)
    e0 = ids(epoch_rows(cache, 0, seed=7, shuffle=True, buffer_rows=3))
    assert sorted(e0) == sorted(ids(cache.iter_rows())) and e0 != ids(cache.iter_rows())
    assert e0 == ids(epoch_rows(cache, 0, seed=7, shuffle=True, buffer_rows=3))
    assert e0 != ids(epoch_rows(cache, 1, seed=7, shuffle=True, buffer_rows=3))
    assert e0 != ids(epoch_rows(cache, 0, seed=8, shuffle=True, buffer_rows=3))


def test_resuming_from_a_position_replays_the_same_batches(tmp_path):
    cache = small_cache(tmp_path)
    full = [(e, t, ids(b)) for e, t, b in batches(cache, 3, seed=1, shuffle=True, epochs=3, buffer_rows=4)]
    e, t, _ = full[9]
    resumed = [
        (e2, t2, ids(b))
        for e2, t2, b in batches(cache, 3, seed=1, shuffle=True, start_epoch=e, skip_rows=t, epochs=3, buffer_rows=4)
    ]
    assert resumed == full[10:]


def test_collate_shapes_and_masks(tmp_path):
    cache = small_cache(tmp_path)
    rows = list(cache.iter_rows())[:3]  # 1, 2 and 3 steps
    b = collate(rows, pad_id=0)
    assert b.input_ids.shape == (3, 8) and b.ref["full"].shape == (3, 3, 3)
    assert b.step_mask.sum(1).tolist() == [1, 2, 3]
    assert b.targets[2].tolist() == [5, 6, 7] and b.num_tokens == 6
    b16 = collate(rows, pad_id=0, pad_to_multiple=16)
    assert b16.input_ids.shape == (3, 16) and b16.attention_mask.sum() == b.attention_mask.sum()
    assert (b16.input_ids[:, :8] == b.input_ids).all() and (b16.targets == b.targets).all()
    assert np.allclose(b.ref["post"][1, :2].numpy(), rows[1].ref["post"])


def test_rows_held_while_streaming_do_not_grow_with_the_cache(tmp_path):
    """At any batch, only the shuffle buffer and the batch are alive, and the reader's peak
    allocation is the same for a cache eight times larger."""
    buffer_rows, batch = 16, 4

    def stream(cache):
        most = 0
        tracemalloc.start()
        for i, (_, _, rows) in enumerate(
            batches(cache, batch, seed=0, shuffle=True, epochs=1, buffer_rows=buffer_rows)
        ):
            if i % 25 == 5:  # a scan of every object of the process costs ~1 s in the suite: 8 over the big cache
                gc.collect()
                most = max(most, sum(type(o) is CacheRow for o in gc.get_objects()))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return most, peak

    small_rows, small_peak = stream(small_cache(tmp_path, n_rows=100, per_part=50, K=50, name="small"))
    big_rows, big_peak = stream(small_cache(tmp_path, n_rows=800, per_part=50, K=50, name="big"))
    assert small_rows <= buffer_rows + batch and big_rows <= buffer_rows + batch
    assert big_peak < 1.25 * small_peak, (small_peak, big_peak)


def test_a_row_gate_checks_its_kind_and_threshold(tmp_path):
    """A threshold outside [0, 1] or NaN would gate every row to 0 (the run silently SFT); the soft gate has no
    threshold; a kind that is not a gate: each one line, as the CLI's."""
    import pytest
    from pact_train.stream import GATE_AT, RowGate

    from pact_cache.errors import PactError

    cache = small_cache(tmp_path)
    assert RowGate.of_cache(cache, "hard").at == GATE_AT and RowGate.of_cache(cache, "hard", 0).at == 0.0
    for at in (1.5, -0.1, float("nan"), "0.9", True):
        with pytest.raises(PactError, match="row gate threshold .*: must be a step-0 refusal mass in \\[0, 1\\]"):
            RowGate.of_cache(cache, "hard", at)
    with pytest.raises(
        PactError, match="row gate soft, at=0.9: the soft gate weighs each row by its mass and has no threshold"
    ):
        RowGate.of_cache(cache, "soft", 0.9)
    for kind in ("Hard", ["hard"], None):
        with pytest.raises(PactError, match="use one of hard, soft"):
            RowGate.of_cache(cache, kind)


# ----------------------------------------------------------------------------- row gates (RowGate, --row-gate)


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


# ----------------------------------------------------------------------------- refusal replay (Replay, --replay)


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


def replay_run(model, cache, out, **kw):
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
    plain = replay_run(tiny_model, f32_cache, tmp_path / "plain", method="pact")
    zero = replay_run(tiny_model, f32_cache, tmp_path / "zero", method="pact", replay=replay_cache, replay_ratio=0.0)
    assert zero == plain
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("plain", "zero"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rec = json.loads((tmp_path / "zero" / "config.json").read_text())
    assert rec["replay_ratio"] == 0.0 and rec["replay_cache_id"] == open_cache(replay_cache).cache_id


def test_a_mixed_run_resumed_mid_epoch_is_the_same_run(tiny_model, f32_cache, replay_cache, tmp_path):
    kw = dict(
        method="str", replay=replay_cache, replay_ratio=0.3, schedule="constant", warmup_steps=0, epochs=2, save_every=4
    )
    whole = replay_run(tiny_model, f32_cache, tmp_path / "whole", max_steps=9, **kw)
    assert whole[0]["tokens"] > 0 and len(whole) == 9
    replay_run(tiny_model, f32_cache, tmp_path / "cut", max_steps=4, **kw)  # stops at step 4 (epoch 0, 16 of 23 rows)
    resumed = replay_run(tiny_model, f32_cache, tmp_path / "cut", max_steps=9, resume=True, **kw)
    assert resumed == whole
    plain = replay_run(
        tiny_model, f32_cache, tmp_path / "plain", max_steps=9, **{**kw, "replay": None, "replay_ratio": None}
    )
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


def test_the_anchored_share_counts_the_rows_the_hard_gate_anchors(tmp_path):
    """RowGate.anchored_share (the safe recipe's measure of the data): the share of rows whose step-0 refusal mass
    is at least the threshold, the same as counting the gate's 1s row by row; 0 and 1 at the ends."""
    from pact_train.stream import RowGate

    from pact_cache.rows import step0_refusal_mass

    cache = small_cache(tmp_path, n_rows=23, per_part=5, K=3)
    keep = np.array([w > 0 for w in cache.tokens.weights])
    masses = sorted(step0_refusal_mass(r, keep) for r in cache.iter_rows())
    at = masses[15]  # 8 of the 23 rows at or above it
    gate = RowGate.of_cache(cache, "hard", at)
    assert gate.anchored_share(cache) == pytest.approx(8 / 23)
    assert gate.anchored_share(cache) == pytest.approx(sum(gate(r) for r in cache.iter_rows()) / 23)
    assert RowGate.of_cache(cache, "hard", 0.0).anchored_share(cache) == 1.0
    assert RowGate.of_cache(cache, "hard", 1.0).anchored_share(cache) == 0.0
