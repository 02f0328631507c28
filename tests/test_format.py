import math

import numpy as np
import pytest

from pact_cache.errors import CacheError
from pact_cache.columns import REF_COLUMNS, decode, encode, q8_bound
from pact_cache.format import ENCODINGS, open_cache, write_part
from pact_cache.typedjson import hash_identity

from conftest import edit_manifest, row_result, write_manifest

FULL, TARGET = REF_COLUMNS[0], REF_COLUMNS[2]

Q8 = ENCODINGS["q8"]


def realistic_logprobs(rng, n, K):
    """Log-softmax of heavy-tailed logits, like a language model's: a few likely tokens, a long tail."""
    logits = rng.normal(size=(n, 2000)) * 3.5
    logits[:, :K] += rng.normal(size=(n, K)) * 6  # the safety tokens: some likely, some far in the tail
    mx = logits.max(1, keepdims=True)
    lp = logits - mx - np.log(np.exp(logits - mx).sum(1, keepdims=True))
    return lp[:, :K].astype(np.float32)


def assert_within_q8_bound(dec, v):
    d = v.max(1, keepdims=True) - v
    inside = d <= Q8.floor
    assert (np.abs(dec - v)[inside] <= q8_bound(d[inside], Q8) + 1e-5).all()
    assert (dec[~inside] >= v[~inside] - q8_bound(np.float32(Q8.floor), Q8)).all()


def test_q8_respects_its_stated_bound():
    rng = np.random.default_rng(0)
    v = realistic_logprobs(rng, 400, 50)
    v[0, :] = -0.0  # a certain step
    v[1, 3] = -200.0  # far below the floor
    dec = decode(FULL, encode(FULL, v, Q8), 400, 50, Q8)
    d = v.max(1, keepdims=True) - v
    inside = d <= Q8.floor
    err = np.abs(dec - v)
    assert (err[inside] <= q8_bound(d[inside], Q8) + 1e-5).all()
    # below the floor: never lower than the truth (minus the bound at the floor)
    assert (dec[~inside] >= v[~inside] - q8_bound(np.float32(Q8.floor), Q8)).all()
    assert (~inside).any() and inside.mean() > 0.5
    # the step maximum is kept to 2**-10
    assert np.abs(dec.max(1) - v.max(1)).max() <= 2**-10 + 1e-6


def test_f32_round_trip_is_exact_and_target_bounds():
    rng = np.random.default_rng(1)
    v = realistic_logprobs(rng, 7, 5)
    assert np.array_equal(decode(FULL, encode(FULL, v, ENCODINGS["f32"]), 7, 5, ENCODINGS["f32"]), v)
    t = -np.abs(rng.normal(size=33) * 5).astype(np.float32)
    assert np.abs(decode(TARGET, encode(TARGET, t, Q8), 33, 5, Q8) - t).max() <= 2**-9 + 1e-6
    assert decode(TARGET, encode(TARGET, np.float32([-1000.0]), Q8), 1, 5, Q8)[0] == pytest.approx(-65535 / 256)


def rows(n_rows=5, K=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_rows):
        L, rs = 10 + i, 6
        n = L - rs
        out.append(row_result(f"{i:08d}-abc", list(range(L)), rs, realistic_logprobs(rng, n, K), realistic_logprobs(rng, n, K),
                             -np.abs(rng.normal(size=n)).astype(np.float32)))
    return out


def make_cache(tmp_path, enc="q8", n_rows=5, K=4):
    out = tmp_path / "cache"
    out.mkdir()
    rs = rows(n_rows, K)
    parts = [write_part(out / "part-00000.parquet", rs[:3], ENCODINGS[enc]), write_part(out / "part-00001.parquet", rs[3:], ENCODINGS[enc])]
    return out, rs, write_manifest(out, parts, ENCODINGS[enc], K)


@pytest.mark.parametrize("enc", ["q8", "f32"])
def test_write_then_stream_back(tmp_path, enc):
    out, rs, _ = make_cache(tmp_path, enc)
    cache = open_cache(out)
    got = list(cache.iter_rows())
    assert [g.example_id for g in got] == [r.example_id for r in rs]
    for g, r in zip(got, rs):
        assert g.response_start == r.response_start and list(g.input_ids) == r.input_ids
        for dec, true in ((g.ref["full"], r.ref["full"]), (g.ref["post"], r.ref["post"])):
            if enc == "f32":
                assert np.array_equal(dec, true)
            else:
                assert_within_q8_bound(dec, true)
    assert [len(b) for b in cache.iter_batches(2)] == [2, 2, 1]


def test_part_writes_are_deterministic(tmp_path):
    a = write_part(tmp_path / "a.parquet", rows(), Q8)
    b = write_part(tmp_path / "b.parquet", rows(), Q8)
    assert a.sha256 == b.sha256 and a.bytes == b.bytes and a.rows_sha256 == b.rows_sha256


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(format="pact-cache/9"), "format is 'pact-cache/9'"),
    (lambda m: m["parts"][0].update(name="../evil.parquet"), "must be a plain .parquet file name"),
    (lambda m: m["parts"][0].update(name="/etc/passwd"), "must be a plain .parquet file name"),
    (lambda m: m["parts"][1].update(name="part-00000.parquet"), "listed twice"),
    (lambda m: m["counts"].update(rows=99), "counts.rows is 99 but the parts hold 5"),
    (lambda m: m.update(encoding={"name": "pickle"}), "name 'pickle' is unknown"),
    (lambda m: m["parts"][0].update(sha256="zz"), "sha256 must be 64 lowercase hex"),
])
def test_manifest_rules_are_enforced(tmp_path, edit, needle):
    out, _, _ = make_cache(tmp_path)
    edit_manifest(out, edit, resign=False)
    with pytest.raises(CacheError, match=needle):
        list(open_cache(out).iter_rows())


def test_corrupt_truncated_and_missing_parts(tmp_path):
    out, _, _ = make_cache(tmp_path)
    p = out / "part-00001.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="part-00001.parquet: sha256 differs"):
        list(open_cache(out).iter_rows())
    p.write_bytes(bytes(data[:100]))
    with pytest.raises(CacheError, match="size is 100 bytes"):
        list(open_cache(out).iter_rows())
    p.unlink()
    with pytest.raises(CacheError, match="part-00001.parquet: part listed in the manifest is missing"):
        list(open_cache(out).iter_rows())


def test_blob_of_wrong_length_is_refused(tmp_path):
    out, rs, _ = make_cache(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pact_cache.storage import sha256_path

    part = out / "part-00000.parquet"  # a consistent manifest over a part whose blobs are too short
    t = pq.read_table(part)
    t = t.set_column(t.schema.get_field_index("full_q"), "full_q", pa.array([b"\x00" * 3] * 3, pa.binary()))
    pq.write_table(t, part)
    edit_manifest(out, lambda m: m["parts"][0].update(bytes=part.stat().st_size, sha256=sha256_path(part)), resign=True)
    with pytest.raises(CacheError, match=r"row 0: full_q has 3 bytes, expected 16"):
        list(open_cache(out).iter_rows())


def test_missing_manifest_and_folder(tmp_path):
    with pytest.raises(CacheError, match="no such cache folder"):
        open_cache(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(CacheError, match="has no manifest.json"):
        open_cache(tmp_path / "half")


def test_identity_hash_is_stable_and_typed():
    a = hash_identity("k", {"x": 1, "y": [1, 2], "z": "a"})
    assert a == hash_identity("k", {"z": "a", "y": [1, 2], "x": 1})
    assert a != hash_identity("k", {"x": 1.0, "y": [1, 2], "z": "a"})  # type-tagged
    assert a != hash_identity("k", {"x": "1", "y": [1, 2], "z": "a"})
    assert a != hash_identity("other", {"x": 1, "y": [1, 2], "z": "a"})
    assert hash_identity("k", {"x": None}) != hash_identity("k", {"x": "null"})
    assert math.isclose(q8_bound(np.float64(0.0), Q8), math.expm1(0.5 / Q8.scale) * (1 + 2**-10) + 2**-10)


@pytest.mark.parametrize("enc", ["q8", "f32"])
def test_writer_stores_minus_infinity_finitely_and_refuses_nan(tmp_path, enc):
    rs = rows(2, 4)
    rs[0].ref["full"][0, 1] = -np.inf  # a token the reference masks out
    rs[1].ref["target"][0] = -np.inf
    out = tmp_path / "c"
    out.mkdir()
    write_manifest(out, [write_part(out / "part-00000.parquet", rs, ENCODINGS[enc])], ENCODINGS[enc], 4)
    got = list(open_cache(out).iter_rows())
    low = got[0].ref["full"][0, 1]  # f32: the stored -1e4; q8: the floor, 40 nats below the step's maximum
    assert np.isfinite(got[0].ref["full"]).all()
    assert low == -1e4 if enc == "f32" else low <= got[0].ref["full"][0].max() - Q8.floor + 1
    assert np.isfinite(got[1].ref["target"]).all() and got[1].ref["target"][0] < -255
    rs[1].ref["post"][0, 0] = np.nan
    with pytest.raises(CacheError, match=r"part-00001.parquet: the reference gave a log-prob that is NaN or positive \(post view"):
        write_part(out / "part-00001.parquet", rs, ENCODINGS[enc])
    assert not (out / "part-00001.parquet").exists()


def test_row_groups_are_bounded_by_steps():
    from pact_cache.format import row_groups

    assert row_groups([3, 3, 3, 3], limit=6) == [(0, 2), (2, 4)]
    assert row_groups([10, 1, 1], limit=6) == [(0, 1), (1, 3)]  # a long row is a group of its own
    assert row_groups([1] * 5, limit=100) == [(0, 5)]
    assert row_groups([], limit=6) == [(0, 0)]


def test_a_part_with_many_row_groups_reads_back_the_same(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import pact_cache.format as fmt

    monkeypatch.setattr(fmt, "ROW_GROUP_STEPS", 9)
    out = tmp_path / "c"
    out.mkdir()
    rs = rows(7, 4)  # 4..10 steps per row
    part = write_part(out / "part-00000.parquet", rs, Q8)
    assert pq.ParquetFile(out / "part-00000.parquet").metadata.num_row_groups == 6
    write_manifest(out, [part], Q8, 4)
    got = list(open_cache(out).iter_rows())
    assert [g.example_id for g in got] == [r.example_id for r in rs]
    for g, r in zip(got, rs):
        assert_within_q8_bound(g.ref["full"], r.ref["full"])
