"""The Trainer/TRL integration (trainer/hf.py): the same core as pact-train."""

import copy
import json
import re

import pytest
import torch
from conftest import ROOT
from pact_train.hf import CacheDataset, PactCollator, make_trainer_class
from pact_train.loop import TrainConfig, load_policy, policy_losses, train
from pact_train.losses import LossParams, asft_penalty
from pact_train.stream import collate

from pact_cache.direction import read_direction
from pact_cache.format import open_cache
from pact_cache.models import resolve_model
from pact_cache.rows import cache_token_mask


@pytest.fixture(scope="module")
def cache(f32_cache):
    return f32_cache


def trainer_for(model, cache, tmp_path, params, clip="joint", collator=None, train_dataset=None, cap=None, **args):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        **args,
    )
    return make_trainer_class(Trainer)(
        model=model,
        args=targs,
        cache=open_cache(cache),
        loss_params=params,
        clip=clip,
        data_collator=collator,
        train_dataset=train_dataset,
        **({} if cap is None else {"anchored_max_grad_norm": cap}),
    )


@pytest.mark.parametrize("full", [False, True])
def test_trainer_loss_and_gradients_equal_pact_train(tiny_model, cache, tmp_path, full):
    c = open_cache(cache)
    rows = list(c.iter_rows())[:5]
    cfg = TrainConfig(model=tiny_model, cache=str(cache), out="", method="pact", full=full, lora_dropout=0.0, lam=0.7)
    torch.manual_seed(0)
    model_a, tok, _ = load_policy(cfg.policy_settings(), "cpu")
    model_b = copy.deepcopy(model_a)
    params = cfg.loss_params()
    # pact-train's path
    batch = collate(rows, tok.pad_token_id)
    ce, kl, n = policy_losses(model_a, batch, torch.tensor(c.ids), torch.tensor(c.tokens.weights), params)
    loss_a = (ce + params.lam * kl) / n
    loss_a.backward()
    # the Trainer's path, with the count the Trainer makes from the labels (shifted, != -100)
    inputs = PactCollator(tok.pad_token_id)([{"row": r} for r in rows])
    n_items = inputs["labels"][..., 1:].ne(-100).sum()
    assert n_items == n
    loss_b = trainer_for(model_b, cache, tmp_path, params).compute_loss(
        model_b, dict(inputs), num_items_in_batch=n_items
    )
    loss_b.backward()
    assert kl.item() > 0 and loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    grads_a = {k: p.grad for k, p in model_a.named_parameters() if p.requires_grad}
    grads_b = {k: p.grad for k, p in model_b.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for k in (
        grads_a
    ):  # the collator packs the rows (padding-free), so sums run in another order: float32 noise of the tensor's scale
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-5 * float(grads_a[k].abs().max()), msg=k)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_a_short_trainer_run_logs_pact_trains_first_loss(tiny_model, cache, tmp_path, quantize):
    """Same rows in the same order, batch 4 x 2 accumulation: the first logged loss (before any
    update) is pact-train's first step's loss; the run goes on without error. nf4: the same with a
    QLoRA policy (the base in 4 bits) on both sides."""
    if quantize != "none":
        pytest.importorskip("bitsandbytes")
    params = LossParams(lam=1.0)
    train(
        TrainConfig(
            model=tiny_model,
            cache=str(cache),
            out=str(tmp_path / "pt"),
            method="pact",
            batch_size=4,
            grad_accum=2,
            max_steps=1,
            shuffle=False,
            progress=False,
            plot=False,
            lora_dropout=0.0,
            quantize=quantize,
        )
    )
    want = json.loads((tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()[0])
    torch.manual_seed(0)
    model, tok, _ = load_policy(
        TrainConfig(model=tiny_model, cache="", out="", lora_dropout=0.0, quantize=quantize).policy_settings(), "cpu"
    )
    trainer = trainer_for(
        model,
        cache,
        tmp_path,
        params,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
    )
    trainer.train_dataset = CacheDataset(open_cache(cache))
    trainer.data_collator = PactCollator(tok.pad_token_id)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and logs[0]["loss"] == pytest.approx(want["loss"], rel=1e-4)
    # the method's term under its own name, token-weighted like pact-train's
    assert logs[0]["ce"] == pytest.approx(want["ce"], rel=1e-4) and logs[0]["pact_kl"] == pytest.approx(
        want["pact_kl"], rel=1e-4
    )


def test_trainer_clip_split_refuses_what_it_cannot_do(tiny_model, cache, tmp_path):
    from pact_train.stream import RowGate

    from pact_cache.errors import PactError

    torch.manual_seed(0)
    model, tok, _ = load_policy(TrainConfig(model=tiny_model, cache="", out="").policy_settings(), "cpu")
    gate = PactCollator(tok.pad_token_id, row_gate=RowGate.of_cache(open_cache(cache), "hard", 0.5))
    for params, collator, args, needle in (
        (LossParams(lam=1.0), gate, {}, None),
        (LossParams(lam=1.0), PactCollator(tok.pad_token_id), {}, "give PactCollator(row_gate=...)"),
        (LossParams(method="sft"), gate, {}, "method sft has none"),
        (LossParams(lam=1.0), gate, dict(max_grad_norm=0.0), "which is 0.0: set it > 0"),
    ):
        make = lambda: trainer_for(model, cache, tmp_path, params, clip="split", collator=collator, **args)  # noqa: E731
        if needle is None:
            assert make()._pact_split
            continue
        with pytest.raises(PactError, match=re.escape(needle)):
            make()
    with pytest.raises(PactError, match=re.escape("PactTrainer(clip='both'): use one of joint, split")):
        trainer_for(model, cache, tmp_path, LossParams(), clip="both")
    with pytest.raises(PactError, match=re.escape("own clip, which only clip='split' has")):
        trainer_for(model, cache, tmp_path, LossParams(lam=1.0), clip="joint", collator=gate, cap=0.5)
    # the range is TrainConfig's declaration, the one pact-train's config file is held to
    for cap, shown in ((0.0, "0.0"), (float("nan"), "nan"), ("1", "'1'"), (True, "True")):
        with pytest.raises(
            PactError, match=re.escape(f"anchored_max_grad_norm {shown}: must be a finite number in (0")
        ):
            trainer_for(model, cache, tmp_path, LossParams(lam=1.0), clip="split", collator=gate, cap=cap)


@pytest.mark.parametrize("cap", [None, 2.0])
def test_recipe_kwargs_give_the_trainer_pact_trains_safe_recipe(tiny_model, cache, tmp_path, cap):
    """recipe_kwargs: the Trainer's pieces from RECIPES, the source of pact-train's defaults. With the same replay
    cache, seed, shapes and replay ratio, a Trainer run from them takes pact-train's first 3 steps with no method
    flags (STR at lambda 3, hard gate, replay, split clip; this cache anchors no row, so the data look benign and
    the replay rows train on the anchor alone, the anchored rows clipped at 0.5): loss, both norms (1e-5); and with
    an anchored rows' clip given (``cap``) on both sides. Without a replay it is refused in one line, naming the
    look-alikes the data call for; replay="none" trains without; every row anchored (gate_at=0): the harmful-data
    settings; recipe="plain" is the paper's PACT with the joint clip."""
    from conftest import build_f32_cache
    from pact_train.hf import recipe_kwargs

    from pact_cache.errors import PactError

    refusals = [{"prompt": f"How do I do harm number {i}?", "completion": "I'm sorry, I can't help."} for i in range(9)]
    (tmp_path / "rep").mkdir()
    replay = build_f32_cache(tmp_path / "rep", tiny_model, rows=refusals)
    shapes = dict(batch_size=2, grad_accum=2, max_steps=3, schedule="constant", warmup_steps=0, lr=1e-3)
    # a replay ratio of 0.3 (a setting given wins over the recipe, on both sides), so that the 3 steps hold replay rows
    cfg = TrainConfig(
        model=tiny_model,
        cache=str(cache),
        out=str(tmp_path / "pt"),
        replay=replay,
        replay_ratio=0.3,
        seed=3,
        lora_dropout=0.0,
        anchored_max_grad_norm=cap,
        progress=False,
        plot=False,
        **shapes,
    )
    train(cfg)  # built with every option given here: dataclasses.replace would pass the recipe's fills as given
    want = [json.loads(line) for line in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
    torch.manual_seed(3)  # pact-train's --seed seeds LoRA's initialisation too
    model, tok, _ = load_policy(cfg.policy_settings(), "cpu")
    given = {} if cap is None else {"anchored_max_grad_norm": cap}
    kw = recipe_kwargs(cache, tok.pad_token_id, replay=replay, seed=3, replay_ratio=0.3, **given)
    assert (kw["clip"], kw["loss_params"].method.name, kw["loss_params"].lam) == ("split", "str", 3.0)
    assert kw.get("anchored_max_grad_norm") == (0.5 if cap is None else cap)
    assert kw["data_collator"].replay_term == "term" and cfg.replay_term == "term"  # as pact-train chose
    assert kw["data_collator"].row_gate.at == 0.9 and kw["train_dataset"].replay is not None
    trainer = trainer_for(
        model,
        cache,
        tmp_path,
        kw["loss_params"],
        clip=kw["clip"],
        collator=kw["data_collator"],
        train_dataset=kw["train_dataset"],
        cap=kw.get("anchored_max_grad_norm"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        disable_tqdm=True,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == len(want) == 3
    for a, b in zip(want, logs):
        for k in ("loss", "grad_norm", "anchored_grad_norm", "ce", "str"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k
    # the replay rows were anchored and clipped apart: both parts above max_grad_norm (1), so both were clipped
    assert sum(r["anchored_grad_norm"] > 1 for r in logs) >= 2 and min(r["grad_norm"] for r in logs) > 1
    if cap is not None:
        return  # the rest does not depend on the anchored clip
    with pytest.raises(PactError, match=re.escape("recipe_kwargs('lr'=...): not a recipe setting; use method")):
        recipe_kwargs(cache, tok.pad_token_id, replay=replay, lr=1e-3)
    with pytest.raises(PactError, match=re.escape("replay --ref MODEL --tokens tokens.json --borderline default")):
        recipe_kwargs(cache, tok.pad_token_id)
    # every row anchored: rows the reference would refuse are in the data, so the refusals alone, both terms, no cap
    harmful = recipe_kwargs(cache, tok.pad_token_id, replay=replay, gate_at=0.0)
    assert (harmful["data_collator"].replay_term, harmful.get("anchored_max_grad_norm")) == ("both", None)
    with pytest.raises(PactError, match=re.escape("replay --ref MODEL --tokens tokens.json -o replay/`")):
        recipe_kwargs(cache, tok.pad_token_id, gate_at=0.0)
    bare = recipe_kwargs(cache, tok.pad_token_id, replay="none")
    assert bare["train_dataset"].replay is None and bare["clip"] == "split"
    plain = recipe_kwargs(cache, tok.pad_token_id, recipe="plain")
    assert (plain["loss_params"].method.name, plain["clip"], plain["data_collator"].row_gate) == ("pact", "joint", None)
    assert plain["train_dataset"].replay is None
    # a replay given to a recipe without one, with its ratio, as --replay and --replay-ratio
    mixed = recipe_kwargs(cache, tok.pad_token_id, replay=replay, recipe="plain", replay_ratio=0.2)
    assert mixed["train_dataset"].replay.ratio == pytest.approx(0.2)
    # safe-benign: the replay rows on the anchor alone, the anchored rows' own clip at 0.5; its replay is made with
    # the look-alikes' answers, refusals too, which the refusal names
    benign = recipe_kwargs(cache, tok.pad_token_id, replay=replay, recipe="safe-benign")
    assert (benign["data_collator"].replay_term, benign["anchored_max_grad_norm"]) == ("term", 0.5)
    with pytest.raises(PactError, match=re.escape("--borderline default --borderline-keep all -o replay/`")):
        recipe_kwargs(cache, tok.pad_token_id, recipe="safe-benign")


def test_dataset_shards_by_worker_without_overlap(cache):
    ds = CacheDataset(open_cache(cache))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x)
    ids = [item["row"].example_id for item in loader]
    assert sorted(ids) == sorted(r.example_id for r in open_cache(cache).iter_rows()) and len(set(ids)) == len(ids)


def test_the_documented_example_runs(tiny_model, cache, tmp_path, monkeypatch):
    """docs/trainer.md's Trainer example, with the tiny model and this cache put in, 3 steps on CPU."""
    text = (ROOT / "docs" / "trainer.md").read_text()
    block = text.split("```python")[1].split("```")[0]
    for old, new in (
        ('"s3://team/caches/sst2", cache_id="3f1c2a9e"', repr(str(cache))),
        ('"my-aligned-model"', repr(tiny_model)),
        ("max_steps=250", "max_steps=3"),
        ('"runs/hf"', repr(str(tmp_path / "hf"))),
        ("remove_unused_columns=False,", "remove_unused_columns=False, report_to=[], use_cpu=True,"),
    ):
        assert old in block, old
        block = block.replace(old, new)
    scope = {}
    exec(compile(block, "docs/trainer.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 3
    # the TRL example that follows, in the same scope
    pytest.importorskip("trl")
    trl_block = next(b.split("```")[0] for b in text.split("```python")[1:] if "import trl" in b)
    for old, new in (
        ('"runs/trl"', repr(str(tmp_path / "trl"))),
        ("max_steps=250", "max_steps=2"),
        ("remove_unused_columns=False,", "remove_unused_columns=False, report_to=[], use_cpu=True, bf16=False,"),
    ):
        assert old in trl_block, old
        trl_block = trl_block.replace(old, new)
    exec(compile(trl_block, "docs/trainer.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 2


def test_trl_sft_trainer_runs_pact_from_the_cache(tiny_model, cache, tmp_path):
    """TRL's SFTTrainer with the mixin: the cache as a datasets.IterableDataset, dataset preparation
    skipped; the first logged loss (before any update) is pact-train's first step's loss."""
    trl = pytest.importorskip("trl")
    from pact_train.hf import hf_iterable_dataset

    train(
        TrainConfig(
            model=tiny_model,
            cache=str(cache),
            out=str(tmp_path / "pt"),
            method="pact",
            batch_size=4,
            grad_accum=2,
            max_steps=1,
            shuffle=False,
            progress=False,
            plot=False,
            lora_dropout=0.0,
        )
    )
    want = json.loads((tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    torch.manual_seed(0)
    model, tok, _ = load_policy(
        TrainConfig(model=tiny_model, cache="", out="", lora_dropout=0.0).policy_settings(), "cpu"
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"),
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        dataset_kwargs={"skip_prepare_dataset": True},
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        bf16=False,
        gradient_checkpointing=False,
    )  # TRL's defaults differ from pact-train's fp32 on CPU
    c = open_cache(cache)
    trainer = make_trainer_class(trl.SFTTrainer)(
        model=model,
        args=args,
        train_dataset=hf_iterable_dataset(c),
        processing_class=tok,
        data_collator=PactCollator(tok.pad_token_id),
        cache=c,
        loss_params=LossParams(lam=1.0),
    )
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and logged[0] == pytest.approx(want, rel=1e-5)


def test_dataset_shards_by_rank_unless_the_stack_does(cache, monkeypatch):
    import pact_train.hf as hf

    every = [r.example_id for r in open_cache(cache).iter_rows()]
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(hf, "_rank_world", lambda rank=rank: (rank, 2))
        ds = CacheDataset(open_cache(cache))
        shares.append([item["row"].example_id for item in ds])
        assert len(ds) == len(shares[-1])
        ds.shard_by_rank = False  # what PactTrainer sets: accelerate shards instead
        assert [item["row"].example_id for item in ds] == every and len(ds) == len(every)
    assert sorted(shares[0] + shares[1]) == sorted(every) and not set(shares[0]) & set(shares[1])


def test_trainer_asft_adds_the_penalty_once_per_optimizer_step(tiny_model, f32_cache, direction_file, tmp_path):
    """PactTrainer with direction=: the logged asft value is the penalty; with gradient accumulation 2
    the update equals the one of the same rows in pact-train (penalty once per optimizer step)."""
    from pact_train.hf import CacheDataset, PactCollator, PactTrainer
    from pact_train.losses import LossParams
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from pact_cache.format import open_cache
    from pact_cache.models import load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # a non-zero B, so that the penalty and its gradient are not zero from the start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    cache = open_cache(f32_cache)
    tok = load_tokenizer(resolve_model(tiny_model))
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        lr_scheduler_type="constant",
    )
    trainer = PactTrainer(
        model=model,
        args=args,
        train_dataset=CacheDataset(cache, shuffle=False),
        data_collator=PactCollator(tok.pad_token_id or 0),
        cache=cache,
        loss_params=LossParams(method="asft", lam=2.0),
        direction=direction_file,
    )
    from pact_train.loop import lora_direction_factors

    want = asft_penalty(lora_direction_factors(model, read_direction(direction_file))).item()
    trainer.train()
    logged = [h for h in trainer.state.log_history if "asft" in h]
    assert logged and logged[0]["asft"] == pytest.approx(want, rel=1e-5) and want > 0
    assert logged[0]["loss"] == pytest.approx(logged[0]["ce"] + 2.0 * want, rel=1e-4)
    with pytest.raises(Exception, match="needs direction="):
        PactTrainer(
            model=model,
            args=args,
            train_dataset=CacheDataset(cache, shuffle=False),
            data_collator=PactCollator(tok.pad_token_id or 0),
            cache=cache,
            loss_params=LossParams(method="asft"),
        )


def test_trainer_collator_carries_the_token_mask(scored):
    from pact_train.hf import PactCollator

    _, out = scored
    cache = open_cache(out)
    mask = cache_token_mask(cache, 0.2)
    rows = list(cache.iter_rows())[:3]
    b = PactCollator(0, token_mask=mask)([{"row": r} for r in rows])
    for i, r in enumerate(rows):
        assert b["pact_loss_mask"][i, : r.steps].tolist() == mask.keep(r.example_id, r.score).tolist()
    assert torch.equal(PactCollator(0)([{"row": r} for r in rows])["pact_loss_mask"], b["pact_step_mask"])


def test_the_python_api_refuses_what_the_cli_refuses(cache, made, tmp_path):
    """A cache with no rows, a pad id that is None or negative, an empty batch: one typed error each,
    not an empty epoch or a failure deep inside torch; a tokenizer without a pad token pads with EOS."""
    import shutil
    from types import SimpleNamespace

    from conftest import edit_manifest
    from pact_train.hf import pad_id_for

    from pact_cache.errors import PactError

    empty = tmp_path / "empty"
    shutil.copytree(made["q8"], empty)
    edit_manifest(empty, lambda m: m.update(parts=[], counts=dict(m["counts"], rows=0, response_steps=0)), resign=True)
    for p in empty.glob("part-*.parquet"):
        p.unlink()
    with pytest.raises(PactError, match="the cache holds no rows"):
        CacheDataset(str(empty))
    for bad in (None, -5, 1.5, True):
        with pytest.raises(PactError, match="needs a token id >= 0"):
            PactCollator(bad)
    with pytest.raises(PactError, match="an empty batch"):
        PactCollator(0)([])
    assert pad_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_id_for(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    rows = list(open_cache(cache).iter_rows())[:2]
    padded = PactCollator(pad_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=7)), padding_free=False)(rows)
    assert padded["input_ids"].shape[0] == 2
    packed = PactCollator(0)(rows)  # the default: one sequence of the real tokens, the same labels
    assert packed["input_ids"].shape == (1, sum(len(r.input_ids) for r in rows)) and "attention_mask" not in packed
    assert packed["labels"][packed["labels"] != -100].tolist() == padded["labels"][padded["labels"] != -100].tolist()


def test_the_python_api_checks_its_arguments_as_the_cli_does(cache):
    from pact_cache.errors import PactError

    for kw, needle in (
        (dict(row_gate="hard"), "PactCollator(row_gate='hard'): must be a RowGate, e.g. RowGate.of_cache"),
        (dict(replay_term=["ce"]), "PactCollator(replay_term=['ce']): use one of both, ce, term"),
    ):
        with pytest.raises(PactError) as e:
            PactCollator(0, **kw)
        assert needle in str(e.value)
    for kw, needle in (
        (dict(shuffle="yes"), "CacheDataset(shuffle='yes'): must be true or false"),
        (dict(seed=-1), "CacheDataset(seed=-1): must be an integer >= 0"),
        (dict(buffer_rows=0), "CacheDataset(buffer_rows=0): must be an integer >= 1"),
    ):
        with pytest.raises(PactError) as e:
            CacheDataset(cache, **kw)
        assert needle in str(e.value)
