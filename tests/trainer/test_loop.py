"""pact-train's loop (trainer/loop.py): cached = online, token-weighted accumulation, resume, divergence,
and every bad input as one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CHAT_ROWS, ROOT, edit_manifest, make_tiny_model, write_jsonl
from hostile import cli, one_line, program_lines
from pact_train.cli import main as train_main
from pact_train.loop import TrainConfig, train
from pact_train.losses import asft_penalty

from pact_cache.build import BuildConfig, build
from pact_cache.cli import main as cache_main
from pact_cache.direction import read_direction
from pact_cache.format import MANIFEST


@pytest.fixture(scope="module")
def caches(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_jsonl(root / "train.jsonl", CHAT_ROWS)
    tokens = root / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "format": "pact-tokens/1",
                "ids": [3, 17, 42, 99, 150, 201, 333],
                "weights": [0.5, 0.1, -0.2, 0.7, 0.3, 0.2, 0.4],
                "method": "test",
                "params": {},
            }
        )
    )
    f32 = build(
        BuildConfig(str(data), tiny_model, str(root / "f32"), tokens=str(tokens), encoding="f32", progress=False)
    )
    q8 = build(
        BuildConfig(str(data), tiny_model, str(root / "q8"), tokens=str(tokens), rows_per_part=8, progress=False)
    )
    return {"f32": str(f32.out), "q8": str(q8.out), "data": data, "tokens": tokens}


def cfg(model, cache, out, **kw):
    base = dict(
        recipe="plain", batch_size=4, max_steps=3, shuffle=False, progress=False, plot=False, lr=1e-3, lora_dropout=0.0
    )
    base.update(kw)
    return TrainConfig(model=model, cache=cache, out=str(out), **base)


def asft_cfg(model, cache, out, **kw):
    return cfg(model, cache, out, **{"max_steps": 4, "lr": 1e-2, "method": "asft", **kw})


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "method, metric",
    [("pact", "pact_kl"), ("pact-rest", "pact_rest_kl"), ("str", "str"), ("constrained-sft", "constrained_sft")],
)
def test_cached_loss_equals_online_reference(tiny_model, caches, tmp_path, method, metric):
    """The cache's columns against a live reference's, for each method that reads them (pact-rest's
    rest category comes from the stored log-probs of S on one side and from the live full
    distribution on the other)."""
    train(cfg(tiny_model, caches["f32"], tmp_path / "cache", reference="cache", method=method))
    train(cfg(tiny_model, caches["f32"], tmp_path / "online", reference="online", method=method))
    a, b = metrics(tmp_path / "cache"), metrics(tmp_path / "online")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert x["ce"] == pytest.approx(y["ce"], rel=1e-5)
        assert x[metric] == pytest.approx(y[metric], rel=1e-4, abs=1e-9)
        want = (
            x[metric] if method == "constrained-sft" else x["ce"] + x[metric]
        )  # lambda 1; constrained SFT replaces the CE
        assert x["loss"] == pytest.approx(want, rel=1e-6)
    assert a[-1][metric] > 1e-6  # after two updates the policy is off the reference, so every term is positive


def test_sft_has_no_term_and_metrics_fields(tiny_model, caches, tmp_path):
    train(cfg(tiny_model, caches["q8"], tmp_path / "sft", method="sft", plot=True))
    m = metrics(tmp_path / "sft")
    for r in m:
        assert {"step", "loss", "ce", "lr", "tokens", "grad_norm"} <= set(r) and "pact_kl" not in r
        assert r["loss"] == pytest.approx(r["ce"])
    assert [r["step"] for r in m] == [1, 2, 3]
    conf = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert conf["cache_id"] == json.loads((Path(caches["q8"]) / MANIFEST).read_text())["cache_id"]
    assert (tmp_path / "sft" / "loss.png").stat().st_size > 1000


def test_outputs_load_with_peft_and_transformers(tiny_model, caches, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(cfg(tiny_model, caches["q8"], tmp_path / "lora", merge=True))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "lora" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged")
    x = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        assert torch.allclose(peft_model(x).logits, merged(x).logits, atol=1e-4)
    train(cfg(tiny_model, caches["q8"], tmp_path / "full", full=True, lr=1e-4))
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    assert not torch.equal(
        full.model.layers[0].self_attn.q_proj.weight,
        AutoModelForCausalLM.from_pretrained(tiny_model).model.layers[0].self_attn.q_proj.weight,
    )


def test_grad_accumulation_is_token_weighted(tiny_model, caches, tmp_path):
    """Two micro-batches of 2 give the same first step as one batch of 4 (no dropout, same rows)."""
    train(cfg(tiny_model, caches["f32"], tmp_path / "b4", max_steps=2))
    train(cfg(tiny_model, caches["f32"], tmp_path / "b2x2", batch_size=2, grad_accum=2, max_steps=2))
    a, b = metrics(tmp_path / "b4"), metrics(tmp_path / "b2x2")
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


def run_cli(capsys, *args):
    """pact-train --method pact (the paper's PACT, no replay) with these arguments: the checks of a run, not the
    defaults."""
    code = train_main(["--method", "pact"] + [str(a) for a in args])
    return code, program_lines(capsys.readouterr().err, ("pact-train",))


def test_bad_inputs_one_line_nothing_overwritten(tiny_model, caches, tmp_path, capsys):
    other_model = str(make_tiny_model(tmp_path / "other_model", vocab=300))
    code, err = run_cli(capsys, "--model", other_model, "--cache", caches["q8"], "-o", tmp_path / "o1", "--no-progress")
    assert code == 1 and len(err) == 1 and "built with another tokenizer" in err[0]
    code, err = run_cli(capsys, "--model", tiny_model, "--cache", caches["q8"], "-o", tmp_path / "o2", "--lambda", "-1")
    assert code == 1 and "--lambda -1.0: must be a finite number in [0, inf)" in err[0]
    # a run folder is never taken over by a different run
    out = tmp_path / "run"
    assert (
        run_cli(capsys, "--model", tiny_model, "--cache", caches["q8"], "-o", out, "--max-steps", 1, "--no-progress")[0]
        == 0
    )
    before = (out / "metrics.jsonl").read_text()
    code, err = run_cli(
        capsys,
        "--model",
        tiny_model,
        "--cache",
        caches["q8"],
        "-o",
        out,
        "--max-steps",
        1,
        "--lr",
        "1e-3",
        "--no-progress",
    )
    assert code == 1 and "holds a different run (lr" in err[0]
    code, err = run_cli(
        capsys, "--model", tiny_model, "--cache", caches["q8"], "-o", out, "--max-steps", 1, "--no-progress"
    )
    assert code == 1 and "pass --resume" in err[0]
    assert (out / "metrics.jsonl").read_text() == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    code, err = run_cli(capsys, "--model", tiny_model, "--cache", caches["q8"], "-o", busy, "--no-progress")
    assert code == 1 and "holds no pact-train run" in err[0]


def copy_cache(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_missing_and_empty_caches(tiny_model, caches, tmp_path, capsys):
    bad = copy_cache(caches["q8"], tmp_path / "bad")
    part = sorted(bad.glob("part-*.parquet"))[-1]
    part.write_bytes(part.read_bytes()[:-5] + b"xxxxx")
    code, err = run_cli(capsys, "--model", tiny_model, "--cache", bad, "-o", tmp_path / "o", "--no-progress")
    assert code == 1 and f"{part.name}: sha256 differs" in err[0]
    part.unlink()
    code, err = run_cli(capsys, "--model", tiny_model, "--cache", bad, "-o", tmp_path / "o", "--no-progress")
    assert code == 1 and "part listed in the manifest is missing" in err[0]
    empty = copy_cache(caches["q8"], tmp_path / "empty")
    edit_manifest(empty, lambda m: m.update(parts=[], counts=dict(m["counts"], rows=0, response_steps=0)), resign=True)
    code, err = run_cli(capsys, "--model", tiny_model, "--cache", empty, "-o", tmp_path / "o", "--no-progress")
    assert code == 1 and "holds no rows" in err[0]
    assert not (tmp_path / "o").exists()


def test_sigkill_then_resume_logs_the_samemetrics(caches, tmp_path_factory, tmp_path):
    model = str(make_tiny_model(tmp_path_factory.mktemp("wide_train") / "model", hidden=128, layers=4))
    data = write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS * 6)
    cache = build(
        BuildConfig(
            str(data), model, str(tmp_path / "cache"), tokens=str(caches["tokens"]), rows_per_part=16, progress=False
        )
    )
    args = [
        sys.executable,
        "-m",
        "pact_train",
        "--model",
        model,
        "--cache",
        str(cache.out),
        "--method",
        "pact",
        "--batch-size",
        "4",
        "--max-steps",
        "24",
        "--save-every",
        "3",
        "--lr",
        "1e-3",
        "--no-progress",
        "--seed",
        "3",
    ]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run(args + ["-o", str(tmp_path / "ref")], env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["-o", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len((out / "metrics.jsonl").read_text().splitlines())
    assert 8 <= killed_at < 24, "the run finished before it could be killed"
    subprocess.run(args + ["-o", str(out), "--resume"], env=env, check=True, capture_output=True)

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "step_time_s"} for r in rs]

    assert strip(metrics(out)) == strip(metrics(tmp_path / "ref"))


def test_two_epochs_cover_every_row_twice(tiny_model, caches, tmp_path):
    train(cfg(tiny_model, caches["q8"], tmp_path / "e2", epochs=2, max_steps=None, shuffle=True))
    m = metrics(tmp_path / "e2")
    per_epoch = -(-len(CHAT_ROWS) // 4)
    assert len(m) == 2 * per_epoch and [r["epoch"] for r in m] == [0] * per_epoch + [1] * per_epoch
    assert m[-1]["tokens_total"] == 2 * sum(r["tokens"] for r in m[:per_epoch])


def test_lambda_does_not_apply_to_a_method_that_replaces_the_ce(tiny_model, caches, tmp_path):
    from pact_train.loop import TrainError

    with pytest.raises(TrainError, match="--lambda 2.0: does not apply to --method constrained-sft"):
        train(cfg(tiny_model, caches["f32"], tmp_path / "x", method="constrained-sft", lam=2.0))
    assert not (tmp_path / "x").exists()


def test_a_diverging_run_stops_keeps_the_last_good_checkpoint_and_writes_no_adapter(made, tmp_path, monkeypatch):
    import pact_train.loop as loop

    from pact_cache.errors import PactError

    real = loop.policy_losses
    calls = {"n": 0}

    def nan_at_step_3(*a, **k):
        calls["n"] += 1
        ce, kl, n = real(*a, **k)
        return (ce * float("nan"), kl, n) if calls["n"] == 3 else (ce, kl, n)

    monkeypatch.setattr(loop, "policy_losses", nan_at_step_3)
    out = tmp_path / "run"
    cfg = loop.TrainConfig(
        model=made["model"],
        cache=str(made["q8"]),
        out=str(out),
        method="pact",
        batch_size=4,
        max_steps=5,
        save_every=2,
        progress=False,
        plot=False,
        shuffle=False,
    )
    with pytest.raises(
        PactError,
        match=r"step 3: the loss is not finite .*no adapter or model written, the last good "
        r"checkpoint \(step 2\)",
    ):
        loop.train(cfg)
    assert not (out / "adapter").exists()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_a_huge_learning_rate_diverges_into_one_line(made, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_line(
        capsys,
        train_main,
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        made["f32"],
        "-o",
        out,
        "--lr",
        "1e30",
        "--max-steps",
        4,
        "--no-progress",
        "--no-shuffle",
        "--full",
        "--warmup-steps",
        0,
    )
    assert "not finite" in line or "gradient norm is" in line, line
    assert not (out / "model").exists() and not (out / "adapter").exists()


def test_resume_after_moving_the_run_and_from_another_directory(made, tmp_path, capsys, monkeypatch):
    run = tmp_path / "a" / "run"
    base = ("--method", "pact", "--model", made["model"], "--batch-size", 4, "--no-progress", "--save-every", 2)
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

    line = one_line(
        capsys,
        train_main,
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        made["q8"],
        "-o",
        tmp_path / "new",
        "--resume",
    )
    assert "--resume, but there is no run here to resume" in line and not (tmp_path / "new").exists()
    run = tmp_path / "run"
    base = (
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        made["q8"],
        "-o",
        run,
        "--batch-size",
        4,
        "--no-progress",
        "--save-every",
        1,
    )
    assert cli(capsys, train_main, *base, "--max-steps", 1)[0] == 0
    # what kills leave: a fallback checkpoint and temporary folders of dead processes
    shutil.copytree(run / "checkpoint", run / ".checkpoint.old-12345")
    (run / f".checkpoint.tmp-{_host()}-999999999").mkdir()
    (run / f".adapter.tmp-{_host()}-999999999").mkdir()
    assert cli(capsys, train_main, *base, "--max-steps", 2, "--resume")[0] == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


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
    line = one_line(
        capsys,
        train_main,
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        made["q8"],
        "-o",
        target,
        "--no-progress",
        "--max-steps",
        1,
    )
    assert str(target.parent) in line and "check the path, its permissions and free space" in line
    line = one_line(
        capsys,
        cache_main,
        "build",
        made["data"],
        "--ref",
        made["model"],
        "--tokens",
        made["tokens"],
        "-o",
        target,
        "--no-progress",
    )
    assert str(target.parent) in line and not target.exists()


def test_no_traceback_from_a_subprocess_either(made, tmp_path):
    """The entry points as a user runs them: one line, no traceback, exit 1."""
    r = subprocess.run(
        [sys.executable, "-m", "pact_cache", "info", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no such cache folder" in r.stderr


def test_pact_train_asft_logs_and_applies_the_penalty(tiny_model, f32_cache, direction_file, tmp_path):
    """LoRA's B starts at 0, so the penalty starts at 0; loss = CE + lambda * penalty each step; a large
    lambda keeps the update nearer the aligned direction than lambda 0 does, and the adapter written
    has the penalty value logged for the last step."""
    train(asft_cfg(tiny_model, f32_cache, tmp_path / "l0", lam=0.0, direction=str(direction_file)))
    train(asft_cfg(tiny_model, f32_cache, tmp_path / "big", lam=1e3, direction=str(direction_file)))
    m0, mb = metrics(tmp_path / "l0"), metrics(tmp_path / "big")
    assert m0[0]["asft"] == 0.0 and mb[0]["asft"] == 0.0
    for r in mb:
        assert r["loss"] == pytest.approx(r["ce"] + 1e3 * r["asft"], rel=1e-5)
    assert m0[-1]["asft"] > 0 and mb[-1]["asft"] < 0.5 * m0[-1]["asft"]

    from pact_train.loop import lora_direction_factors
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "big" / "adapter")
    )
    assert asft_penalty(lora_direction_factors(model, read_direction(direction_file))).item() == pytest.approx(
        mb[-1]["asft"], rel=0.5
    )


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--method", "asft"], "needs --direction FILE"),
        (["--method", "pact", "--direction", "DIR"], "only a method with a parameter penalty"),
        (["--method", "asft", "--direction", "DIR", "--full"], "leave out --full"),
        (["--method", "asft", "--direction", "DIR", "--lora-targets", "q_proj,k_proj"], "no entry for"),
    ],
)
def test_asft_option_errors(tiny_model, f32_cache, direction_file, tmp_path, capsys, argv, needle):
    argv = [str(direction_file) if a == "DIR" else a for a in argv]
    assert (
        train_main(
            [
                "--method",
                "pact",
                "--model",
                tiny_model,
                "--cache",
                f32_cache,
                "-o",
                str(tmp_path / "run"),
                "--no-progress",
            ]
            + argv
        )
        != 0
    )
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(program_lines(err)) == 1


def test_pact_train_token_mask(tiny_model, scored, tmp_path, capsys):
    src, out = scored
    cfg = dict(
        batch_size=4, max_steps=2, shuffle=False, progress=False, plot=False, lr=1e-3, lora_dropout=0.0, method="sft"
    )
    train(TrainConfig(model=tiny_model, cache=out, out=str(tmp_path / "masked"), token_mask=0.2, **cfg))
    train(TrainConfig(model=tiny_model, cache=out, out=str(tmp_path / "all"), **cfg))
    m = [json.loads(line) for line in (tmp_path / "masked" / "metrics.jsonl").read_text().splitlines()]
    a = [json.loads(line) for line in (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["tokens"] == a[0]["tokens"] and m[0]["ce"] < a[0]["ce"]
    assert json.loads((tmp_path / "masked" / "config.json").read_text())["token_mask"] == 0.2
    capsys.readouterr()
    assert (
        train_main(
            [
                "--method",
                "pact",
                "--model",
                tiny_model,
                "--cache",
                src,
                "-o",
                str(tmp_path / "x"),
                "--token-mask",
                "0.2",
                "--no-progress",
            ]
        )
        != 0
    )
    assert "has no token scores for --token-mask" in capsys.readouterr().err
    assert (
        train_main(
            [
                "--method",
                "pact",
                "--model",
                tiny_model,
                "--cache",
                out,
                "-o",
                str(tmp_path / "y"),
                "--token-mask",
                "1",
                "--no-progress",
            ]
        )
        != 0
    )
    assert "--token-mask" in capsys.readouterr().err


def test_report_to_tensorboard_writes_the_metrics_scalars(tiny_model, caches, tmp_path):
    """--report-to tensorboard: OUT/tensorboard holds, per step, the same scalars as metrics.jsonl
    (read back with TensorBoard's own reader)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(cfg(tiny_model, caches["q8"], out, report_to="tensorboard", max_steps=3, save_every=2))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    recs = metrics(out)
    assert {f"train/{k}" for k in recs[0] if k != "step"} <= set(events.Tags()["scalars"])
    for key in ("loss", "ce", "pact_kl", "lr", "grad_norm"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [s for s, _ in got] == [r["step"] for r in recs]
        assert [v for _, v in got] == pytest.approx([r[key] for r in recs], rel=1e-6)
    assert json.loads((out / "config.json").read_text())["report_to"] == "tensorboard"


def test_a_run_that_fails_before_its_first_step_leaves_nothing_and_the_retry_works(
    tiny_model, caches, tmp_path, capsys, monkeypatch
):
    """Checked before OUT is made: --report-to's package (here hidden); a run folder left by a run that stopped
    before its first checkpoint (an older version's leftovers, a killed process) is started again from step 0
    by the same command, plain or --resume."""
    out = tmp_path / "run"
    args = [
        "--method",
        "pact",
        "--model",
        tiny_model,
        "--cache",
        caches["q8"],
        "-o",
        str(out),
        "--max-steps",
        "1",
        "--no-progress",
        "--report-to",
        "tensorboard",
    ]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    assert "--report-to tensorboard: the tensorboard package is not installed" in one_line(capsys, train_main, *args)
    assert not out.exists()
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard")
    assert cli(capsys, train_main, *args)[0] == 0 and len(metrics(out)) == 1
    # what a run killed after writing its settings and before its first checkpoint leaves
    left = tmp_path / "left"
    left.mkdir()
    shutil.copy(out / "config.json", left / "config.json")
    (left / "metrics.jsonl").write_text("")
    for extra in ([], ["--resume"]):
        code, err = cli(capsys, train_main, *[a if a != str(out) else str(left) for a in args], *extra)
        assert code == 0 and any("holds this run's settings but no checkpoint" in line for line in err), err
        assert len(metrics(left)) == 1
        shutil.rmtree(left / "checkpoint")
        shutil.rmtree(left / "adapter")
    # a folder holding another run is still refused
    assert "holds this run already; pass --resume" in one_line(capsys, train_main, *args)


# ----------------------------------------------------------------------------- QLoRA: --quantize, --optim


def test_qlora_loss_is_the_4bit_models_own_and_only_the_adapters_train(tiny_model, caches, tmp_path):
    """--quantize nf4: the first step's logged cross-entropy equals a naive recomputation from the 4-bit
    model's own forward (row by row, unpadded), and after the steps only LoRA weights have changed."""
    pytest.importorskip("bitsandbytes")
    from pact_train.config import config_record
    from pact_train.distributed import setup, teardown
    from pact_train.loop import open_data, open_policy, start_or_resume, window_loop

    from pact_cache.format import open_cache
    from pact_cache.models import from_pretrained, resolve_model

    c = cfg(tiny_model, caches["f32"], tmp_path / "q", method="sft", quantize="nf4", max_steps=2)
    ranks, device = setup("cpu")
    data = open_data(c, ranks, device)
    policy = open_policy(c.policy_settings(), data, ranks, device)
    assert type(policy.model.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    start = start_or_resume(c.start_settings(), config_record(c, data.cache.cache_id), data, policy, ranks)
    window_loop(c.loop_settings(), data, policy, start, ranks, device)
    teardown(ranks)
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:4]
    assert not [n for n, p in policy.model.named_parameters() if p.requires_grad and "lora_" not in n]

    model = from_pretrained(resolve_model(tiny_model), torch.float32, "cpu", "nf4")
    rows = list(open_cache(caches["f32"]).iter_rows())[:4]  # the first micro-batch (no shuffle, batch 4)
    nll = n = 0.0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor(r.input_ids)[None]
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            pos = torch.arange(r.response_start - 1, len(r.input_ids) - 1)
            nll -= logp[pos, ids[0, pos + 1]].sum().item()
            n += len(pos)
    assert metrics(tmp_path / "q")[0]["ce"] == pytest.approx(nll / n, rel=1e-4)


@pytest.mark.parametrize("quantize, optim, ckpt", [("nf4", "paged-adamw-8bit", False), ("int8", "adamw-8bit", True)])
def test_qlora_with_8bit_optimizers_resumes_exactly(tiny_model, caches, tmp_path, quantize, optim, ckpt):
    """Four steps straight = two steps, then --resume for two more (the 8-bit optimizer state, held in 8 bits
    at rank 128, goes through the checkpoint; int8 with gradient checkpointing); --merge writes a 16-bit
    merged copy beside the adapter."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    kw = dict(method="pact", quantize=quantize, optim=optim, lora_r=128, save_every=2, grad_checkpointing=ckpt)
    train(cfg(tiny_model, caches["f32"], tmp_path / "straight", max_steps=4, **kw))
    train(cfg(tiny_model, caches["f32"], tmp_path / "cut", max_steps=2, **kw))
    state = load_file(str(tmp_path / "cut" / "checkpoint" / "optimizer.safetensors"))
    assert any(k.endswith(".state1") and v.dtype == torch.uint8 for k, v in state.items())  # 8-bit moments
    train(cfg(tiny_model, caches["f32"], tmp_path / "cut", max_steps=4, resume=True, merge=True, **kw))
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
    conf = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert (conf["quantize"], conf["optim"]) == (quantize, optim) and "dry_run" not in conf
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "merged")
    assert merged.dtype == torch.bfloat16 and (tmp_path / "cut" / "adapter" / "adapter_config.json").exists()


def test_quantize_and_optim_refusals_and_the_dry_run(tiny_model, caches, tmp_path, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    base = ("--model", tiny_model, "--cache", caches["q8"], "--no-progress")
    line = one_line(capsys, train_main, *base, "-o", tmp_path / "a", "--quantize", "nf4", "--full")
    assert "--quantize nf4: the quantized base stays frozen" in line and not (tmp_path / "a").exists()
    # --dry-run: the estimate on stdout, nothing written
    assert train_main([*base, "-o", str(tmp_path / "dry"), "--quantize", "nf4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "weights (nf4 linear layers)" in out and "estimated peak" in out and not (tmp_path / "dry").exists()
    # without bitsandbytes: one line naming the extra
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for flag in (("--quantize", "int8"), ("--optim", "adamw-8bit")):
        line = one_line(capsys, train_main, *base, "-o", tmp_path / "b", *flag)
        assert "needs bitsandbytes, the qlora extra: pip install 'pact-cache[qlora]'" in line, line
        assert not (tmp_path / "b").exists()


def test_qlora_with_the_recipes_gate_and_replay_rows(tiny_model, caches, tmp_path):
    """The safe recipe's parts on a 4-bit policy: str with the hard row gate and a replay cache's rows."""
    pytest.importorskip("bitsandbytes")
    from pact_cache.build import BuildConfig, build

    refusals = [{"prompt": f"harm {i}", "completion": "I can't help with that."} for i in range(6)]
    rep = build(
        BuildConfig(
            str(write_jsonl(tmp_path / "r.jsonl", refusals)),
            tiny_model,
            str(tmp_path / "replay"),
            tokens=str(caches["tokens"]),
            encoding="f32",
            progress=False,
        )
    )
    kw = dict(method="str", quantize="nf4", replay=str(rep.out), replay_ratio=0.3, row_gate="hard", gate_at=0.0)
    train(cfg(tiny_model, caches["f32"], tmp_path / "run", **kw))
    m = metrics(tmp_path / "run")
    assert len(m) == 3 and all(r["str"] > 0 and math.isfinite(r["loss"]) for r in m)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["replay_cache_id"] == rep.cache_id


def test_clip_split_takes_the_joint_step_when_every_row_is_anchored_and_sfts_when_none(
    tiny_model, caches, tmp_path, capsys
):
    """--clip split clips the rows the hard gate anchors apart from the others. A gate at 0 anchors every row:
    the split run takes the joint run's steps (the task's norm 0, the anchored rows' the joint norm); a gate at
    1 anchors none: both take SFT's steps (the anchored norm 0). The split runs take each window in two
    micro-batches (2 rows x 2 accumulation, the joint runs 4 x 1): each group's gradient accumulates apart over
    the window. How a mixed batch splits: test_core and test_optim (and test_hf, against the Trainer's)."""
    base = dict(method="str", lam=100.0, row_gate="hard", max_steps=3)
    train(cfg(tiny_model, caches["f32"], tmp_path / "sft", method="sft"))
    for at in (0.0, 1.0):
        two = dict(batch_size=2, grad_accum=2)
        train(cfg(tiny_model, caches["f32"], tmp_path / f"split{at}", clip="split", gate_at=at, **base, **two))
        train(cfg(tiny_model, caches["f32"], tmp_path / f"joint{at}", gate_at=at, **base))
    sft = metrics(tmp_path / "sft")
    (split0, joint0), (split1, joint1) = (
        (metrics(tmp_path / f"split{at}"), metrics(tmp_path / f"joint{at}")) for at in (0.0, 1.0)
    )
    for a, b in ((split0, joint0), (split1, joint1), (split1, sft)):
        assert [r[k] for r in a for k in ("loss", "ce")] == pytest.approx(
            [r[k] for r in b for k in ("loss", "ce")], rel=1e-5
        )
    assert [r["grad_norm"] for r in split0] == [0.0] * 3
    assert [r["anchored_grad_norm"] for r in split0] == pytest.approx([r["grad_norm"] for r in joint0], rel=1e-5)
    assert joint0[-1]["str"] > 1e-6 and joint0[-1]["grad_norm"] > 10 * sft[-1]["grad_norm"]  # the anchor is large
    assert [r["anchored_grad_norm"] for r in split1] == [0.0] * 3
    assert [r["grad_norm"] for r in split1] == pytest.approx([r["grad_norm"] for r in sft], rel=1e-5)
    assert "anchored_grad_norm" not in joint0[0]
    assert json.loads((tmp_path / "split0.0" / "config.json").read_text())["clip"] == "split"
    assert json.loads((tmp_path / "joint0.0" / "config.json").read_text())["clip"] == "joint"
    capsys.readouterr()  # the runs' own lines
    argv = ["--model", tiny_model, "--cache", caches["f32"], "-o", tmp_path / "no", "--clip", "split"]
    line = one_line(capsys, train_main, *argv, "--method", "sft")
    assert "--clip split: clips the rows a row gate anchors apart from the others" in line
    assert "--method sft has no such term: leave it out (joint)" in line
    line = one_line(capsys, train_main, *argv, "--method", "str")
    assert "no --row-gate given: leave it out (joint)" in line
    assert not (tmp_path / "no").exists()


def test_resuming_a_run_whose_recipe_default_changed_names_the_flag(tmp_path):
    """A run started when the safe recipe clipped jointly, resumed after its default became split: the one line
    names the setting and the flag that resumes it as it ran, not just another -o."""
    from pact_train.config import config_record
    from pact_train.loop import TrainError, check_out

    out = tmp_path / "run"
    out.mkdir()
    started = TrainConfig(model="m", cache="c", out=str(out), clip="joint")
    (out / "config.json").write_text(json.dumps(config_record(started, "abc123", 1, None)))
    with pytest.raises(TrainError) as e:
        check_out(out, TrainConfig(model="m", cache="c", out=str(out), resume=True), "abc123", 1, None, False)
    assert "(clip: 'joint' there, 'split' now)" in str(e.value)
    assert "the recipe's default changed since; to resume it, give --clip joint as it ran" in str(e.value)
    # the flag given: the same run (the recipe's record differs, which a resume allows); no checkpoint: from step 0
    again = TrainConfig(model="m", cache="c", out=str(out), clip="joint", resume=True)
    assert "clip" not in again.from_recipe and check_out(out, again, "abc123", 1, None, False) == "new"
    # a run on data that look benign, recorded when those settings replayed at 0.05 (0.07 since): the same line
    (out / "config.json").unlink()
    before = TrainConfig(model="m", cache="c", out=str(out))
    before.fit_to_data(0.0)
    before.replay_ratio = 0.05
    (out / "config.json").write_text(json.dumps(config_record(before, "abc123", 1, None)))
    now = TrainConfig(model="m", cache="c", out=str(out), resume=True)
    assert now.fit_to_data(0.0)[0] == "replay_ratio" and now.replay_ratio == 0.07
    with pytest.raises(TrainError, match=r"give --replay-ratio 0.05 as it ran"):
        check_out(out, now, "abc123", 1, None, False)
