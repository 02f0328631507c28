"""Streaming batches (trainer/stream.py): seeded order, bounded memory, exact resume."""

import gc
import tracemalloc

import numpy as np
from conftest import row_result, write_manifest
from pact_train.stream import batches, collate, epoch_rows

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
            if i % 10 == 5:
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
