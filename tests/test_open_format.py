"""The format is open: raw parts load in common tools, and decoded views spare everyone the q8 decoding."""

import numpy as np
import pytest

from pact_cache.format import ENCODINGS, open_cache, write_part

from conftest import row_result, write_manifest


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
    parts = [write_part(out / "part-00000.parquet", rows[:6], enc), write_part(out / "part-00001.parquet", rows[6:], enc)]
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
