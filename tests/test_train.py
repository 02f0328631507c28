import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pact_cache.build import BuildConfig, build
from pact_cache.format import MANIFEST
from trainer.cli import main as train_main
from trainer.loop import TrainConfig, train

from conftest import CHAT_ROWS, edit_manifest, make_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def caches(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_jsonl(root / "train.jsonl", CHAT_ROWS)
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({"format": "pact-tokens/1", "ids": [3, 17, 42, 99, 150, 201, 333],
                                  "weights": [0.5, 0.1, -0.2, 0.7, 0.3, 0.2, 0.4], "method": "test", "params": {}}))
    f32 = build(BuildConfig(str(data), tiny_model, str(root / "f32"), tokens=str(tokens), encoding="f32", progress=False))
    q8 = build(BuildConfig(str(data), tiny_model, str(root / "q8"), tokens=str(tokens), rows_per_part=8, progress=False))
    return {"f32": str(f32.out), "q8": str(q8.out), "data": data, "tokens": tokens}


def cfg(model, cache, out, **kw):
    base = dict(batch_size=4, max_steps=3, shuffle=False, progress=False, plot=False, lr=1e-3, lora_dropout=0.0)
    base.update(kw)
    return TrainConfig(model=model, cache=cache, out=str(out), **base)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, metric", [("pact", "pact_kl"), ("pact-rest", "pact_rest_kl"), ("str", "str"),
                                            ("constrained-sft", "constrained_sft")])
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
        want = x[metric] if method == "constrained-sft" else x["ce"] + x[metric]  # lambda 1; constrained SFT replaces the CE
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
    assert not torch.equal(full.model.layers[0].self_attn.q_proj.weight, AutoModelForCausalLM.from_pretrained(tiny_model).model.layers[0].self_attn.q_proj.weight)


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
    code = train_main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pact-train")]
    return code, err


def test_bad_inputs_one_line_nothing_overwritten(tiny_model, caches, tmp_path, capsys):
    other_model = str(make_tiny_model(tmp_path / "other_model", vocab=300))
    code, err = run_cli(capsys, "--model", other_model, "--cache", caches["q8"], "-o", tmp_path / "o1", "--no-progress")
    assert code == 1 and len(err) == 1 and "built with another tokenizer" in err[0]
    code, err = run_cli(capsys, "--model", tiny_model, "--cache", caches["q8"], "-o", tmp_path / "o2", "--lambda", "-1")
    assert code == 1 and "--lambda -1.0: must be a finite number in [0, inf)" in err[0]
    # a run folder is never taken over by a different run
    out = tmp_path / "run"
    assert run_cli(capsys, "--model", tiny_model, "--cache", caches["q8"], "-o", out, "--max-steps", 1, "--no-progress")[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, err = run_cli(capsys, "--model", tiny_model, "--cache", caches["q8"], "-o", out, "--max-steps", 1, "--lr", "1e-3", "--no-progress")
    assert code == 1 and "holds a different run (lr" in err[0]
    code, err = run_cli(capsys, "--model", tiny_model, "--cache", caches["q8"], "-o", out, "--max-steps", 1, "--no-progress")
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


def test_sigkill_then_resume_logs_the_same_metrics(caches, tmp_path_factory, tmp_path):
    model = str(make_tiny_model(tmp_path_factory.mktemp("wide_train") / "model", hidden=128, layers=4))
    data = write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS * 6)
    cache = build(BuildConfig(str(data), model, str(tmp_path / "cache"), tokens=str(caches["tokens"]), rows_per_part=16, progress=False))
    args = [sys.executable, "-m", "trainer", "--model", model, "--cache", str(cache.out), "--batch-size", "4", "--max-steps", "24",
            "--save-every", "3", "--lr", "1e-3", "--no-progress", "--seed", "3"]
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


def test_lr_schedules():
    from trainer.loop import lr_at

    c = TrainConfig(model="", cache="", out="", lr=1.0, warmup_steps=2, schedule="cosine")
    assert [lr_at(s, 10, 5, c) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_at(9, 10, 5, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    c = TrainConfig(model="", cache="", out="", lr=1.0, warmup_steps=0, schedule="step")
    assert [lr_at(s, 20, 5, c) for s in (0, 4, 5, 10)] == [1.0, 1.0, 0.85, 0.85 ** 2]
    c = TrainConfig(model="", cache="", out="", lr=2.0, warmup_steps=-1, schedule="linear")
    assert lr_at(0, 100, 10, c) == pytest.approx(2.0 / 3) and lr_at(99, 100, 10, c) == pytest.approx(2.0 * (1 - 96 / 97))


def test_lambda_does_not_apply_to_a_method_that_replaces_the_ce(tiny_model, caches, tmp_path):
    from trainer.loop import TrainError

    with pytest.raises(TrainError, match="--lambda 2.0: does not apply to --method constrained-sft"):
        train(cfg(tiny_model, caches["f32"], tmp_path / "x", method="constrained-sft", lam=2.0))
    assert not (tmp_path / "x").exists()
