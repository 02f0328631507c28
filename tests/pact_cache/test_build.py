"""pact-cache build (pact_cache/build.py): exact values, atomic and resumable, sharded, incremental, --reuse."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHAT_ROWS, ROOT, free_port, naive_reference, tokens_file, write_jsonl
from hostile import cli, one_line, only_line, program_lines, run_cli, run_with_deadline

import pact_cache.projection as projection_mod
from pact_cache.build import BuildConfig, build
from pact_cache.cli import main as cache_main
from pact_cache.columns import q8_bound
from pact_cache.data import assistant_header_ids, tokenize_dataset
from pact_cache.errors import PactError
from pact_cache.format import ENCODINGS, MANIFEST, open_cache
from pact_cache.models import load_model, load_tokenizer, resolve_model


def snapshot(folder: Path):
    return (
        {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        if folder.exists()
        else None
    )


def cli_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    return env


def build_cmd(model, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "pact_cache",
        "build",
        str(data),
        "--ref",
        str(model),
        "--tokens",
        str(extra[0]),
        "-o",
        str(out),
        "--rows-per-part",
        "4",
        "--batch-size",
        "2",
        "--no-progress",
        *map(str, extra[1:]),
    ]


@pytest.fixture
def long_dataset(tmp_path):
    rows = [
        {"prompt": f"Write a long story number {i} about the sea", "completion": "the sea and the wind " * (20 + i % 5)}
        for i in range(40)
    ]
    return write_jsonl(tmp_path / "long.jsonl", rows)


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory):
    from conftest import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("wide") / "model", hidden=128, layers=4))


def test_f32_build_equals_naive_recompute_and_q8_within_bound(tiny_model, chat_dataset, tmp_path, monkeypatch):
    ids = [3, 17, 42, 99, 150, 201, 333]
    tokens = tokens_file(tmp_path, ids)
    monkeypatch.setattr(projection_mod, "LOGITS_CHUNK_BYTES", 4 * 400 * 5)  # force many chunks of 5 positions
    exact = build(
        BuildConfig(
            str(chat_dataset),
            tiny_model,
            str(tmp_path / "f32"),
            tokens=str(tokens),
            encoding="f32",
            batch_size=3,
            rows_per_part=10,
            progress=False,
        )
    )
    q8 = build(
        BuildConfig(
            str(chat_dataset),
            tiny_model,
            str(tmp_path / "q8"),
            tokens=str(tokens),
            batch_size=3,
            rows_per_part=10,
            progress=False,
        )
    )
    assert exact.manifest.counts.rows == len(CHAT_ROWS) and len(exact.manifest.parts) == 3
    want = naive_reference(tiny_model, chat_dataset, ids)
    got_f32 = list(open_cache(tmp_path / "f32").iter_rows())
    got_q8 = list(open_cache(tmp_path / "q8").iter_rows())
    assert [g.example_id for g in got_f32] == [w[0] for w in want] == [g.example_id for g in got_q8]
    enc = ENCODINGS["q8"]
    for g, q, (_, full, post, target) in zip(got_f32, got_q8, want):
        np.testing.assert_allclose(g.ref["full"], full, atol=2e-5)
        np.testing.assert_allclose(g.ref["post"], post, atol=2e-5)
        np.testing.assert_allclose(g.ref["target"], target, atol=2e-5)
        for dec, true in ((q.ref["full"], full), (q.ref["post"], post)):
            d = true.max(1, keepdims=True) - true
            assert (d <= enc.floor).all()
            assert (np.abs(dec - true) <= q8_bound(d, enc) + 1e-4).all()
        assert np.abs(q.ref["target"] - target).max() <= 2**-9 + 1e-4
    assert exact.cache_id != q8.cache_id


@pytest.mark.parametrize(
    "rows, needle",
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "train.jsonl:2: invalid JSON"),
        ('{"prompt": "a"}\n', "train.jsonl:1: row has 'prompt' but no answer"),
        ('{"prompt": "a", "completion": ""}\n', "train.jsonl:1: empty response"),
        (
            '{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}\n',
            "must be the assistant's answer",
        ),
        (
            '{"prompt": "' + "word " * 200 + '", "completion": "b"}\n',
            "all 1 rows were skipped (prompt does not fit --max-length 32)",
        ),
    ],
)
def test_bad_datasets_one_line_nothing_written(tiny_model, tmp_path, capsys, rows, needle):
    data = tmp_path / "train.jsonl"
    data.write_text(rows)
    out = tmp_path / "cache"
    assert run_cli("build", data, "--ref", tiny_model, "-o", out, "--max-length", 32, "--no-progress") == 1
    line = only_line(capsys)
    assert needle in line, line
    assert not out.exists()


def test_tokens_outside_vocabulary(tiny_model, chat_dataset, tmp_path, capsys):
    tokens = tokens_file(tmp_path, [5, 100000])
    assert (
        run_cli("build", chat_dataset, "--ref", tiny_model, "--tokens", tokens, "-o", tmp_path / "c", "--no-progress")
        == 1
    )
    assert "ids [100000] are outside the tokenizer's vocabulary" in only_line(capsys)
    assert not (tmp_path / "c").exists()


def test_unknown_model(chat_dataset, tmp_path, capsys):
    assert (
        run_cli("build", chat_dataset, "--ref", tmp_path / "no-such-model", "-o", tmp_path / "c", "--no-progress") == 1
    )
    assert "no such model folder" in only_line(capsys)
    assert run_cli("build", chat_dataset, "--ref", tmp_path, "-o", tmp_path / "c", "--no-progress") == 1
    assert "folder has no config.json" in only_line(capsys)


def test_existing_output_is_never_overwritten(tiny_model, chat_dataset, tmp_path, capsys):
    tokens = tokens_file(tmp_path, [3, 4, 5])
    out = tmp_path / "cache"
    assert run_cli("build", chat_dataset, "--ref", tiny_model, "--tokens", tokens, "-o", out, "--no-progress") == 0
    before = snapshot(out)
    # same build again: nothing to do
    assert run_cli("build", chat_dataset, "--ref", tiny_model, "--tokens", tokens, "-o", out, "--no-progress") == 0
    assert "already holds this cache" in capsys.readouterr().err
    # a different cache into the same folder: refused, untouched
    assert (
        run_cli(
            "build",
            chat_dataset,
            "--ref",
            tiny_model,
            "--tokens",
            tokens,
            "-o",
            out,
            "--max-length",
            200,
            "--no-progress",
        )
        == 1
    )
    assert "already holds a different cache" in only_line(capsys)
    assert snapshot(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run_cli("build", chat_dataset, "--ref", tiny_model, "--tokens", tokens, "-o", other, "--no-progress") == 1
    assert "is not a pact-cache build" in only_line(capsys)
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_default_tokens_when_none_given(tiny_model, chat_dataset, tmp_path):
    res = build(BuildConfig(str(chat_dataset), tiny_model, str(tmp_path / "c"), progress=False))
    tokens = res.manifest.tokens
    assert tokens.method == "pact-self-contrast" and 1 <= len(tokens.ids) <= 50
    assert tokens.params["refusals"].startswith("builtin") and tokens.params["benign"].startswith("builtin")


def test_sigkill_then_resume_is_byte_identical(wider_model, long_dataset, tmp_path, capsys):
    tokens = tokens_file(tmp_path, [3, 4, 5, 6])
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(build_cmd(wider_model, long_dataset, ref, tokens), env=cli_env(), check=True, capture_output=True)
    proc = subprocess.Popen(
        build_cmd(wider_model, long_dataset, out, tokens),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("part-*.parquet")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts_at_kill = len(list(out.glob("part-*.parquet")))
    assert 1 <= parts_at_kill < 10 and not (out / MANIFEST).exists(), "the build finished before it could be killed"
    # without --resume the half-built folder is refused, and left alone (in this process: refused before any load)
    before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    assert "pass --resume" in one_line(capsys, cache_main, *build_cmd(wider_model, long_dataset, out, tokens)[3:])
    assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == before
    subprocess.run(
        build_cmd(wider_model, long_dataset, out, tokens, "--resume"), env=cli_env(), check=True, capture_output=True
    )
    assert [p.name for p in sorted(out.glob("*"))] == [p.name for p in sorted(ref.glob("*"))]
    for p in sorted(ref.glob("part-*.parquet")):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert json.loads((out / MANIFEST).read_text())["parts"] == json.loads((ref / MANIFEST).read_text())["parts"]


@pytest.mark.multiprocess
def test_shards_and_torchrun_give_the_same_rows(tiny_model, long_dataset, tmp_path):
    tokens = tokens_file(tmp_path, [3, 4, 5, 6])
    single, sharded, tr = tmp_path / "single", tmp_path / "sharded", tmp_path / "torchrun"

    def in_process(out, shard=None):  # the library's build: a process start per build costs seconds
        build(
            BuildConfig(
                str(long_dataset),
                tiny_model,
                str(out),
                tokens=str(tokens),
                rows_per_part=4,
                batch_size=2,
                shard=shard,
                progress=False,
            )
        )

    in_process(single)
    in_process(sharded, (0, 3))
    in_process(sharded, (1, 3))
    subprocess.run(  # the last shard from the command line (--shard i/n), which publishes the whole cache
        build_cmd(tiny_model, long_dataset, sharded, tokens, "--shard", "2/3"),
        env=cli_env(),
        check=True,
        capture_output=True,
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "pact_cache",
    ] + build_cmd(tiny_model, long_dataset, tr, tokens)[3:]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    want = json.loads((single / MANIFEST).read_text())
    for other in (sharded, tr):
        got = json.loads((other / MANIFEST).read_text())
        assert got["cache_id"] == want["cache_id"] and got["parts"] == want["parts"]
    rows_single = [(r.example_id, r.ref["full"].tolist()) for r in open_cache(single).iter_rows()]
    assert rows_single == [(r.example_id, r.ref["full"].tolist()) for r in open_cache(tr).iter_rows()]


def test_no_batch_by_seq_by_vocab_float_tensor_is_ever_made(tiny_model, chat_dataset, monkeypatch):
    """Record every tensor the build's computation produces; none may reach B*L*V elements."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pact_cache.projection import compute_rows

    resolved = resolve_model(tiny_model)
    tok = load_tokenizer(resolved)
    model, _, _ = load_model(resolved, "fp32", "cpu")
    examples, _ = tokenize_dataset(chat_dataset, tok, None, progress=False)
    V = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(projection_mod, "LOGITS_CHUNK_BYTES", 4 * V * 16)  # at most 16 positions of logits at once

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.shape and t.shape[-1] == V:
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    batch = 8
    with Largest():
        compute_rows(model, examples, torch.tensor([3, 4]), assistant_header_ids(tok), batch, "cpu")
    B_L_V = batch * max(len(e.input_ids) for e in examples[:batch]) * V
    assert 0 < Largest.biggest <= 16 * V < B_L_V


def test_ignored_files_are_reported_by_build(made, tmp_path, capsys):
    write_jsonl(tmp_path / "ds" / "a.jsonl", CHAT_ROWS[:3])
    (tmp_path / "ds" / "notes.txt").write_text("x")
    code, lines = cli(
        capsys,
        cache_main,
        "build",
        tmp_path / "ds",
        "--ref",
        made["model"],
        "--tokens",
        made["tokens"],
        "-o",
        tmp_path / "c",
        "--no-progress",
    )
    assert code == 0
    assert any("ignoring 1 file(s) that are not .jsonl/.json/.parquet" in x and "notes.txt" in x for x in lines), lines


def test_build_resume_adopts_only_parts_it_can_prove_it_wrote(made, tmp_path, capsys):
    out = tmp_path / "c"
    args = (
        "build",
        made["data"],
        "--ref",
        made["model"],
        "--tokens",
        made["tokens"],
        "-o",
        out,
        "--rows-per-part",
        8,
        "--no-progress",
    )
    assert cli(capsys, cache_main, *args)[0] == 0
    state = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).unlink()  # as if killed before the manifest was published
    from pact_cache.build import BUILD_STATE
    from pact_cache.storage import atomic_write_json

    key = open_cache(made["q8"]).manifest.identity.key()
    atomic_write_json(out / BUILD_STATE, {"build_key": key})
    # a part from another build (another dataset) under the right name
    shutil.copy(made["theirs"] / "part-00001.parquet", out / "part-00001.parquet")
    before = snapshot(out)
    line = one_line(capsys, cache_main, *args, "--resume")
    assert "part-00001.parquet: it was written by a different build" in line and "Delete that file" in line
    assert snapshot(out) == before
    # a part of this build but with other rows: the footer key matches, the rows do not
    shutil.copy(made["q8"] / "part-00002.parquet", out / "part-00001.parquet")
    assert "part-00001.parquet: its rows are not the rows this build puts there" in one_line(
        capsys, cache_main, *args, "--resume"
    )
    (out / "part-00001.parquet").unlink()
    # a part whose writer recorded another sha256 than the file now has (changed after it was written)
    size = (out / "part-00000.parquet").stat().st_size
    atomic_write_json(out / ".part-00000.parquet.entry.json", {"build_key": key, "bytes": size, "sha256": "0" * 64})
    assert "part-00000.parquet: it changed after this build wrote it" in one_line(capsys, cache_main, *args, "--resume")
    (out / ".part-00000.parquet.entry.json").unlink()
    assert cli(capsys, cache_main, *args, "--resume")[0] == 0
    assert json.loads((out / MANIFEST).read_text())["cache_id"] == state["cache_id"]


def test_build_resume_without_a_build_and_stale_temp_files(made, tmp_path, capsys):
    args = (
        "build",
        made["data"],
        "--ref",
        made["model"],
        "--tokens",
        made["tokens"],
        "--rows-per-part",
        8,
        "--no-progress",
    )
    line = one_line(capsys, cache_main, *args, "-o", tmp_path / "new", "--resume")
    assert "--resume, but there is no build here to resume" in line and not (tmp_path / "new").exists()
    from pact_cache.storage import _host

    out = tmp_path / "c"
    out.mkdir()
    dead = out / f".part-00000.parquet.tmp-{_host()}-999999999"  # a killed writer's leftover
    dead.write_bytes(b"half")
    other_host = out / ".part-00001.parquet.tmp-otherhost-1"  # another machine's shard may still write it
    other_host.write_bytes(b"half")
    assert cli(capsys, cache_main, *args, "-o", out)[0] == 0
    assert not dead.exists() and other_host.exists()


def test_build_resume_refuses_a_fifo_under_a_part_name_without_hanging(made, tmp_path, capsys):
    from pact_cache.build import BUILD_STATE
    from pact_cache.storage import atomic_write_json

    out = tmp_path / "c"
    out.mkdir()
    atomic_write_json(out / BUILD_STATE, {"build_key": open_cache(made["q8"]).manifest.identity.key()})
    os.mkfifo(out / "part-00001.parquet")
    args = (
        "build",
        made["data"],
        "--ref",
        made["model"],
        "--tokens",
        made["tokens"],
        "-o",
        out,
        "--rows-per-part",
        8,
        "--no-progress",
        "--resume",
    )
    line = run_with_deadline(lambda: one_line(capsys, cache_main, *args))
    assert "part-00001.parquet: it is not a regular file; this build will not adopt it" in line
    assert (out / "part-00001.parquet").is_fifo() and not (out / MANIFEST).exists()


# ----------------------------------------------------------------------------- --reuse: old rows copied, not computed


def chat(i, answer):
    return {
        "messages": [
            {"role": "user", "content": f"Review {i}: is it positive or negative?"},
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("incr")
    old_rows = [chat(i, ("positive" if i % 2 else "negative") + " indeed" * (i % 5)) for i in range(16)]
    new_rows = (
        [chat(100, "positive"), chat(101, "negative sure")]
        + old_rows[:7]
        + [chat(7, "changed answer")]
        + old_rows[8:]
        + [chat(200 + i, "negative" + " really" * i) for i in range(5)]
    )
    tokens = root / "tokens.json"
    tokens.write_text(
        json.dumps({"format": "pact-tokens/1", "ids": [3, 17, 42, 99, 150], "weights": [1.0] * 5, "method": "test"})
    )
    return {
        "old": write_jsonl(root / "old.jsonl", old_rows),
        "new": write_jsonl(root / "new.jsonl", new_rows),
        "tokens": tokens,
        "root": root,
        "reusable": 15,
    }  # 16 old rows, one of them changed


@pytest.mark.parametrize("enc", ["f32", "q8"])
def test_reuse_equals_a_full_rebuild_row_for_row(tiny_model, sets, tmp_path, enc):
    def cfg(data, out, **kw):
        kw = {"batch_size": 3, **kw}
        return BuildConfig(
            str(data),
            tiny_model,
            str(tmp_path / out),
            tokens=str(sets["tokens"]),
            encoding=enc,
            rows_per_part=5,
            progress=False,
            **kw,
        )

    old = build(cfg(sets["old"], "old", batch_size=4))  # another batch size: rows are still interchangeable
    incr = build(cfg(sets["new"], "incr", reuse=[old.out]))
    full = build(cfg(sets["new"], "full"))
    assert incr.rows_reused == sets["reusable"] and incr.rows_computed == 23 - sets["reusable"]
    assert incr.manifest.build.reused == (old.cache_id,)
    old_rows = {tuple(r.input_ids): r for r in open_cache(old.out).iter_rows()}
    got, want = list(open_cache(incr.out).iter_rows()), list(open_cache(full.out).iter_rows())
    assert [r.example_id for r in got] == [r.example_id for r in want]
    copied = 0
    for g, w in zip(got, want):
        assert g.input_ids.tolist() == w.input_ids.tolist() and g.response_start == w.response_start
        src = old_rows.get(tuple(g.input_ids))
        if src is not None:  # copied bit for bit from the old cache
            copied += 1
            for a, b in (
                (g.ref["full"], src.ref["full"]),
                (g.ref["post"], src.ref["post"]),
                (g.ref["target"], src.ref["target"]),
            ):
                assert np.array_equal(a, b)
        for a, b in (
            (g.ref["full"], w.ref["full"]),
            (g.ref["post"], w.ref["post"]),
            (g.ref["target"], w.ref["target"]),
        ):
            if enc == "f32":
                np.testing.assert_allclose(a, b, atol=1e-4)
            else:  # at most one code apart where batch noise crosses a rounding boundary
                assert np.abs(a - b).max() <= 0.05
    assert copied == sets["reusable"]


def test_reuse_of_a_cache_built_otherwise_is_refused(tiny_model, sets, tmp_path, capsys):
    old = build(
        BuildConfig(str(sets["old"]), tiny_model, str(tmp_path / "old"), tokens=str(sets["tokens"]), progress=False)
    )
    other = tmp_path / "tokens2.json"
    other.write_text(json.dumps({"format": "pact-tokens/1", "ids": [3, 17], "weights": [1.0, 1.0], "method": "test"}))
    code = cache_main(
        [
            "build",
            str(sets["new"]),
            "--ref",
            tiny_model,
            "--tokens",
            str(other),
            "-o",
            str(tmp_path / "new"),
            "--reuse",
            str(old.out),
            "--no-progress",
        ]
    )
    err = program_lines(capsys.readouterr().err, ("pact-cache",))
    assert code == 1 and len(err) == 1 and "its rows are not this build's rows" in err[0]
    assert not (tmp_path / "new").exists()
    code = cache_main(
        [
            "build",
            str(sets["new"]),
            "--ref",
            tiny_model,
            "--tokens",
            str(sets["tokens"]),
            "-o",
            str(tmp_path / "new"),
            "--reuse",
            str(tmp_path / "nope"),
            "--no-progress",
        ]
    )
    assert code == 1 and "no such cache folder" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # through the command line, with the counts said
    assert (
        cache_main(
            [
                "build",
                str(sets["new"]),
                "--ref",
                tiny_model,
                "--tokens",
                str(sets["tokens"]),
                "-o",
                str(tmp_path / "new"),
                "--reuse",
                str(old.out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert f"{sets['reusable']} rows reused, {23 - sets['reusable']} computed" in capsys.readouterr().out
    assert json.loads((tmp_path / "new" / MANIFEST).read_text())["build"]["reused"] == [old.cache_id]


def test_a_4bit_reference_is_part_of_the_caches_identity(tiny_model, chat_dataset, tmp_path, capsys):
    """build --quantize nf4: another cache id than the same weights in 16/32 bits (and the 32-bit cache's id
    is what it was: no quantization key in its manifest); verify recomputes with a 4-bit load and refuses a
    16-bit one; --reuse does not mix the two; diff shows how far the 4-bit values are."""
    pytest.importorskip("bitsandbytes")
    from pact_cache.combine import diff_caches
    from pact_cache.report import verify_cache

    tokens = tokens_file(tmp_path, [3, 17, 42, 99])
    full = build(BuildConfig(str(chat_dataset), tiny_model, str(tmp_path / "fp32"), tokens=str(tokens), progress=False))
    nf4 = build(
        BuildConfig(
            str(chat_dataset), tiny_model, str(tmp_path / "nf4"), tokens=str(tokens), quantize="nf4", progress=False
        )
    )
    assert full.cache_id != nf4.cache_id
    assert nf4.manifest.build.quantization == "nf4" and full.manifest.build.quantization is None
    assert "quantization" not in json.loads((tmp_path / "fp32" / MANIFEST).read_text())["build"]
    assert json.loads((tmp_path / "nf4" / MANIFEST).read_text())["build"]["quantization"] == "nf4"
    assert open_cache(str(tmp_path / "nf4")).manifest.build.quantization == "nf4"  # parsed back
    capsys.readouterr()
    assert cache_main(["info", str(tmp_path / "nf4")]) == 0 and "(loaded in nf4)" in capsys.readouterr().out
    from pact_cache.card import card_text

    assert "loaded in nf4" in card_text(open_cache(str(tmp_path / "nf4")).manifest)
    d = diff_caches(str(tmp_path / "fp32"), str(tmp_path / "nf4"))
    assert d["identity_differs"] == ["build parameters"] and d["rows"]["changed"] > 0
    assert 0 < d["mean_abs_diff"]["full_logprobs"] < 1.0  # nats: what quantizing this reference cost (docs/caches.md)

    res = verify_cache(str(tmp_path / "nf4"), model=tiny_model)
    assert any("rows recomputed" in c for c in res["checked"])
    with pytest.raises(PactError, match="not --quantize none.*verify with --quantize nf4"):
        verify_cache(str(tmp_path / "nf4"), model=tiny_model, quantize="none")
    capsys.readouterr()
    line = one_line(capsys, cache_main, "verify", tmp_path / "nf4", "--quantize", "nf4")
    assert "--quantize nf4: says how --model is loaded" in line
    line = one_line(capsys, cache_main, "verify", tmp_path / "fp32", "--model", tiny_model, "--quantize", "nf4")
    assert "loaded as stored, not --quantize nf4" in line
    line = one_line(
        capsys,
        cache_main,
        "build",
        chat_dataset,
        "--ref",
        tiny_model,
        "--tokens",
        tokens,
        "--quantize",
        "nf4",
        "--reuse",
        tmp_path / "fp32",
        "-o",
        tmp_path / "mixed",
        "--no-progress",
    )
    assert "--quantize, so its rows are not this build's rows" in line and not (tmp_path / "mixed").exists()


def test_build_dry_run_prints_the_estimate_and_writes_nothing(tiny_model, chat_dataset, tmp_path, capsys):
    assert cache_main(["build", str(chat_dataset), "--ref", tiny_model, "-o", str(tmp_path / "c"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "c").exists()
    assert "estimated peak" in out and "weights (fp32)" not in out and "weights" in out
