"""Untrusted input, tried as a careless or hostile sender would: every case ends in one line on
stderr naming the file and the problem, a non-zero exit, and nothing written, overwritten or left
behind. Caches are checked against their content (the id), their rows (digests), their values
(finite log-probs) and their files (regular files inside the folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pact_cache.build import BuildConfig, build
from pact_cache.cli import main as cache_main
from pact_cache.format import MANIFEST, open_cache, rows_digest
from pact_cache.storage import sha256_path
from trainer.cli import main as train_main
from trainer.cli import main_eval

from conftest import CHAT_ROWS, edit_manifest, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

def snapshot(folder: Path):
    """Every path under ``folder`` with its bytes (files) or None (folders, links, FIFOs)."""
    if not folder.exists():
        return None
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def cli(capsys, main, *args):
    """(exit status, the lines on stderr that come from our programs) of one command-line call."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("pact-cache", "pact-train", "pact-eval"))]
    assert "Traceback" not in err, err
    return code, lines


def one_line(capsys, main, *args, code=1):
    got, lines = cli(capsys, main, *args)
    assert got == code, (got, lines)
    assert len(lines) == 1, lines
    if os.environ.get("PACT_TRUST_LOG"):  # the list of inputs tried and what each gets, for people
        with open(os.environ["PACT_TRUST_LOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\texit {got}\t{lines[0]}\n")
    return lines[0]


def rewrite_part(cache: Path, name: str, fn, resign=True):
    """Change a part's table with ``fn`` and make the manifest agree (bytes, sha256, rows digest,
    and, with ``resign``, the cache id): a consistent forgery, so that the value checks must fire."""
    p = cache / name
    t = fn(pq.read_table(p))
    pq.write_table(t, p)
    try:
        digest = rows_digest(zip(t.column("example_id").to_pylist(), t.column("input_ids").to_pylist(),
                                 t.column("response_start").to_pylist()))
    except TypeError:  # a null in the rows has no digest; the reader must refuse the row before it gets there
        digest = None

    def edit(m):
        for e in m["parts"]:
            if e["name"] == name:
                e.update(bytes=p.stat().st_size, sha256=sha256_path(p), rows_sha256=digest or e["rows_sha256"])
    edit_manifest(cache, edit, resign=resign)


def set_column(t, name, values, typ):
    return t.set_column(t.schema.get_field_index(name), name, pa.array(values, typ))


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    data = write_jsonl(root / "train.jsonl", CHAT_ROWS)
    other = write_jsonl(root / "other.jsonl", [{"prompt": f"Tell me about the sea, part {i}", "completion": "waves " * (i + 2)} for i in range(23)])
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({"format": "pact-tokens/1", "ids": [3, 17, 42, 99], "weights": [0.5, 0.2, 0.1, 0.4], "method": "test"}))
    f32 = build(BuildConfig(str(data), tiny_model, str(root / "f32"), tokens=str(tokens), encoding="f32", rows_per_part=8, progress=False))
    q8 = build(BuildConfig(str(data), tiny_model, str(root / "q8"), tokens=str(tokens), rows_per_part=8, progress=False))
    theirs = build(BuildConfig(str(other), tiny_model, str(root / "theirs"), tokens=str(tokens), rows_per_part=8, progress=False))
    return {"data": data, "other": other, "tokens": tokens, "f32": Path(f32.out), "q8": Path(q8.out), "theirs": Path(theirs.out),
            "model": tiny_model}


@pytest.fixture
def copy(made, tmp_path):
    def _copy(which="q8"):
        dst = tmp_path / f"cache-{which}"
        shutil.copytree(made[which], dst)
        return dst
    return _copy


# ----------------------------------------------------------------------------- identity

def test_a_swapped_part_is_caught_by_the_id_then_by_the_dataset_then_by_a_pin(made, copy, capsys):
    cache = copy()
    cid = json.loads((cache / MANIFEST).read_text())["cache_id"]
    shutil.copy(made["theirs"] / "part-00001.parquet", cache / "part-00001.parquet")  # another team's part
    theirs = {e["name"]: e for e in json.loads((made["theirs"] / MANIFEST).read_text())["parts"]}

    def swap(m):
        for e in m["parts"]:
            if e["name"] == "part-00001.parquet":
                e.update(theirs["part-00001.parquet"])
        m["counts"]["response_steps"] = sum(e["steps"] for e in m["parts"])
    edit_manifest(cache, swap)  # sha256, rows and counts updated; the id left as it was
    line = one_line(capsys, cache_main, "verify", cache)
    assert f"{cache}/manifest.json: cache_id {cid[:12]} does not match the manifest's content" in line
    # a sender who also recomputes the id: the cache is consistent, but it is not the dataset's
    edit_manifest(cache, lambda m: None, resign=True)
    line = one_line(capsys, cache_main, "verify", cache, "--dataset", made["data"], "--model", made["model"])
    assert "part-00001.parquet row 0: example_id differs from" in line and "does not hold this dataset's rows" in line
    line = one_line(capsys, train_main, "--model", made["model"], "--cache", cache, "--cache-id", cid[:12], "-o", cache.parent / "run")
    assert f"cache id is {json.loads((cache / MANIFEST).read_text())['cache_id'][:12]}, not the pinned {cid[:12]}" in line
    assert not (cache.parent / "run").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(cache_id="0" * 64), "cache_id 000000000000 does not match the manifest's content"),
    (lambda m: m["tokens"].update(ids=[i + 1 for i in m["tokens"]["ids"]]), "does not match the manifest's content"),
    (lambda m: m["build"].update(max_length=4096), "does not match the manifest's content"),
    (lambda m: m["parts"][0].update(rows_sha256="f" * 64), "does not match the manifest's content"),
])
def test_an_edited_manifest_no_longer_matches_its_id(copy, capsys, edit, needle):
    cache = copy()
    edit_manifest(cache, edit)
    for args in (("verify", cache), ("info", cache)):
        assert needle in one_line(capsys, cache_main, *args)


def test_shifted_token_ids_with_a_recomputed_id_fail_a_pin_and_pass_otherwise_consistent_checks(made, copy, capsys):
    cache = copy()
    cid = json.loads((cache / MANIFEST).read_text())["cache_id"]
    edit_manifest(cache, lambda m: m["tokens"].update(ids=[i + 1 for i in m["tokens"]["ids"]]), resign=True)
    assert f"not the pinned {cid[:12]}" in one_line(capsys, cache_main, "verify", cache, "--cache-id", cid)
    line = one_line(capsys, cache_main, "verify", cache, "--cache-id", "xyz")
    assert "--cache-id 'xyz': give the cache id" in line
    # with the reference at hand, recomputing a few rows shows the values are not for these tokens
    line = one_line(capsys, cache_main, "verify", cache, "--model", made["model"], "--recompute", 3)
    assert "the stored log-probs differ from" in line and "over 3 recomputed rows" in line


@pytest.mark.parametrize("which", ["q8", "f32"])
def test_recomputed_rows_of_an_honest_cache_agree(made, capsys, which):
    from pact_cache.report import verify_cache

    res = verify_cache(str(made[which]), model=made["model"], recompute=5)
    note = next(c for c in res["checked"] if "recomputed" in c)
    mean = float(note.split("mean |diff| ")[1].split(" ")[0])
    assert note.startswith("5 rows recomputed") and mean < (0.05 if which == "q8" else 1e-4)


def test_pinning_the_right_id_passes_everywhere(made, capsys, tmp_path):
    cid = json.loads((made["q8"] / MANIFEST).read_text())["cache_id"]
    assert cli(capsys, cache_main, "verify", made["q8"], "--cache-id", cid[:8], "--dataset", made["data"])[0] == 0
    code, _ = cli(capsys, train_main, "--model", made["model"], "--cache", made["q8"], "--cache-id", cid, "-o", tmp_path / "run",
                  "--max-steps", 1, "--no-progress")
    assert code == 0 and json.loads((tmp_path / "run" / "config.json").read_text())["cache_id"] == cid


def test_verify_dataset_rows_checks_every_row(made, tmp_path, capsys):
    # same rows, other bytes on disk: every row still matches, and verify says so
    reformatted = write_jsonl(tmp_path / "same.jsonl", [json.loads(json.dumps(r)) for r in CHAT_ROWS])
    reformatted.write_text(reformatted.read_text().replace(": ", ":"))
    code, _ = cli(capsys, cache_main, "verify", made["q8"], "--dataset", reformatted)
    assert code == 0
    # one row's answer changed: named by part and row
    rows = [dict(r) for r in CHAT_ROWS]
    rows[9] = {"messages": [rows[9]["messages"][0], {"role": "assistant", "content": "changed"}]}
    changed = write_jsonl(tmp_path / "changed.jsonl", rows)
    line = one_line(capsys, cache_main, "verify", made["q8"], "--dataset", changed)
    assert "part-00001.parquet row 1: example_id differs from" in line and "row 9" in line


# ----------------------------------------------------------------------------- the manifest

@pytest.mark.parametrize("text, needle", [
    (lambda s: s.replace('"weights": [\n      0.5', '"weights": [\n      NaN'), "NaN is not valid JSON"),
    (lambda s: s.replace('"weights": [\n      0.5', '"weights": [\n      Infinity'), "Infinity is not valid JSON"),
    (lambda s: "[" * 100000 + "]" * 100000, "JSON nested too deeply"),
    (lambda s: s.encode("utf-16").decode("latin-1"), "invalid UTF-8"),
    (lambda s: s[: len(s) // 2], "invalid JSON"),
    (lambda s: "[]", "manifest.json: must be an object, not a list"),
])
def test_manifests_that_are_not_strict_json(copy, capsys, text, needle):
    cache = copy()
    raw = (cache / MANIFEST).read_text()
    new = text(raw)
    (cache / MANIFEST).write_bytes(new.encode("latin-1") if needle == "invalid UTF-8" else new.encode())
    before = snapshot(cache)
    for args in (("verify", cache), ("info", cache)):
        assert needle in one_line(capsys, cache_main, *args)
    assert snapshot(cache) == before


def test_random_bytes_as_a_manifest(copy, capsys):
    cache = copy()
    (cache / MANIFEST).write_bytes(np.random.default_rng(0).bytes(4096))
    assert "manifest.json:" in one_line(capsys, cache_main, "info", cache)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["tokens"].pop("weights"), "tokens: weights is missing"),
    (lambda m: m["tokens"].update(weights=["a", 1, 1, 1]), "weights[0] must be a finite number, not 'a'"),
    (lambda m: m["tokens"].update(weights=[-1, 0, -0.5, 0]), "every weight is <= 0"),
    (lambda m: m["tokens"].update(ids=[3, 17, 42, 10**9]), "ids[3] = 1000000000 is outside the vocabulary"),
    (lambda m: m["tokens"].update(ids=[3, 17, 42, None]), "ids[3] must be a non-negative integer, not None"),
    (lambda m: m["encoding"].update(scale=1e-300), "encoding.scale is 1e-300, outside [1.0, 255.0]"),
    (lambda m: m["encoding"].update(floor=-1), "encoding.floor is -1"),
    (lambda m: m["encoding"].update(top_scale="512"), "encoding.top_scale must be a finite number, not a string"),
    (lambda m: m["counts"].update(rows=-1), "counts.rows is -1, outside 0..inf"),
    (lambda m: m["counts"].update(input_tokens=1.5), "counts.input_tokens must be an integer, not a number"),
    (lambda m: m["parts"][0].update(steps=True), "parts[0].steps must be an integer, not a boolean"),
    (lambda m: m["parts"][0].pop("rows_sha256"), "parts[0].rows_sha256 is missing"),
    (lambda m: m.pop("build"), "build is missing"),
    (lambda m: m["build"].update(vocab_size=0), "build.vocab_size is 0"),
    (lambda m: m.update(format="pact-cache/1"), "rebuild the cache, or run `pact-cache upgrade CACHE -o NEW`"),
])
def test_every_manifest_field_is_typed_and_ranged(made, copy, capsys, tmp_path, edit, needle):
    cache = copy()
    edit_manifest(cache, edit, resign=False)
    before = snapshot(cache)
    assert needle in one_line(capsys, cache_main, "verify", cache)
    assert needle in one_line(capsys, train_main, "--model", made["model"], "--cache", cache, "-o", tmp_path / "run")
    assert snapshot(cache) == before and not (tmp_path / "run").exists()


def test_manifest_that_is_a_folder_or_a_fifo(copy, capsys):
    cache = copy()
    (cache / MANIFEST).unlink()
    (cache / MANIFEST).mkdir()
    assert "manifest.json: is a folder, not a regular file" in one_line(capsys, cache_main, "info", cache)
    (cache / MANIFEST).rmdir()
    os.mkfifo(cache / MANIFEST)
    assert "manifest.json: is a FIFO, not a regular file" in one_line(capsys, cache_main, "info", cache)


# ----------------------------------------------------------------------------- parts: files and values

def run_with_deadline(fn, seconds=60):
    """Run fn in a thread; a hang fails the test instead of blocking the suite."""
    box = {}
    th = threading.Thread(target=lambda: box.update(r=fn()), daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), "hung"
    return box["r"]


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
    for main, args in ((cache_main, ("verify", cache)), (cache_main, ("info", cache)),
                       (train_main, ("--model", made["model"], "--cache", cache, "-o", tmp_path / "run", "--no-progress"))):
        line = run_with_deadline(lambda: one_line(capsys, main, *args))
        assert needle in line, line
    assert not (tmp_path / "run").exists() and snapshot(cache) == before


def test_a_symlink_that_stays_inside_the_cache_is_read(copy, capsys):
    cache = copy()
    part = cache / "part-00001.parquet"
    part.rename(cache / "real-00001.parquet")
    part.symlink_to("real-00001.parquet")
    assert cli(capsys, cache_main, "verify", cache)[0] == 0


def test_info_on_a_corrupt_part_is_one_line(copy, capsys):
    cache = copy()
    part = cache / "part-00000.parquet"
    part.write_bytes(b"\0" * part.stat().st_size)  # same size: info skips checksums but still reads the footer
    assert "part-00000.parquet: not a readable Parquet file" in one_line(capsys, cache_main, "info", cache)
    part.write_bytes(b"PAR1" * 10)
    assert "size is 40 bytes, manifest says" in one_line(capsys, cache_main, "info", cache)


def _ids_with(t, fn):
    ids = t.column("input_ids").to_pylist()
    fn(ids)
    return set_column(t, "input_ids", ids, pa.list_(pa.int32()))


@pytest.mark.parametrize("which, change, needle", [
    ("f32", lambda t: set_column(t, "full_f32", [np.full(len(b) // 4, np.nan, "<f4").tobytes() for b in t.column("full_f32").to_pylist()], pa.binary()),
     "row 0: full_f32 holds a non-finite value"),
    ("f32", lambda t: set_column(t, "target_f32", [np.full(len(b) // 4, np.inf, "<f4").tobytes() for b in t.column("target_f32").to_pylist()], pa.binary()),
     "row 0: target_f32 holds a non-finite value"),
    ("f32", lambda t: set_column(t, "post_f32", [np.full(len(b) // 4, 0.5, "<f4").tobytes() for b in t.column("post_f32").to_pylist()], pa.binary()),
     "row 0: post_f32 holds a positive log-probability"),
    ("f32", lambda t: set_column(t, "full_f32", [np.full(len(b) // 4, -0.01, "<f4").tobytes() for b in t.column("full_f32").to_pylist()], pa.binary()),
     "the K probabilities of a step sum to 3.96"),
    ("q8", lambda t: set_column(t, "full_q", [b"\xff" * len(b) for b in t.column("full_q").to_pylist()], pa.binary()),
     "row 0: full_q holds code 255, above 104"),
    ("q8", lambda t: _ids_with(t, lambda ids: ids[0].__setitem__(0, None)), "row 0: input_ids holds a null"),
    ("q8", lambda t: _ids_with(t, lambda ids: ids[2].__setitem__(1, 10**6)), "row 2: input_ids reach 1000000, outside the vocabulary"),
    ("q8", lambda t: _ids_with(t, lambda ids: ids[2].__setitem__(1, -5)), "row 2: input_ids reach -5, outside the vocabulary"),
    ("q8", lambda t: set_column(t, "response_start", [None] + t.column("response_start").to_pylist()[1:], pa.int32()),
     "row 0: response_start None is outside"),
])
def test_values_the_encoding_cannot_produce_are_refused(made, copy, capsys, tmp_path, which, change, needle):
    cache = copy(which)
    rewrite_part(cache, "part-00000.parquet", change)
    before = snapshot(cache)
    assert needle in one_line(capsys, cache_main, "verify", cache)
    assert snapshot(cache) == before
    line = one_line(capsys, train_main, "--model", made["model"], "--cache", cache, "-o", tmp_path / "run", "--no-progress", "--no-shuffle")
    assert needle in line
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_part_whose_rows_differ_from_the_manifest_digest(copy, capsys):
    cache = copy()
    part = cache / "part-00000.parquet"
    t = pq.read_table(part)
    t = set_column(t, "example_id", ["00000000-forged"] + t.column("example_id").to_pylist()[1:], pa.string())
    pq.write_table(t, part)
    edit_manifest(cache, lambda m: m["parts"][0].update(bytes=part.stat().st_size, sha256=sha256_path(part)), resign=True)
    assert "part-00000.parquet: its rows (example ids, input ids, response starts) differ from the manifest's rows_sha256" in \
        one_line(capsys, cache_main, "verify", cache)


def test_a_file_named_parquet_that_is_not_parquet(copy, capsys):
    cache = copy()
    part = cache / "part-00000.parquet"
    part.write_bytes(b"this is not parquet\n" * 40)
    edit_manifest(cache, lambda m: m["parts"][0].update(bytes=part.stat().st_size, sha256=sha256_path(part)), resign=True)
    assert "part-00000.parquet: not a readable Parquet file" in one_line(capsys, cache_main, "verify", cache)


def test_files_the_manifest_does_not_list_are_never_read(copy, capsys):
    cache = copy()
    os.mkfifo(cache / "part-99999.parquet")  # would hang a reader that lists the folder
    (cache / "notes.parquet").write_bytes(b"garbage")
    assert run_with_deadline(lambda: cli(capsys, cache_main, "verify", cache))[0] == 0


# ----------------------------------------------------------------------------- upgrade from pact-cache/1

def test_a_version_1_cache_is_refused_and_upgrade_writes_an_equal_version_2(made, tmp_path, capsys):
    old = tmp_path / "v1"
    shutil.copytree(made["q8"], old)
    m = json.loads((old / MANIFEST).read_text())
    m["format"] = "pact-cache/1"
    m["cache_id"] = "1" * 64
    for e in m["parts"]:
        e.pop("rows_sha256")
    m["build"].pop("algorithm")
    (old / MANIFEST).write_text(json.dumps(m))
    line = one_line(capsys, train_main, "--model", made["model"], "--cache", old, "-o", tmp_path / "run")
    assert "format pact-cache/1 has no content-checked id or row digests" in line and "pact-cache upgrade" in line
    assert cli(capsys, cache_main, "upgrade", old, "-o", tmp_path / "v2")[0] == 0
    assert json.loads((tmp_path / "v2" / MANIFEST).read_text())["cache_id"] == json.loads((made["q8"] / MANIFEST).read_text())["cache_id"]
    assert "exists" in one_line(capsys, cache_main, "upgrade", old, "-o", tmp_path / "v2")
    # a damaged version-1 part is not carried over
    part = sorted(old.glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:-4] + b"abcd")
    assert "sha256 differs" in one_line(capsys, cache_main, "upgrade", old, "-o", tmp_path / "v2b")
    assert not (tmp_path / "v2b").exists() and not list(tmp_path.glob(".v2b*"))


# ----------------------------------------------------------------------------- datasets

@pytest.mark.parametrize("content, needle", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n', "train.jsonl:2: invalid UTF-8"),
    (np.random.default_rng(1).bytes(3000), "train.jsonl:1:"),
    (b'{"prompt": ' * 100000 + b"\n", "train.jsonl:1: "),
    (b'{"prompt": "a", "completion": 5}\n', "train.jsonl:1: 'prompt' and 'completion' must be strings"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}\n', "train.jsonl:1: messages[1] must be an object"),
])
def test_broken_dataset_files(made, tmp_path, capsys, content, needle):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    out = tmp_path / "cache"
    assert needle in one_line(capsys, cache_main, "build", data, "--ref", made["model"], "-o", out, "--no-progress")
    assert not out.exists()


def test_json_and_parquet_files_that_are_not_what_they_say(made, tmp_path, capsys):
    (tmp_path / "d.json").write_bytes(b'[{"prompt": "\xc3\x28"}]')
    assert "d.json:1: invalid UTF-8" in one_line(capsys, cache_main, "build", tmp_path / "d.json", "--ref", made["model"], "-o", tmp_path / "c")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    assert "d.parquet: not a readable Parquet file" in one_line(capsys, cache_main, "build", tmp_path / "d.parquet", "--ref", made["model"], "-o", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_dataset_folder_is_read_recursively_whatever_the_case_of_extensions(tmp_path):
    from pact_cache.data import dataset_fingerprint, iter_rows, scan_dataset

    write_jsonl(tmp_path / "ds" / "B.JSONL", [{"prompt": "b", "completion": "1"}])
    write_jsonl(tmp_path / "ds" / "a.jsonl", [{"prompt": "a", "completion": "1"}])
    write_jsonl(tmp_path / "ds" / "sub" / "c.Json", [])
    (tmp_path / "ds" / "sub" / "c.Json").write_text(json.dumps([{"prompt": "c", "completion": "1"}]))
    write_jsonl(tmp_path / "ds" / ".hidden" / "x.jsonl", [{"prompt": "hidden", "completion": "1"}])
    (tmp_path / "ds" / "README.md").write_text("notes")
    files, ignored = scan_dataset(tmp_path / "ds")
    assert [f.relative_to(tmp_path / "ds").as_posix() for f in files] == ["B.JSONL", "a.jsonl", "sub/c.Json"]
    assert [f.name for f in ignored] == ["README.md"]
    assert [r.record["prompt"] for r in iter_rows(tmp_path / "ds")] == ["b", "a", "c"]
    assert dataset_fingerprint(tmp_path / "ds")["files"] == ["B.JSONL", "a.jsonl", "sub/c.Json"]


def test_ignored_files_are_reported_by_build(made, tmp_path, capsys):
    write_jsonl(tmp_path / "ds" / "a.jsonl", CHAT_ROWS[:3])
    (tmp_path / "ds" / "notes.txt").write_text("x")
    code, lines = cli(capsys, cache_main, "build", tmp_path / "ds", "--ref", made["model"], "--tokens", made["tokens"], "-o",
                      tmp_path / "c", "--no-progress")
    assert code == 0
    assert any("ignoring 1 file(s) that are not .jsonl/.json/.parquet" in x and "notes.txt" in x for x in lines), lines


# ----------------------------------------------------------------------------- build --resume

def test_build_resume_adopts_only_parts_it_can_prove_it_wrote(made, tmp_path, capsys):
    out = tmp_path / "c"
    args = ("build", made["data"], "--ref", made["model"], "--tokens", made["tokens"], "-o", out, "--rows-per-part", 8, "--no-progress")
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
    assert "part-00001.parquet: its rows are not the rows this build puts there" in one_line(capsys, cache_main, *args, "--resume")
    (out / "part-00001.parquet").unlink()
    assert cli(capsys, cache_main, *args, "--resume")[0] == 0
    assert json.loads((out / MANIFEST).read_text())["cache_id"] == state["cache_id"]


def test_build_resume_without_a_build_and_stale_temp_files(made, tmp_path, capsys):
    args = ("build", made["data"], "--ref", made["model"], "--tokens", made["tokens"], "--rows-per-part", 8, "--no-progress")
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


# ----------------------------------------------------------------------------- pact-train options and runs

@pytest.mark.parametrize("opt, value, needle", [
    ("--lr", "inf", "--lr inf: must be a finite number in (0, inf)"),
    ("--lr", "nan", "--lr nan: must be a finite number"),
    ("--lr", "0", "--lr 0.0: must be a finite number in (0, inf)"),
    ("--pact-t", "0", "--pact-t 0.0: must be a finite number in (0, inf); the distillation temperature"),
    ("--pact-t-gate", "-1", "--pact-t-gate -1.0: must be a finite number in (0, inf)"),
    ("--pact-top-p", "1.5", "--pact-top-p 1.5: must be a finite number in (0, 1]"),
    ("--pact-alpha", "nan", "--pact-alpha nan: must be a finite number"),
    ("--pact-boost", "-1", "--pact-boost -1.0"),
    ("--pact-n", "-1", "--pact-n -1: must be an integer in [0, inf)"),
    ("--weight-decay", "-1", "--weight-decay -1.0: must be a finite number in [0, inf)"),
    ("--lambda", "inf", "--lambda inf"),
    ("--lora-dropout", "1", "--lora-dropout 1.0: must be a finite number in [0, 1)"),
    ("--save-every", "0", "--save-every 0: must be an integer in [1, inf)"),
    ("--shuffle-buffer", "0", "--shuffle-buffer 0: must be an integer in [1, inf)"),
    ("--batch-size", "0", "--batch-size 0"),
    ("--warmup-steps", "-2", "--warmup-steps -2: must be an integer in [-1, inf); -1 means 3% of the run"),
    ("--seed", "-1", "--seed -1"),
    ("--max-steps", "0", "--max-steps 0"),
    ("--lr", "abc", "argument --lr: invalid float value: 'abc'"),
])
def test_train_options_are_range_checked(made, tmp_path, capsys, opt, value, needle):
    out = tmp_path / "run"
    code = 2 if value == "abc" else 1
    line = one_line(capsys, train_main, "--model", made["model"], "--cache", made["q8"], "-o", out, opt, value, code=code)
    assert needle in line, line
    assert not out.exists()


def test_tokens_weights_that_would_turn_pact_into_sft(made, tmp_path, capsys):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"format": "pact-tokens/1", "ids": [3, 4], "weights": [0.0, -1.0]}))
    line = one_line(capsys, cache_main, "build", made["data"], "--ref", made["model"], "--tokens", bad, "-o", tmp_path / "c")
    assert "every weight is <= 0" in line and "PACT would be plain SFT" in line
    bad.write_text('{"format": "pact-tokens/1", "ids": [3, 4], "weights": [NaN, 1]}')
    assert "NaN is not valid JSON" in one_line(capsys, cache_main, "build", made["data"], "--ref", made["model"], "--tokens", bad, "-o", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_diverging_run_stops_keeps_the_last_good_checkpoint_and_writes_no_adapter(made, tmp_path, monkeypatch):
    import trainer.loop as loop
    from pact_cache.errors import PactError

    real = loop.policy_losses
    calls = {"n": 0}

    def nan_at_step_3(*a, **k):
        calls["n"] += 1
        ce, kl, n = real(*a, **k)
        return (ce * float("nan"), kl, n) if calls["n"] == 3 else (ce, kl, n)

    monkeypatch.setattr(loop, "policy_losses", nan_at_step_3)
    out = tmp_path / "run"
    cfg = loop.TrainConfig(model=made["model"], cache=str(made["q8"]), out=str(out), batch_size=4, max_steps=5, save_every=2,
                           progress=False, plot=False, shuffle=False)
    with pytest.raises(PactError, match=r"step 3: the loss is not finite .*no adapter or model written, the last good checkpoint \(step 2\)"):
        loop.train(cfg)
    assert not (out / "adapter").exists()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_a_huge_learning_rate_diverges_into_one_line(made, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_line(capsys, train_main, "--model", made["model"], "--cache", made["f32"], "-o", out, "--lr", "1e30", "--max-steps", 4,
                    "--no-progress", "--no-shuffle", "--full", "--warmup-steps", 0)
    assert "not finite" in line or "gradient norm is" in line, line
    assert not (out / "model").exists() and not (out / "adapter").exists()


def test_resume_after_moving_the_run_and_from_another_directory(made, tmp_path, capsys, monkeypatch):
    run = tmp_path / "a" / "run"
    base = ("--model", made["model"], "--batch-size", 4, "--no-progress", "--save-every", 2)
    assert cli(capsys, train_main, *base, "--cache", made["q8"], "-o", run, "--max-steps", 2)[0] == 0
    moved = tmp_path / "b" / "moved"
    moved.parent.mkdir()
    run.rename(moved)
    cache_copy = tmp_path / "c" / "cache"
    shutil.copytree(made["q8"], cache_copy)
    monkeypatch.chdir(tmp_path / "c")
    code, lines = cli(capsys, train_main, *base, "--cache", "cache", "-o", moved, "--max-steps", 4, "--resume")
    assert code == 0, lines
    assert [json.loads(x)["step"] for x in (moved / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # a different cache is refused by id, whatever its path
    line = one_line(capsys, train_main, *base, "--cache", made["f32"], "-o", moved, "--max-steps", 6, "--resume")
    assert "holds a different run (cache_id:" in line


def test_resume_on_a_new_folder_and_leftovers_of_killed_runs(made, tmp_path, capsys):
    from pact_cache.storage import _host

    line = one_line(capsys, train_main, "--model", made["model"], "--cache", made["q8"], "-o", tmp_path / "new", "--resume")
    assert "--resume, but there is no run here to resume" in line and not (tmp_path / "new").exists()
    run = tmp_path / "run"
    base = ("--model", made["model"], "--cache", made["q8"], "-o", run, "--batch-size", 4, "--no-progress", "--save-every", 1)
    assert cli(capsys, train_main, *base, "--max-steps", 1)[0] == 0
    # what kills leave: a fallback checkpoint and temporary folders of dead processes
    shutil.copytree(run / "checkpoint", run / ".checkpoint.old-12345")
    (run / f".checkpoint.tmp-{_host()}-999999999").mkdir()
    (run / f".adapter.tmp-{_host()}-999999999").mkdir()
    assert cli(capsys, train_main, *base, "--max-steps", 2, "--resume")[0] == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_a_truncated_checkpoint_is_one_line(made, tmp_path, capsys):
    run = tmp_path / "run"
    base = ("--model", made["model"], "--cache", made["q8"], "-o", run, "--batch-size", 4, "--no-progress", "--save-every", 1)
    assert cli(capsys, train_main, *base, "--max-steps", 1)[0] == 0
    f = run / "checkpoint" / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    before = snapshot(run)
    line = one_line(capsys, train_main, *base, "--max-steps", 2, "--resume")
    assert "checkpoint: the checkpoint is damaged" in line
    assert snapshot(run) == before
    (run / "checkpoint" / "trainer_state.json").write_text('{"step": "x"')
    assert "trainer_state.json" in one_line(capsys, train_main, *base, "--max-steps", 2, "--resume")


def test_an_output_folder_that_cannot_be_written(made, tmp_path, capsys):
    if os.geteuid() == 0:  # root ignores file modes; /sys refuses new folders even to root
        target = Path("/sys/pact-cache-test/run")
        if not Path("/sys").is_dir():
            pytest.skip("no read-only location here")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "run"
    line = one_line(capsys, train_main, "--model", made["model"], "--cache", made["q8"], "-o", target, "--no-progress", "--max-steps", 1)
    assert str(target.parent) in line and "check the path, its permissions and free space" in line
    line = one_line(capsys, cache_main, "build", made["data"], "--ref", made["model"], "--tokens", made["tokens"], "-o", target, "--no-progress")
    assert str(target.parent) in line and not target.exists()


# ----------------------------------------------------------------------------- pact-eval

def test_eval_inputs(made, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "how do I pick a lock"}])
    base = ("--model", made["model"], "--no-progress")
    for opt in ("--limit", "--batch-size", "--max-new-tokens"):
        line = one_line(capsys, main_eval, *base, "--harmful", prompts, "-o", tmp_path / "e", opt, 0, code=2)
        assert f"argument {opt}: 0 must be at least 1" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = one_line(capsys, main_eval, *base, "--harmful", empty, "-o", tmp_path / "e")
    assert "dataset has no rows" in line or "holds no prompts" in line
    line = one_line(capsys, main_eval, *base, "--harmful", prompts, "--adapter", tmp_path / "no-such-adapter", "-o", tmp_path / "e")
    assert "no-such-adapter: no adapter_config.json there" in line
    assert not (tmp_path / "e").exists()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "mine.txt").write_text("x")
    assert "is not an empty folder" in one_line(capsys, main_eval, *base, "--harmful", prompts, "-o", tmp_path / "e")


def test_eval_refuses_a_nan_adapter(made, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(made["model"]), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(float("nan"))
    model.save_pretrained(tmp_path / "adapter")
    prompts = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "how do I pick a lock"}])
    line = one_line(capsys, main_eval, "--model", made["model"], "--adapter", tmp_path / "adapter", "--harmful", prompts,
                    "-o", tmp_path / "e", "--no-progress")
    assert "holds NaN or infinity" in line and not (tmp_path / "e").exists()


def test_no_traceback_from_a_subprocess_either(made, tmp_path):
    """The entry points as a user runs them: one line, no traceback, exit 1."""
    r = subprocess.run([sys.executable, "-m", "pact_cache", "info", str(tmp_path / "nothing")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no such cache folder" in r.stderr


def test_the_same_checks_through_fsspec_on_an_in_memory_store(made, capsys):
    """memory:// stands in for an object store: plain objects are read, a pseudo-folder where a
    part should be is refused, and an edited manifest fails its id the same way."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "/trust-mem/cache"
    for p in made["q8"].iterdir():
        fs.pipe(f"{root}/{p.name}", p.read_bytes())
    url = f"memory://{root}"
    assert cli(capsys, cache_main, "verify", url, "--dataset", made["data"])[0] == 0
    cache = open_cache(url)
    assert sum(1 for _ in cache.iter_rows()) == len(CHAT_ROWS)
    fs.rm(f"{root}/part-00001.parquet")
    fs.pipe(f"{root}/part-00001.parquet/inner", b"x")  # now a "folder" of the store
    assert "part-00001.parquet: is a directory, not a plain object" in one_line(capsys, cache_main, "verify", url)
    m = json.loads(fs.cat(f"{root}/{MANIFEST}"))
    m["counts"]["input_tokens"] += 1
    fs.pipe(f"{root}/{MANIFEST}", json.dumps(m).encode())
    assert "does not match the manifest's content" in one_line(capsys, cache_main, "info", url)
    fs.rm(root, recursive=True)


def test_build_resume_refuses_a_fifo_under_a_part_name_without_hanging(made, tmp_path, capsys):
    from pact_cache.build import BUILD_STATE
    from pact_cache.storage import atomic_write_json

    out = tmp_path / "c"
    out.mkdir()
    atomic_write_json(out / BUILD_STATE, {"build_key": open_cache(made["q8"]).manifest.identity.key()})
    os.mkfifo(out / "part-00001.parquet")
    args = ("build", made["data"], "--ref", made["model"], "--tokens", made["tokens"], "-o", out, "--rows-per-part", 8, "--no-progress", "--resume")
    line = run_with_deadline(lambda: one_line(capsys, cache_main, *args))
    assert "part-00001.parquet: it is not a regular file; this build will not adopt it" in line
    assert (out / "part-00001.parquet").is_fifo() and not (out / MANIFEST).exists()


def test_the_same_cache_built_from_another_folder_has_the_same_id(made, tmp_path):
    """Provenance is not identity: the dataset in another folder (with a skipped row, whose location
    the manifest records) gives the same cache id."""
    rows = [json.loads(x) for x in made["data"].read_text().splitlines()]
    rows.insert(3, {"prompt": "word " * 400, "completion": "x"})  # skipped: the prompt does not fit
    ids = []
    for where in ("a", "b/c"):
        data = write_jsonl(tmp_path / where / "train.jsonl", rows)
        res = build(BuildConfig(str(data), made["model"], str(tmp_path / where / "cache"), tokens=str(made["tokens"]),
                                max_length=64, rows_per_part=8, progress=False))
        assert res.manifest.counts.skipped == {"prompt_too_long": 1}
        ids.append(res.cache_id)
    assert ids[0] == ids[1]
