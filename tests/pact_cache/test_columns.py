"""The reference columns and their codecs (pact_cache/columns.py): q8 within its stated bound over
its whole range, checked against an independent per-value computation of the spec; f32 exact."""

import math

import numpy as np
import pytest
from conftest import realistic_logprobs

from pact_cache.columns import REF_COLUMNS, blob_sizes, decode, encode, q8_bound
from pact_cache.format import ENCODINGS

Q8 = ENCODINGS["q8"]
FULL, TARGET = REF_COLUMNS[0], REF_COLUMNS[2]


def spec_q8(step, enc):
    """docs/format.md's q8, one value at a time in plain Python: (top code, value codes, decoded values)."""
    top_code = min(65535, max(0, round(-max(step) * enc.top_scale)))
    top = -top_code / enc.top_scale
    codes = [round(enc.scale * math.log1p(min(max(top - v, 0.0), enc.floor))) for v in step]
    return top_code, codes, [top - math.expm1(c / enc.scale) for c in codes]


def test_q8_matches_the_spec_and_its_bound_over_the_whole_range():
    """Steps whose maximum spans the top's range (0 to -127.99 nats) and whose values span every
    distance below it, from 0 past the floor: the codec's bytes equal the spec's, computed value by
    value, and every decoded value is within the stated bound (below the floor: never lower than
    the truth minus the bound at the floor)."""
    rng = np.random.default_rng(7)
    K = 16
    tops = np.concatenate([[0.0, -1e-6, -(2**-11)], -rng.uniform(0, 127.99, 60), [-127.99]])
    dists = np.concatenate([[0.0, 1e-4], np.geomspace(1e-3, Q8.floor, 40), [Q8.floor * 1.5, 200.0, 1e4]])
    worst = 0.0
    for top in tops:
        for d0 in range(0, len(dists), K - 1):
            step = np.float32(np.concatenate([[top], top - dists[d0 : d0 + K - 1]]))
            blobs = encode(FULL, step[None], Q8)
            top_code, codes, spec_dec = spec_q8([float(v) for v in step], Q8)
            assert np.frombuffer(blobs["full_top"], "<u2")[0] == top_code
            assert np.frombuffer(blobs["full_q"], np.uint8).tolist() == codes
            dec = decode(FULL, blobs, 1, len(step), Q8)[0]
            np.testing.assert_allclose(dec, np.float32(spec_dec), rtol=0, atol=1e-5)
            true = step.astype(np.float64)
            assert abs(dec.max() - true.max()) <= 2**-10 + 1e-6  # the maximum itself
            d = true.max() - true
            inside = d <= Q8.floor
            err = np.abs(dec - true)
            assert (err[inside] <= q8_bound(d[inside], Q8) + 1e-5).all()
            assert (dec[~inside] >= true[~inside] - q8_bound(np.float64(Q8.floor), Q8) - 1e-5).all()
            worst = max(worst, float((err[inside] / q8_bound(d[inside], Q8)).max()))
    assert 0.3 < worst <= 1.0 + 1e-3  # the bound is reached in places, not loose everywhere


def test_q8_respects_its_stated_bound_on_realistic_steps():
    rng = np.random.default_rng(0)
    v = realistic_logprobs(rng, 400, 50)
    v[0, :] = -0.0  # a certain step
    v[1, 3] = -200.0  # far below the floor
    dec = decode(FULL, encode(FULL, v, Q8), 400, 50, Q8)
    d = v.max(1, keepdims=True) - v
    inside = d <= Q8.floor
    err = np.abs(dec - v)
    assert (err[inside] <= q8_bound(d[inside], Q8) + 1e-5).all()
    assert (dec[~inside] >= v[~inside] - q8_bound(np.float32(Q8.floor), Q8)).all()
    assert (~inside).any() and inside.mean() > 0.5
    assert np.abs(dec.max(1) - v.max(1)).max() <= 2**-10 + 1e-6


def test_f32_round_trip_is_exact_and_the_target_within_its_bound():
    rng = np.random.default_rng(1)
    v = realistic_logprobs(rng, 7, 5)
    assert np.array_equal(decode(FULL, encode(FULL, v, ENCODINGS["f32"]), 7, 5, ENCODINGS["f32"]), v)
    t = -np.concatenate([np.abs(rng.normal(size=33) * 5), [0.0, 255.98]]).astype(np.float32)
    assert np.abs(decode(TARGET, encode(TARGET, t, Q8), len(t), 5, Q8) - t).max() <= 2**-9 + 1e-6
    assert decode(TARGET, encode(TARGET, np.float32([-1000.0]), Q8), 1, 5, Q8)[0] == pytest.approx(-65535 / 256)


@pytest.mark.parametrize("enc", ["q8", "f32"])
def test_blob_sizes_are_what_the_encoder_writes(enc):
    """The sizes the reader checks come from the same table as the blobs the writer makes."""
    rng = np.random.default_rng(2)
    for n, K in ((1, 1), (3, 5), (17, 50)):
        got = {}
        for col in REF_COLUMNS:
            values = realistic_logprobs(rng, n, K) if col.per_step == "K" else -rng.random(n).astype(np.float32)
            got.update({k: len(v) for k, v in encode(col, values, ENCODINGS[enc]).items()})
        assert got == blob_sizes(n, K, ENCODINGS[enc])
