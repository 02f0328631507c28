"""Caches on an object store: a real S3-compatible server (moto's ThreadedMotoServer) started on
localhost by this module and stopped by it, spoken to through s3fs exactly as a bucket would be."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CHAT_ROWS, ROOT, write_jsonl
from pact_train.cli import main as train_main

from pact_cache.build import BuildConfig, build
from pact_cache.cli import main as cache_main
from pact_cache.format import MANIFEST, open_cache
from pact_cache.storage import Location

pytest.importorskip("s3fs")


moto_server = pytest.importorskip("moto.server")


BUCKET = "pact-test"


CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server on 127.0.0.1 (a free port) with one bucket; yields the storage options."""
    old = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"endpoint_url": f"http://{host}:{port}"}
    import s3fs

    s3fs.S3FileSystem(**opts).mkdir(BUCKET)
    yield opts
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def opt_args(opts):
    return [a for k, v in opts.items() for a in ("--storage-option", f"{k}={v}")]


def fs(opts):
    import s3fs

    return s3fs.S3FileSystem(**opts)


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    rows = write_jsonl(root / "train.jsonl", CHAT_ROWS)
    tokens = root / "tokens.json"
    tokens.write_text(
        json.dumps(
            {"format": "pact-tokens/1", "ids": [3, 17, 42, 99], "weights": [0.5, 0.2, 0.1, 0.4], "method": "test"}
        )
    )
    local = build(
        BuildConfig(str(rows), tiny_model, str(root / "local"), tokens=str(tokens), rows_per_part=6, progress=False)
    )
    return {"rows": rows, "tokens": tokens, "local": Path(local.out), "model": tiny_model, "root": root}


def build_args(data, out, *extra):
    return [
        "build",
        data["rows"],
        "--ref",
        data["model"],
        "--tokens",
        data["tokens"],
        "-o",
        out,
        "--rows-per-part",
        6,
        "--no-progress",
        *extra,
    ]


def test_build_info_verify_and_cp_both_ways(s3, data, tmp_path, capsys):
    url = f"s3://{BUCKET}/built"
    assert cache_main([str(a) for a in build_args(data, url, *opt_args(s3))]) == 0
    want = json.loads((data["local"] / MANIFEST).read_text())
    got = json.loads(fs(s3).cat(f"{BUCKET}/built/{MANIFEST}"))
    assert got["cache_id"] == want["cache_id"] and got["parts"] == want["parts"]  # same bytes as a local build
    assert sorted(p.rsplit("/", 1)[-1] for p in fs(s3).ls(f"{BUCKET}/built")) == sorted(
        [MANIFEST, "README.md"] + [p["name"] for p in want["parts"]]
    )  # the cache, its card, nothing else
    capsys.readouterr()
    assert cache_main(["info", url, "--json", *opt_args(s3)]) == 0
    assert json.loads(capsys.readouterr().out)["cache_id"] == want["cache_id"]
    assert (
        cache_main(["verify", url, "--dataset", str(data["rows"]), "--cache-id", want["cache_id"][:10], *opt_args(s3)])
        == 0
    )
    # down to a folder, and up again under another prefix
    assert cache_main(["cp", url, str(tmp_path / "down"), "--no-progress", *opt_args(s3)]) == 0
    assert open_cache(tmp_path / "down").cache_id == want["cache_id"]
    assert cache_main(["cp", str(data["local"]), f"s3://{BUCKET}/up", "--no-progress", *opt_args(s3)]) == 0
    assert open_cache(f"s3://{BUCKET}/up", storage_options=s3).cache_id == want["cache_id"]
    assert sum(1 for _ in open_cache(f"s3://{BUCKET}/up", storage_options=s3).iter_rows()) == len(CHAT_ROWS)
    # copying again is a no-op; onto a different cache it is refused
    capsys.readouterr()
    assert cache_main(["cp", str(data["local"]), f"s3://{BUCKET}/up", "--no-progress", *opt_args(s3)]) == 0
    assert "0 part(s) copied" in capsys.readouterr().out
    other = tmp_path / "other"
    shutil.copytree(data["local"], other)
    from conftest import edit_manifest

    edit_manifest(other, lambda m: m["counts"].update(input_tokens=m["counts"]["input_tokens"] + 1), resign=True)
    assert cache_main(["cp", str(other), f"s3://{BUCKET}/up", "--no-progress", *opt_args(s3)]) == 1
    assert "holds a different cache" in capsys.readouterr().err


def test_train_from_the_bucket_logs_what_training_from_the_folder_logs(s3, data, tmp_path, capsys):
    url = f"s3://{BUCKET}/train"
    assert cache_main(["cp", str(data["local"]), url, "--no-progress", *opt_args(s3)]) == 0
    base = [
        "--model",
        data["model"],
        "--method",
        "pact",
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--no-progress",
        "--seed",
        "1",
        "--lr",
        "1e-3",
    ]
    assert train_main(base + ["--cache", str(data["local"]), "-o", str(tmp_path / "a")]) == 0
    assert train_main(base + ["--cache", url, "-o", str(tmp_path / "b"), *opt_args(s3)]) == 0

    def metrics(d):
        return [
            {k: v for k, v in json.loads(line).items() if k != "step_time_s"}
            for line in (d / "metrics.jsonl").read_text().splitlines()
        ]

    assert metrics(tmp_path / "a") == metrics(tmp_path / "b") and len(metrics(tmp_path / "a")) == 3
    conf = (tmp_path / "b" / "config.json").read_text()
    assert "endpoint_url" not in conf and "storage_options" not in conf  # options (credentials) are never recorded


def test_tampered_objects_and_pins_are_refused(s3, data, capsys):
    url = f"s3://{BUCKET}/tamper"
    assert cache_main(["cp", str(data["local"]), url, "--no-progress", *opt_args(s3)]) == 0
    cid = json.loads((data["local"] / MANIFEST).read_text())["cache_id"]
    store = fs(s3)
    part = f"{BUCKET}/tamper/part-00001.parquet"
    good = store.cat(part)
    store.pipe(part, good[:-8] + b"tampered")
    capsys.readouterr()
    assert cache_main(["verify", url, *opt_args(s3)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part-00001.parquet: sha256 differs from the manifest" in err[0]
    store.pipe(part, good)
    m = json.loads(store.cat(f"{BUCKET}/tamper/{MANIFEST}"))
    m["tokens"]["ids"] = [i + 1 for i in m["tokens"]["ids"]]
    store.pipe(f"{BUCKET}/tamper/{MANIFEST}", json.dumps(m).encode())
    assert cache_main(["info", url, *opt_args(s3)]) == 1
    assert "does not match the manifest's content" in capsys.readouterr().err
    store.pipe(f"{BUCKET}/tamper/{MANIFEST}", (data["local"] / MANIFEST).read_bytes())
    assert cache_main(["verify", url, "--cache-id", "0123456789ab", *opt_args(s3)]) == 1
    assert f"cache id is {cid[:12]}, not the pinned 0123456789ab" in capsys.readouterr().err
    assert cache_main(["verify", url, "--cache-id", cid, *opt_args(s3)]) == 0


def cli_env(s3):
    return dict(os.environ, **CREDS, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def cmd(data, out, s3, *extra):
    return [sys.executable, "-m", "pact_cache", *map(str, build_args(data, out, *opt_args(s3), *extra))]


def test_a_killed_upload_resumes_to_the_same_cache(s3, data, tmp_path):
    url = f"s3://{BUCKET}/killed"
    store = fs(s3)
    slow = ("--batch-size", 1)  # one row per forward pass: the build lasts long enough to be killed mid-way
    ref = build(
        BuildConfig(
            str(data["rows"]),
            data["model"],
            str(tmp_path / "ref"),
            tokens=str(data["tokens"]),
            rows_per_part=6,
            batch_size=1,
            progress=False,
        )
    )
    # the killed build cannot remove its local scratch folder: it goes under tmp_path, not the system's temp folder
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(
        cmd(data, url, s3, *slow),
        env={**cli_env(s3), "TMPDIR": str(tmp_path / "tmp")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not store.exists(f"{BUCKET}/killed/part-00000.parquet"):
        store.invalidate_cache()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store.invalidate_cache()
    assert not store.exists(f"{BUCKET}/killed/{MANIFEST}"), "the build finished before it could be killed"
    r = subprocess.run(cmd(data, url, s3, *slow), env=cli_env(s3), capture_output=True, text=True)
    assert r.returncode == 1 and "pass --resume" in r.stderr
    r = subprocess.run(cmd(data, url, s3, *slow, "--resume"), env=cli_env(s3), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    store.invalidate_cache()
    got = json.loads(store.cat(f"{BUCKET}/killed/{MANIFEST}"))
    assert got["cache_id"] == ref.cache_id and got["parts"] == [p.to_json() for p in ref.manifest.parts]
    assert not [p for p in store.ls(f"{BUCKET}/killed") if p.rsplit("/", 1)[-1].startswith(".")]  # no state left behind


def test_two_machines_build_one_cache_in_one_bucket(s3, data):
    url = f"s3://{BUCKET}/sharded"
    procs = [
        subprocess.Popen(
            cmd(data, url, s3, "--shard", f"{i}/2"),
            env=cli_env(s3),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    got = json.loads(fs(s3).cat(f"{BUCKET}/sharded/{MANIFEST}"))
    want = json.loads((data["local"] / MANIFEST).read_text())
    assert got["cache_id"] == want["cache_id"] and got["parts"] == want["parts"]


def test_a_stopped_copy_resumes_and_keeps_what_is_there(s3, data, capsys):
    url = f"s3://{BUCKET}/resume-cp"
    assert cache_main(["cp", str(data["local"]), url, "--no-progress", *opt_args(s3)]) == 0
    store = fs(s3)
    # as if stopped before the manifest and the last part went up (the card, written just before the manifest, stays)
    store.rm(f"{BUCKET}/resume-cp/{MANIFEST}")
    store.rm(f"{BUCKET}/resume-cp/part-00003.parquet")
    store.pipe(
        f"{BUCKET}/resume-cp/.pact-copy.json", json.dumps({"cache_id": open_cache(data["local"]).cache_id}).encode()
    )
    capsys.readouterr()
    assert cache_main(["cp", str(data["local"]), url, "--no-progress", *opt_args(s3)]) == 0
    assert "1 part(s) copied" in capsys.readouterr().out
    assert open_cache(url, storage_options=s3).cache_id == open_cache(data["local"]).cache_id


def test_location_errors_are_one_line(capsys):
    assert cache_main(["info", "nosuchproto://x/y"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuchproto://x/y: cannot open this location" in err[0]
    with pytest.raises(Exception):
        Location("nosuchproto://x")


def test_memory_store_build_and_copy(data, tmp_path, capsys):
    """memory:// stands for any fsspec filesystem: build into it, read, copy out."""
    import fsspec

    url = "memory://pact-remote-test/cache"
    assert cache_main([str(a) for a in build_args(data, url)]) == 0
    mem = fsspec.filesystem("memory")
    assert MANIFEST in [p.rsplit("/", 1)[-1] for p in mem.ls("/pact-remote-test/cache", detail=False)]
    assert open_cache(url).cache_id == open_cache(data["local"]).cache_id
    assert cache_main(["cp", url, str(tmp_path / "out"), "--no-progress"]) == 0
    assert open_cache(tmp_path / "out").cache_id == open_cache(data["local"]).cache_id
    mem.rm("/pact-remote-test", recursive=True)


def test_store_mistakes_are_one_line_with_the_fix_and_no_secret(s3, tmp_path, monkeypatch, capsys):
    """The commonest object-store mistakes: one line that says what to set, exit 1, and no secret or URL password
    in the output. The credential mistakes and the unreachable store in a fresh process of each command (boto reads
    the environment once); the options' own checks, made before any connection, in this process."""
    host_port = s3["endpoint_url"].split("://")[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), PYTHONPATH=str(ROOT)
    )
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    ep = ["--storage-option", f"endpoint_url={s3['endpoint_url']}"]
    programs = {
        "pact-cache": (cache_main, "pact_cache", ["info", f"s3://{BUCKET}/nothing-here"]),
        "pact-train": (
            train_main,
            "pact_train",
            ["--model", "m", "--cache", f"s3://{BUCKET}/nothing-here", "-o", str(tmp_path / "r")],
        ),
    }
    fresh_process = [
        ({}, ep, "no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ({"AWS_ACCESS_KEY_ID": "testing"}, ep, "incomplete credentials for the object store"),
        (
            {},
            [
                "--storage-option",
                "endpoint_url=http://127.0.0.1:9",
                "--storage-option",
                "key=k",
                "--storage-option",
                "secret=sk-s3cr3t",
            ],
            "cannot reach the object store at http://127.0.0.1:9",
        ),
    ]
    for extra_env, opts, needle in fresh_process:
        for prog, (_, module, args) in programs.items():
            res = subprocess.run(
                [sys.executable, "-m", module, *args, *opts],
                env={**env, **extra_env},
                capture_output=True,
                text=True,
                timeout=120,
            )
            lines = [line for line in res.stderr.splitlines() if line.startswith(prog)]
            assert res.returncode == 1 and len(lines) == 1 and needle in lines[0], (prog, opts, res.stderr[-1500:])
            assert "s3cr3t" not in res.stderr + res.stdout and "Traceback" not in res.stderr
    option_checks = [
        (ep + ["--storage-option", "endpiont=1"], "unknown storage option 'endpiont'"),
        (ep + ["--storage-option", "client_kwargs=oops"], "--storage-option client_kwargs: must be a JSON object"),
        (["--storage-option", "endpoint_url=123"], "--storage-option endpoint_url=123: must be an http(s) URL"),
        (
            ["--storage-option", f"endpoint_url=http://alice:pw-s3cr3t@{host_port}"],
            "holds a user name or password",
        ),
    ]
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    for opts, needle in option_checks:
        for prog, (fn, _, args) in programs.items():
            assert fn([*args, *opts]) == 1
            err = capsys.readouterr()
            lines = [line for line in err.err.splitlines() if line.startswith(prog)]
            assert len(lines) == 1 and needle in lines[0], (prog, opts, err.err[-1500:])
            assert "s3cr3t" not in err.err + err.out and "Traceback" not in err.err
    assert not (tmp_path / "r").exists()
