"""The typed manifest and the content id (pact_cache/manifest.py): every field typed and ranged,
strict JSON only, and an id that no edit, swap or forgery keeps."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from conftest import edit_manifest, random_cache, write_jsonl
from hostile import cli, one_line, snapshot
from pact_train.cli import main as train_main

from pact_cache.build import BuildConfig, build
from pact_cache.cli import main as cache_main
from pact_cache.columns import q8_bound
from pact_cache.errors import CacheError
from pact_cache.format import ENCODINGS, MANIFEST, open_cache
from pact_cache.typedjson import hash_identity

Q8 = ENCODINGS["q8"]


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.update(format="pact-cache/9"), "format is 'pact-cache/9'"),
        (lambda m: m["parts"][0].update(name="../evil.parquet"), "must be a plain .parquet file name"),
        (lambda m: m["parts"][0].update(name="/etc/passwd"), "must be a plain .parquet file name"),
        (lambda m: m["parts"][1].update(name="part-00000.parquet"), "listed twice"),
        (lambda m: m["counts"].update(rows=99), "counts.rows is 99 but the parts hold 5"),
        (lambda m: m.update(encoding={"name": "pickle"}), "name 'pickle' is unknown"),
        (lambda m: m["parts"][0].update(sha256="zz"), "sha256 must be 64 lowercase hex"),
    ],
)
def test_manifest_rules_are_enforced(tmp_path, edit, needle):
    out, _, _ = random_cache(tmp_path)
    edit_manifest(out, edit, resign=False)
    with pytest.raises(CacheError, match=needle):
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
    line = one_line(
        capsys,
        train_main,
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        cache,
        "--cache-id",
        cid[:12],
        "-o",
        cache.parent / "run",
    )
    assert (
        f"cache id is {json.loads((cache / MANIFEST).read_text())['cache_id'][:12]}, not the pinned {cid[:12]}" in line
    )
    assert not (cache.parent / "run").exists()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.update(cache_id="0" * 64), "cache_id 000000000000 does not match the manifest's content"),
        (
            lambda m: m["tokens"].update(ids=[i + 1 for i in m["tokens"]["ids"]]),
            "does not match the manifest's content",
        ),
        (lambda m: m["build"].update(max_length=4096), "does not match the manifest's content"),
        (lambda m: m["parts"][0].update(rows_sha256="f" * 64), "does not match the manifest's content"),
    ],
)
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


def test_pinning_the_right_id_passes_everywhere(made, capsys, tmp_path):
    cid = json.loads((made["q8"] / MANIFEST).read_text())["cache_id"]
    assert cli(capsys, cache_main, "verify", made["q8"], "--cache-id", cid[:8], "--dataset", made["data"])[0] == 0
    code, _ = cli(
        capsys,
        train_main,
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        made["q8"],
        "--cache-id",
        cid,
        "-o",
        tmp_path / "run",
        "--max-steps",
        1,
        "--no-progress",
    )
    assert code == 0 and json.loads((tmp_path / "run" / "config.json").read_text())["cache_id"] == cid


@pytest.mark.parametrize(
    "text, needle",
    [
        (lambda s: s.replace('"weights": [\n      0.5', '"weights": [\n      NaN'), "NaN is not valid JSON"),
        (lambda s: s.replace('"weights": [\n      0.5', '"weights": [\n      Infinity'), "Infinity is not valid JSON"),
        (lambda s: "[" * 100000 + "]" * 100000, "JSON nested too deeply"),
        (lambda s: s.encode("utf-16").decode("latin-1"), "invalid UTF-8"),
        (lambda s: s[: len(s) // 2], "invalid JSON"),
        (lambda s: "[]", "manifest.json: must be an object, not a list"),
    ],
)
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


@pytest.mark.parametrize(
    "edit, needle",
    [
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
        (lambda m: m["build"].update(quantization="fp3"), "build.quantization must be nf4 or int8"),
        (lambda m: m["build"].update(quantization=["nf4"] * 10**5), "build.quantization must be nf4 or int8"),
        (lambda m: m.update(format="pact-cache/1"), "rebuild the cache, or run `pact-cache upgrade CACHE -o NEW`"),
    ],
)
def test_every_manifest_field_is_typed_and_ranged(made, copy, capsys, tmp_path, edit, needle):
    cache = copy()
    edit_manifest(cache, edit, resign=False)
    before = snapshot(cache)
    assert needle in one_line(capsys, cache_main, "verify", cache)
    assert needle in one_line(
        capsys, train_main, "--method", "pact", "--model", made["model"], "--cache", cache, "-o", tmp_path / "run"
    )
    assert snapshot(cache) == before and not (tmp_path / "run").exists()


def test_manifest_that_is_a_folder_or_a_fifo(copy, capsys):
    cache = copy()
    (cache / MANIFEST).unlink()
    (cache / MANIFEST).mkdir()
    assert "manifest.json: is a folder, not a regular file" in one_line(capsys, cache_main, "info", cache)
    (cache / MANIFEST).rmdir()
    os.mkfifo(cache / MANIFEST)
    assert "manifest.json: is a FIFO, not a regular file" in one_line(capsys, cache_main, "info", cache)


def test_the_same_cache_built_from_another_folder_has_the_same_id(made, tmp_path):
    """Provenance is not identity: the dataset in another folder (with a skipped row, whose location
    the manifest records) gives the same cache id."""
    rows = [json.loads(x) for x in made["data"].read_text().splitlines()]
    rows.insert(3, {"prompt": "word " * 400, "completion": "x"})  # skipped: the prompt does not fit
    ids = []
    for where in ("a", "b/c"):
        data = write_jsonl(tmp_path / where / "train.jsonl", rows)
        res = build(
            BuildConfig(
                str(data),
                made["model"],
                str(tmp_path / where / "cache"),
                tokens=str(made["tokens"]),
                max_length=64,
                rows_per_part=8,
                progress=False,
            )
        )
        assert res.manifest.counts.skipped == {"prompt_too_long": 1}
        ids.append(res.cache_id)
    assert ids[0] == ids[1]
