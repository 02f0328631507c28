"""The part writer and the streaming reader (pact_cache/format.py): round trips, row groups, open
views for common tools, and every rule the reader enforces on parts that come from elsewhere."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import edit_manifest, random_cache, random_rows, row_result, write_manifest
from hostile import _ids_with, cli, one_line, rewrite_part, run_with_deadline, set_column, snapshot
from pact_train.cli import main as train_main

from pact_cache.cli import main as cache_main
from pact_cache.columns import q8_bound
from pact_cache.errors import CacheError
from pact_cache.format import ENCODINGS, open_cache, write_part
from pact_cache.storage import sha256_path

Q8 = ENCODINGS["q8"]


def assert_within_q8_bound(dec, v):
    d = v.max(1, keepdims=True) - v
    inside = d <= Q8.floor
    assert (np.abs(dec - v)[inside] <= q8_bound(d[inside], Q8) + 1e-5).all()
    assert (dec[~inside] >= v[~inside] - q8_bound(np.float32(Q8.floor), Q8)).all()


@pytest.mark.parametrize("enc", ["q8", "f32"])
def test_write_then_stream_back(tmp_path, enc):
    out, rs, _ = random_cache(tmp_path, enc)
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
    a = write_part(tmp_path / "a.parquet", random_rows(), Q8)
    b = write_part(tmp_path / "b.parquet", random_rows(), Q8)
    assert a.sha256 == b.sha256 and a.bytes == b.bytes and a.rows_sha256 == b.rows_sha256


def test_corrupt_truncated_and_missing_parts(tmp_path):
    out, _, _ = random_cache(tmp_path)
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
    out, rs, _ = random_cache(tmp_path)
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


@pytest.mark.parametrize("enc", ["q8", "f32"])
def test_writer_stores_minus_infinity_finitely_and_refuses_nan(tmp_path, enc):
    rs = random_rows(2, 4)
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
    with pytest.raises(
        CacheError,
        match=r"part-00001.parquet: the reference gave a log-prob that is NaN or positive "
        r"\(post view",
    ):
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
    rs = random_rows(7, 4)  # 4..10 steps per row
    part = write_part(out / "part-00000.parquet", rs, Q8)
    assert pq.ParquetFile(out / "part-00000.parquet").metadata.num_row_groups == 6
    write_manifest(out, [part], Q8, 4)
    got = list(open_cache(out).iter_rows())
    assert [g.example_id for g in got] == [r.example_id for r in rs]
    for g, r in zip(got, rs):
        assert_within_q8_bound(g.ref["full"], r.ref["full"])


@pytest.fixture(params=["q8", "f32"])
def cache(tmp_path, request):
    rng = np.random.default_rng(0)
    K, enc = 5, ENCODINGS[request.param]
    rows = []
    for i in range(11):
        n = 1 + i % 4
        lp = lambda: (-(np.log(K) + 0.1 + rng.random((n, K)))).astype(np.float32)  # noqa: E731
        rows.append(row_result(f"{i:08d}-ab", list(range(3, 8 + n)), 5, lp(), lp(), -rng.random(n).astype(np.float32)))
    out = tmp_path / "c"
    out.mkdir()
    parts = [
        write_part(out / "part-00000.parquet", rows[:6], enc),
        write_part(out / "part-00001.parquet", rows[6:], enc),
    ]
    write_manifest(out, parts, enc, K)
    return open_cache(out)


def test_decoded_arrow_and_polars_views_equal_the_rows(cache):
    rows = list(cache.iter_rows())
    t = cache.to_arrow()
    assert t.schema.field("full_logprobs").type.value_type.list_size == cache.K
    assert t.column("example_id").to_pylist() == [r.example_id for r in rows]
    for i, r in enumerate(rows):
        assert t.column("input_ids")[i].as_py() == r.input_ids.tolist()
        assert np.array_equal(np.array(t.column("full_logprobs")[i].as_py(), dtype=np.float32), r.ref["full"])
        assert np.array_equal(np.array(t.column("post_logprobs")[i].as_py(), dtype=np.float32), r.ref["post"])
        assert np.array_equal(np.array(t.column("target_logprob")[i].as_py(), dtype=np.float32), r.ref["target"])
    assert [b.num_rows for b in cache.iter_arrow_batches(batch_rows=4)] == [4, 4, 3]
    df = cache.to_polars()
    assert df.shape == (11, 6)
    import polars as pl

    steps = df.select(pl.col("target_logprob").list.len().sum()).item()
    assert steps == cache.num_steps


def test_raw_parts_load_in_datasets_polars_and_duckdb(cache):
    files = [str(cache.location.local_path(p.name)) for p in cache.parts]
    want_ids = [r.example_id for r in cache.iter_rows()]
    want_inputs = [r.input_ids.tolist() for r in cache.iter_rows()]
    import datasets

    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds["example_id"] == want_ids and ds["input_ids"] == want_inputs
    import polars as pl

    df = pl.read_parquet(files)
    assert df["example_id"].to_list() == want_ids and df["input_ids"].to_list() == want_inputs
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"select example_id, input_ids from read_parquet({files!r}) order by example_id").fetchall()
    assert [g[0] for g in got] == sorted(want_ids)  # the ids are zero-padded row numbers: sorted is cache order
    assert [list(g[1]) for g in got] == want_inputs


@pytest.mark.parametrize("kind", ["fifo", "symlink-out", "folder"])
def test_parts_must_be_regular_files_inside_the_cache(made, copy, capsys, tmp_path, kind):
    cache = copy()
    part = cache / "part-00001.parquet"
    outside = tmp_path / "elsewhere.parquet"
    shutil.copy(part, outside)
    part.unlink()
    if kind == "fifo":
        os.mkfifo(part)
        needle = "part-00001.parquet: is a FIFO, not a regular file"
    elif kind == "symlink-out":
        part.symlink_to(outside)  # same bytes as the real part, but outside the folder
        needle = "part-00001.parquet: is a link that points outside the cache folder"
    else:
        part.mkdir()
        needle = "part-00001.parquet: is a folder, not a regular file"
    before = snapshot(cache)
    for main, args in (
        (cache_main, ("verify", cache)),
        (cache_main, ("info", cache)),
        (
            train_main,
            ("--method", "pact", "--model", made["model"], "--cache", cache, "-o", tmp_path / "run", "--no-progress"),
        ),
    ):
        line = run_with_deadline(lambda: one_line(capsys, main, *args))
        assert needle in line, line
    assert not (tmp_path / "run").exists() and snapshot(cache) == before


def test_a_symlink_that_stays_inside_the_cache_is_read(copy, capsys):
    cache = copy()
    part = cache / "part-00001.parquet"
    part.rename(cache / "real-00001.parquet")
    part.symlink_to("real-00001.parquet")
    assert cli(capsys, cache_main, "verify", cache)[0] == 0


@pytest.mark.parametrize(
    "which, change, needle",
    [
        (
            "f32",
            lambda t: set_column(
                t,
                "full_f32",
                [np.full(len(b) // 4, np.nan, "<f4").tobytes() for b in t.column("full_f32").to_pylist()],
                pa.binary(),
            ),
            "row 0: full_f32 holds a non-finite value",
        ),
        (
            "f32",
            lambda t: set_column(
                t,
                "target_f32",
                [np.full(len(b) // 4, np.inf, "<f4").tobytes() for b in t.column("target_f32").to_pylist()],
                pa.binary(),
            ),
            "row 0: target_f32 holds a non-finite value",
        ),
        (
            "f32",
            lambda t: set_column(
                t,
                "post_f32",
                [np.full(len(b) // 4, 0.5, "<f4").tobytes() for b in t.column("post_f32").to_pylist()],
                pa.binary(),
            ),
            "row 0: post_f32 holds a positive log-probability",
        ),
        (
            "f32",
            lambda t: set_column(
                t,
                "full_f32",
                [np.full(len(b) // 4, -0.01, "<f4").tobytes() for b in t.column("full_f32").to_pylist()],
                pa.binary(),
            ),
            "the K probabilities of a step sum to 3.96",
        ),
        (
            "q8",
            lambda t: set_column(t, "full_q", [b"\xff" * len(b) for b in t.column("full_q").to_pylist()], pa.binary()),
            "row 0: full_q holds code 255, above 104",
        ),
        ("q8", lambda t: _ids_with(t, lambda ids: ids[0].__setitem__(0, None)), "row 0: input_ids holds a null"),
        (
            "q8",
            lambda t: _ids_with(t, lambda ids: ids[2].__setitem__(1, 10**6)),
            "row 2: input_ids reach 1000000, outside the vocabulary",
        ),
        (
            "q8",
            lambda t: _ids_with(t, lambda ids: ids[2].__setitem__(1, -5)),
            "row 2: input_ids reach -5, outside the vocabulary",
        ),
        (
            "q8",
            lambda t: set_column(t, "response_start", [None] + t.column("response_start").to_pylist()[1:], pa.int32()),
            "row 0: response_start None is outside",
        ),
    ],
)
def test_values_the_encoding_cannot_produce_are_refused(made, copy, capsys, tmp_path, which, change, needle):
    cache = copy(which)
    rewrite_part(cache, "part-00000.parquet", change)
    before = snapshot(cache)
    assert needle in one_line(capsys, cache_main, "verify", cache)
    assert snapshot(cache) == before
    line = one_line(
        capsys,
        train_main,
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        cache,
        "-o",
        tmp_path / "run",
        "--no-progress",
        "--no-shuffle",
    )
    assert needle in line
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("which, column", [("q8", "full_q"), ("f32", "target_f32"), ("q8", "example_id")])
def test_a_decompression_bomb_is_refused_before_it_is_decompressed(made, copy, capsys, tmp_path, which, column):
    """One value of a part inflated to 64 MiB of zeros (zstd keeps the file small), resealed (sizes,
    sha256 and id agree): refused from what the footer declares, with the column named, by verify,
    by pact-train and by a reader (tools/bench_hostile.py measures the memory)."""
    cache = copy(which)
    typ = pa.string() if column == "example_id" else pa.binary()
    big = ("x" * (64 << 20)) if column == "example_id" else b"\0" * (64 << 20)
    rewrite_part(
        cache, "part-00000.parquet", lambda t: set_column(t, column, [big] + t.column(column).to_pylist()[1:], typ)
    )
    assert (cache / "part-00000.parquet").stat().st_size < 8 << 20  # snappy here; zstd makes it KBs
    needle = f"column {column!r} declares"
    assert needle in one_line(capsys, cache_main, "verify", cache)
    args = (
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        cache,
        "-o",
        tmp_path / "run",
        "--no-progress",
        "--max-steps",
        1,
    )
    assert needle in one_line(capsys, train_main, *args)
    assert not (tmp_path / "run").exists()  # refused before OUT is made: the same command works once the cache is good
    with pytest.raises(CacheError, match="refused before decompressing"):
        next(open_cache(cache).iter_rows())
    shutil.rmtree(cache)
    shutil.copytree(made[which], cache)
    assert train_main([str(a) for a in args]) == 0


def test_a_part_whose_rows_differ_from_the_manifest_digest(copy, capsys):
    cache = copy()
    part = cache / "part-00000.parquet"
    t = pq.read_table(part)
    t = set_column(t, "example_id", ["00000000-forged"] + t.column("example_id").to_pylist()[1:], pa.string())
    pq.write_table(t, part)
    edit_manifest(
        cache, lambda m: m["parts"][0].update(bytes=part.stat().st_size, sha256=sha256_path(part)), resign=True
    )
    assert (
        "part-00000.parquet: its rows (example ids, input ids, response starts) differ from the manifest's rows_sha256"
        in one_line(capsys, cache_main, "verify", cache)
    )


def test_a_file_named_parquet_that_is_not_parquet(copy, capsys):
    cache = copy()
    part = cache / "part-00000.parquet"
    part.write_bytes(b"this is not parquet\n" * 40)
    edit_manifest(
        cache, lambda m: m["parts"][0].update(bytes=part.stat().st_size, sha256=sha256_path(part)), resign=True
    )
    assert "part-00000.parquet: not a readable Parquet file" in one_line(capsys, cache_main, "verify", cache)


def test_files_the_manifest_does_not_list_are_never_read(copy, capsys):
    cache = copy()
    os.mkfifo(cache / "part-99999.parquet")  # would hang a reader that lists the folder
    (cache / "notes.parquet").write_bytes(b"garbage")
    assert run_with_deadline(lambda: cli(capsys, cache_main, "verify", cache))[0] == 0
