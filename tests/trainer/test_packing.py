"""Padding-free micro-batches (trainer/packing.py): packed rows give the padded rows' losses, every
method's term and gradients; pact-train and the Trainer run the same steps either way; rows of a
model that cannot keep them apart are padded, with one line; length-grouped order is seeded and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, write_jsonl
from pact_train import packing
from pact_train.core import online_reference, policy_losses
from pact_train.loop import TrainConfig, load_policy, train
from pact_train.losses import METHODS, LossParams
from pact_train.stream import batches, collate

from pact_cache.build import BuildConfig, build
from pact_cache.format import open_cache

WORDS = "the sea rolls on and the waves come back to the shore every night under a pale moon".split()


@pytest.fixture(scope="module")
def mixed(tiny_model, tmp_path_factory):
    """An f32 cache whose rows run from about 50 to about 270 tokens (prompts and answers of very different lengths)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(14):
        n_prompt, n_answer = int(rng.integers(1, 12)), int([1, 2, 45, 3, 75, 1, 30, 1, 10, 55, 2, 18, 4, 35][i])
        rows.append(
            {"prompt": " ".join(rng.choice(WORDS, n_prompt)), "completion": " ".join(rng.choice(WORDS, n_answer))}
        )
    data = write_jsonl(root / "d.jsonl", rows)
    tokens = root / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "format": "pact-tokens/1",
                "ids": [3, 17, 42, 99, 150],
                "weights": [0.5, 0.1, -0.2, 0.7, 0.3],
                "method": "test",
            }
        )
    )
    return build(
        BuildConfig(str(data), tiny_model, str(root / "c"), tokens=str(tokens), encoding="f32", progress=False)
    ).out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def losses_and_grads(model, batch, cache, params):
    model.zero_grad()
    ids, weights = torch.tensor(cache.ids), torch.tensor(cache.tokens.weights)
    ce, term, n = policy_losses(model, batch, ids, weights, params)
    (ce + params.lam * term).backward()
    return ce.detach(), term.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_the_mixed_cache_has_very_different_lengths(mixed):
    lens = [len(r.input_ids) for r in open_cache(mixed).iter_rows()]
    assert max(lens) > 4 * min(lens) and max(lens) > 200  # the chat template adds ~45 tokens to every row


@pytest.mark.parametrize("impl, checkpointing", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_batch_gives_the_padded_losses_every_term_and_gradients(tiny_model, mixed, impl, checkpointing):
    """Every method of the registry, on a micro-batch of rows of very different lengths (all 14 in one
    batch, and an odd-sized one), packed vs padded: CE sum, term sum and every LoRA gradient within 1e-5;
    also with the model's own activation checkpointing (the row bounds reach the recomputation)."""
    cache = open_cache(mixed)
    rows = list(cache.iter_rows())
    torch.manual_seed(0)
    model, tok, _ = load_policy(
        TrainConfig(
            model=tiny_model,
            cache="",
            out="",
            lora_dropout=0.0,
            lora_targets="q_proj,v_proj,o_proj",
            grad_checkpointing=checkpointing,
        ).policy_settings(),
        "cpu",
    )
    model.train()
    model.base_model.model.set_attn_implementation(impl)
    assert packing.enable(model) is None
    for p in model.parameters():  # LoRA B starts at zero: give the adapters something to carry
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    for name in METHODS:
        params = LossParams(method=name, lam=0.7, logits_chunk=7)
        if METHODS[name].penalty is not None:  # AsFT: a weight penalty, not a per-step term (tested in its own file)
            continue
        for group in (rows, rows[3:8]):
            a = losses_and_grads(model, collate(group, tok.pad_token_id), cache, params)
            b = losses_and_grads(model, collate(group, tok.pad_token_id, padding_free=True), cache, params)
            assert b[0].item() == pytest.approx(a[0].item(), rel=1e-5), (name, "ce")
            assert b[1].item() == pytest.approx(a[1].item(), rel=1e-5, abs=1e-7), (name, "term")
            assert a[2].keys() == b[2].keys() and a[2]
            assert max(rel(b[2][k], a[2][k]) for k in a[2]) < 1e-5, name


def test_packed_batch_keeps_tosss_mask_row_gates_and_replay_weights(tiny_model, scored):
    """TOSS's token mask, a soft row gate and replay rows trained with their term only (CE weight 0):
    the padded values, term and gradients, packed."""
    from pact_train.stream import ReplayRow, RowGate

    from pact_cache.rows import cache_token_mask

    cache = open_cache(scored[1])
    rows = list(cache.iter_rows())[:7]
    rows = rows[:5] + [ReplayRow.of(r) for r in rows[5:]]
    torch.manual_seed(0)
    model, tok, _ = load_policy(
        TrainConfig(model=tiny_model, cache="", out="", lora_dropout=0.0).policy_settings(), "cpu"
    )
    assert packing.enable(model) is None
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    mask, gate = cache_token_mask(cache, 0.3), RowGate.of_cache(cache, "soft")
    b = collate(rows, tok.pad_token_id, 1, mask, gate, "term")
    assert (
        not b.loss_mask[b.step_mask].all()
        and b.ce_weight.tolist()[5:] == [0.0, 0.0]
        and len(set(b.row_gate.tolist()[:5])) > 1
    )
    for name in ("pact", "str"):
        params = LossParams(method=name, lam=0.7, logits_chunk=5)
        a = losses_and_grads(model, collate(rows, tok.pad_token_id, 1, mask, gate, "term"), cache, params)
        b = losses_and_grads(
            model, collate(rows, tok.pad_token_id, 1, mask, gate, "term", padding_free=True), cache, params
        )
        assert b[0].item() == pytest.approx(a[0].item(), rel=1e-5) and b[1].item() == pytest.approx(
            a[1].item(), rel=1e-5
        )
        assert max(rel(b[2][k], a[2][k]) for k in a[2]) < 1e-5, name


def test_packed_batch_layout_and_padded_inputs(mixed):
    rows = list(open_cache(mixed).iter_rows())[:5]
    b = collate(rows, 7, padding_free=True)
    lens = [len(r.input_ids) for r in rows]
    assert b.packed and b.attention_mask is None and b.input_ids.shape == (1, sum(lens))
    assert b.cu_seqlens.tolist() == [0, *np.cumsum(lens).tolist()] and b.cu_seqlens.dtype == torch.int32
    assert b.position_ids[0].tolist() == [j for n in lens for j in range(n)] and b.max_length == max(lens)
    padded = collate(rows, 7)
    ids, mask = b.padded_inputs(7)
    assert torch.equal(ids, padded.input_ids) and torch.equal(mask, padded.attention_mask)
    for name in ("step_mask", "targets", "response_start"):
        assert torch.equal(getattr(b, name), getattr(padded, name))


def test_online_reference_reads_a_packed_batch_as_the_padded_one(tiny_model, mixed):
    from pact_cache.data import assistant_header_ids
    from pact_cache.models import load_model, load_tokenizer, resolve_model

    rows = list(open_cache(mixed).iter_rows())[:6]
    ref, _, _ = load_model(resolve_model(tiny_model), torch.float32, "cpu")
    header = assistant_header_ids(load_tokenizer(resolve_model(tiny_model)))
    ids = torch.tensor(open_cache(mixed).ids)
    a = online_reference(ref, collate(rows, 2), header, ids)
    b = online_reference(ref, collate(rows, 2, padding_free=True), header, ids)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_leaky_model_is_refused_and_left_as_it_was(tiny_model, monkeypatch):
    """The proof is what keeps rows apart: an attention that lets packed rows see each other (here the
    per-row split switched off) fails it; the model keeps its own attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    real = packing._per_row_sdpa
    monkeypatch.setattr(packing, "_per_row_sdpa", lambda m, q, k, v, cu, *a: real(m, q, k, v, [cu[0], cu[-1]], *a))
    why = packing.enable(model)
    assert "did not give the padded rows' hidden states" in why and model.config._attn_implementation == "sdpa"


def test_a_model_whose_attention_sdpa_cannot_run_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_model(tmp_path / "g", arch="gemma2"), attn_implementation="eager"
    )
    why = packing.enable(model)  # Gemma-2 caps its attention logits (softcap), which PyTorch's SDPA cannot
    assert "packed attention failed" in why and "softcap" in why and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_sliding_window_model_packs_with_its_window(impl, monkeypatch):
    """Mistral with a window of 4 tokens: packed rows longer than the window (the proof's rows are 5, 11
    and 3 tokens) give the model's own windowed attention, so enable() accepts it."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = impl
    model = transformers.MistralForCausalLM(cfg)
    assert packing.enable(model) is None and packing.rows_kept_apart(model)[0]
    packing.disable(model)
    model.config.sliding_window = (
        6  # the padded reference now uses another window than the one the packed call is given:
    )
    real = packing._per_row_sdpa
    monkeypatch.setattr(packing, "_per_row_sdpa", lambda m, q, k, v, cu, d, sc, w: real(m, q, k, v, cu, d, sc, 4))
    assert "did not give the padded rows' hidden states" in packing.enable(model)


def test_enable_is_idempotent_and_disable_restores(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert packing.enable(model) is None and packing.enable(model) is None
    assert model.config._attn_implementation == "pact_packed_sdpa"
    model.save_pretrained(tmp_path / "saved")  # the switch is not written into the model's config
    assert "pact_packed" not in (tmp_path / "saved" / "config.json").read_text()
    packing.disable(model)
    assert model.config._attn_implementation == "sdpa"


def metrics(out):
    return [
        {k: v for k, v in json.loads(line).items() if k != "step_time_s"}
        for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
    ]


def close(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for ra, rb in zip(a, b):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-9), (ra["step"], k)


def run_cfg(model, cache, out, **kw):
    base = dict(
        recipe="plain",
        batch_size=4,
        grad_accum=2,
        epochs=2,
        progress=False,
        plot=False,
        lr=1e-3,
        lora_dropout=0.0,
        warmup_steps=1,
        method="pact",
        save_every=1,
        schedule="constant",
    )  # constant: a run cut by max_steps keeps the same lr
    return TrainConfig(model=model, cache=cache, out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def padded_run(tiny_model, mixed, tmp_path_factory):
    out = tmp_path_factory.mktemp("padded") / "run"
    train(run_cfg(tiny_model, mixed, out, padding_free=False))
    return out


def test_pact_train_padding_free_equals_padded_and_resumes(tiny_model, mixed, padded_run, tmp_path):
    """pact-train's default (padding-free) against --no-padding-free, shuffled, 2 epochs, accumulation of 2:
    every logged value of every step within 1e-5, the adapters too; stopped at step 3 (mid-epoch) and
    resumed, it logs the same run."""
    from safetensors.torch import load_file

    train(run_cfg(tiny_model, mixed, tmp_path / "packed"))
    close(metrics(padded_run), metrics(tmp_path / "packed"))
    a, b = (
        load_file(padded_run / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "packed" / "adapter" / "adapter_model.safetensors"),
    )
    assert max(rel(b[k], a[k]) for k in a) < 1e-4
    train(run_cfg(tiny_model, mixed, tmp_path / "resumed", max_steps=3))
    train(run_cfg(tiny_model, mixed, tmp_path / "resumed", resume=True))
    close(metrics(tmp_path / "packed"), metrics(tmp_path / "resumed"))


def test_pact_train_pads_with_one_line_when_the_model_cannot_pack(
    tiny_model, mixed, padded_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(packing, "enable", lambda model: "TinyModel: some layer ignores the row boundaries")
    train(run_cfg(tiny_model, mixed, tmp_path / "run", max_steps=2))
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "padding-free" in line] == [
        "pact-train: padding-free batches off: TinyModel: some layer ignores the row boundaries; every micro-batch is "
        "padded to "
        "its longest row"
    ]
    close(metrics(padded_run)[:2], metrics(tmp_path / "run"))


def test_the_trainer_padding_free_equals_padded(tiny_model, mixed, tmp_path):
    """PactTrainer with PactCollator's default (padding-free) and with padding_free=False: the same
    logged losses step by step (accumulation of 2, token-weighted)."""
    from pact_train.hf import CacheDataset, PactCollator, PactTrainer
    from transformers import TrainingArguments

    cache = open_cache(mixed)
    logs = {}
    for free in (False, True):
        torch.manual_seed(0)
        model, tok, _ = load_policy(
            TrainConfig(model=tiny_model, cache="", out="", lora_dropout=0.0).policy_settings(), "cpu"
        )
        args = TrainingArguments(
            output_dir=str(tmp_path / f"hf{free}"),
            remove_unused_columns=False,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            per_device_train_batch_size=3,
            gradient_accumulation_steps=2,
            max_steps=4,
            logging_steps=1,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            disable_tqdm=True,
        )
        trainer = PactTrainer(
            model=model,
            args=args,
            train_dataset=CacheDataset(cache),
            cache=cache,
            loss_params=LossParams(lam=1.0),
            data_collator=PactCollator(tok.pad_token_id, padding_free=free),
        )
        trainer.train()
        assert trainer.data_collator.padding_free is free
        logs[free] = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs[True]) == 4
    for a, b in zip(logs[False], logs[True]):
        for k in ("loss", "ce", "pact_kl", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_length_grouped_batches_are_alike_seeded_and_resume(mixed):
    cache = open_cache(mixed)
    length = {r.example_id: len(r.input_ids) for r in cache.iter_rows()}

    def run(group=3, **kw):
        return [
            (e, t, [r.example_id for r in b])
            for e, t, b in batches(cache, 2, seed=3, shuffle=True, epochs=2, group_by_length=group, **kw)
        ]

    got = run()
    assert got == run()  # seeded
    for e in (0, 1):
        assert sorted(x for ep, _, b in got if ep == e for x in b) == sorted(length)  # every row once per epoch
    spread = lambda bs: np.mean([max(length[x] for x in b) - min(length[x] for x in b) for b in bs])  # noqa: E731
    plain = [[r.example_id for r in b] for _, _, b in batches(cache, 2, seed=3, shuffle=True, epochs=2)]
    whole = run(group=7)  # one window holds the epoch: its micro-batches are the sorted lengths, two by two
    pairs = sorted(length.values())
    assert sorted(sorted(length[x] for x in b) for e, _, b in whole if e == 0) == [
        pairs[i : i + 2] for i in range(0, 14, 2)
    ]
    assert spread([b for _, _, b in got]) < spread(plain)  # windows of 3 micro-batches: more alike than the plain order
    for i, (e, t, _) in enumerate(got):  # a resume at any batch boundary continues the same order
        assert run(start_epoch=e, skip_rows=t) == got[i + 1 :]
    assert [b for e, _, b in got if e == 0] != [b for e, _, b in got if e == 1]  # each epoch its own grouping


def test_the_row_bounds_are_read_once_per_forward_and_again_when_they_change(monkeypatch):
    """Every layer of one forward gets the same cu tensor: its bounds are copied to the host once. A new
    tensor, or the same one changed in place, is read again (never stale bounds)."""
    seen = []
    monkeypatch.setattr(packing, "_per_row_sdpa", lambda m, q, k, v, cu, *a: seen.append(cu) or (None, None))
    attention = packing._attention("sdpa")
    q = torch.zeros(1, 2, 9, 4)
    reads = []

    class Counted(torch.Tensor):
        def tolist(self):
            reads.append(1)
            return super().tolist()

    cu = torch.tensor([0, 4, 9], dtype=torch.int32).as_subclass(Counted)
    for _ in range(3):  # three layers of one forward
        attention(None, q, q, q, None, cu_seq_lens_q=cu)
    assert len(reads) == 1 and seen == [[0, 4, 9]] * 3
    cu[1] = 6  # changed in place
    attention(None, q, q, q, None, cu_seq_lens_q=cu)
    other = torch.tensor([0, 2, 9], dtype=torch.int32).as_subclass(Counted)
    attention(None, q, q, q, None, cu_seq_lens_q=other)
    assert len(reads) == 3 and seen[3:] == [[0, 6, 9], [0, 2, 9]]
