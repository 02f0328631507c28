"""One projection: the build, the trainer and the online reference use the model's own logits, on
model families whose causal LM transforms its head's output (Gemma-2 softcapping, Cohere's
logit_scale, Granite's logits_scaling) as on a plain Llama."""

import json

import pytest
import torch
from conftest import ARCHS, CHAT_ROWS, make_tiny_model, naive_reference, write_jsonl
from hostile import program_lines
from pact_train.loop import TrainConfig, train
from pact_train.losses import PactParams, pact_kl

from pact_cache.build import BuildConfig, build
from pact_cache.cli import main as cache_main
from pact_cache.format import open_cache
from pact_cache.models import load_model, resolve_model
from pact_cache.projection import Projection, ProjectionError, check_projection

IDS = [3, 17, 42, 99, 150]
WEIGHTS = [0.5, 0.1, 0.2, 0.7, 0.3]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    """A tiny random model of each family, and an f32 cache of CHAT_ROWS built with it."""
    root = tmp_path_factory.mktemp(request.param)
    model = str(make_tiny_model(root / "model", arch=request.param))
    data = write_jsonl(root / "d.jsonl", CHAT_ROWS[:8])
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({"format": "pact-tokens/1", "ids": IDS, "weights": WEIGHTS, "method": "test"}))
    cache = build(
        BuildConfig(str(data), model, str(root / "c"), tokens=str(tokens), encoding="f32", progress=False)
    ).out
    return request.param, model, data, cache, root


def own_logits(model_dir, input_ids):
    model, _, _ = load_model(resolve_model(model_dir), "fp32", "cpu")
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits[0].float()


def test_projection_reproduces_the_models_own_logits(arch):
    name, model_dir, _, _, _ = arch
    model, _, _ = load_model(resolve_model(model_dir), "fp32", "cpu")
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 150, 8, 9]])
    with torch.no_grad():
        want = model(ids).logits[0]
        got = Projection.of(model).logits(model.get_decoder()(ids).last_hidden_state[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if name != "llama":  # the transform matters on these models: the bare head is not their logits
        assert (model.get_output_embeddings()(model.get_decoder()(ids).last_hidden_state[0]) - want).abs().max() > 0.5
    check_projection(model)  # passes


def test_cached_values_are_log_softmax_of_the_models_own_logits(arch):
    name, model_dir, data, cache, _ = arch
    want = {eid: (full, post, target) for eid, full, post, target in naive_reference(model_dir, data, IDS)}
    c = open_cache(cache)
    # caches of models that scale their logits say so: the first algorithm stored other values for them
    assert c.manifest.build.algorithm == ("pact-ref/2" if name in ("cohere", "granite") else "pact-ref/1")
    rows = list(c.iter_rows())
    assert len(rows) == len(want) == 8
    for r in rows:
        full, post, target = want[r.example_id]
        assert abs(r.ref["full"] - full).max() < 1e-4
        assert abs(r.ref["post"] - post).max() < 1e-4
        assert abs(r.ref["target"] - target).max() < 1e-4


def test_first_step_ce_and_pact_kl_are_the_models_own(arch):
    """pact-train's first-step CE equals the model's own ``labels=`` loss on the batch, and its PACT
    KL equals pact_kl of the model's own logits against the cache (policy = reference at step 1).
    Fails when the trainer projects with the bare head (Gemma-2's softcapping, before this fix)."""
    _, model_dir, _, cache, root = arch
    out = root / f"run-{len(list(root.iterdir()))}"
    train(
        TrainConfig(
            model=model_dir,
            cache=cache,
            out=str(out),
            method="pact",
            batch_size=8,
            max_steps=1,
            shuffle=False,
            progress=False,
            plot=False,
            lora_dropout=0.0,
        )
    )
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    rows = list(open_cache(cache).iter_rows())
    model, _, _ = load_model(resolve_model(model_dir), "fp32", "cpu")
    L = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), L), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.from_numpy(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
        labels[i, r.response_start : len(r.input_ids)] = ids[i, r.response_start : len(r.input_ids)]
    with torch.no_grad():
        out_ = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert rec["ce"] == pytest.approx(out_.loss.item(), rel=1e-5)
    total, count = 0.0, 0
    for i, r in enumerate(rows):
        pos = torch.arange(r.response_start - 1, len(r.input_ids) - 1)
        pol = out_.logits[i, pos][:, IDS].float()[None]
        s, n = pact_kl(
            pol,
            torch.from_numpy(r.ref["full"])[None],
            torch.from_numpy(r.ref["post"])[None],
            torch.tensor(WEIGHTS),
            torch.ones(1, r.steps, dtype=torch.bool),
            PactParams(),
        )
        total, count = total + s.item(), count + n.item()
    assert rec["pact_kl"] == pytest.approx(total / count, rel=1e-4)


def test_online_reference_equals_the_cache(arch):
    _, model_dir, _, cache, root = arch
    a, b = root / "cached", root / "online"
    for out, ref in ((a, "cache"), (b, "online")):
        if not out.exists():
            train(
                TrainConfig(
                    model=model_dir,
                    cache=cache,
                    out=str(out),
                    method="pact",
                    reference=ref,
                    batch_size=4,
                    max_steps=2,
                    shuffle=False,
                    progress=False,
                    plot=False,
                    lora_dropout=0.0,
                    lr=1e-3,
                )
            )
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ma, mb):
        assert x["ce"] == pytest.approx(y["ce"], rel=1e-5)
        assert x["pact_kl"] == pytest.approx(y["pact_kl"], rel=1e-4, abs=1e-9)


def test_a_head_the_projection_does_not_reproduce_stops_with_one_line(tmp_path, monkeypatch, capsys):
    """A family whose transform pact-cache did not know would have been cached and trained on the bare
    head's logits; the start check names the model class instead."""
    import pact_cache.projection as projection

    model_dir = make_tiny_model(tmp_path / "m", arch="gemma2")
    model, _, _ = load_model(resolve_model(str(model_dir)), "fp32", "cpu")
    monkeypatch.setattr(projection, "_transform", lambda lm: ("none", None))  # as if softcapping were unknown
    with pytest.raises(ProjectionError, match="Gemma2ForCausalLM"):
        check_projection(model)
    data = write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS[:3])
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"format": "pact-tokens/1", "ids": IDS, "weights": WEIGHTS, "method": "test"}))
    capsys.readouterr()
    rc = cache_main(
        [
            "build",
            str(data),
            "--ref",
            str(model_dir),
            "--tokens",
            str(tokens),
            "-o",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )
    err = program_lines(capsys.readouterr().err, ("pact-cache",))
    assert rc == 1 and len(err) == 1 and "Gemma2ForCausalLM" in err[0] and "own forward" in err[0], err
    assert not (tmp_path / "c" / "manifest.json").exists()
    from pact_train.cli import main as train_main

    monkeypatch.undo()
    good = build(BuildConfig(str(data), str(model_dir), str(tmp_path / "good"), tokens=str(tokens), progress=False)).out
    monkeypatch.setattr(projection, "_transform", lambda lm: ("none", None))
    rc_train = train_main(
        ["--method", "pact", "--model", str(model_dir), "--cache", good, "-o", str(tmp_path / "run"), "--no-progress"]
    )
    err = program_lines(capsys.readouterr().err, ("pact-train",))
    assert rc_train == 1 and len(err) == 1 and "Gemma2ForCausalLM" in err[0], err
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_trainer_integration_checks_the_projection_at_construction(tmp_path, monkeypatch):
    from pact_train.hf import CacheDataset, PactCollator, make_trainer_class
    from transformers import Trainer, TrainingArguments

    import pact_cache.projection as projection

    model_dir = make_tiny_model(tmp_path / "m", arch="cohere")
    data = write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS[:4])
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"format": "pact-tokens/1", "ids": IDS, "weights": WEIGHTS, "method": "test"}))
    cache = open_cache(
        build(BuildConfig(str(data), str(model_dir), str(tmp_path / "c"), tokens=str(tokens), progress=False)).out
    )
    model, _, _ = load_model(resolve_model(str(model_dir)), "fp32", "cpu")
    args = TrainingArguments(
        str(tmp_path / "run"), remove_unused_columns=False, report_to=[], use_cpu=True, max_steps=1
    )
    kw = dict(model=model, args=args, cache=cache, train_dataset=CacheDataset(cache), data_collator=PactCollator(2))
    make_trainer_class(Trainer)(**kw)  # the model's own logits: accepted
    monkeypatch.setattr(projection, "_transform", lambda lm: ("none", None))  # as if logit_scale were unknown
    with pytest.raises(ProjectionError, match="CohereForCausalLM"):
        make_trainer_class(Trainer)(**kw)
