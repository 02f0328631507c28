"""AsFT from an offline direction file: the penalty against AsFT's d x d formula, the direction file
(computed, rank-r factor with its stated error, written, read back, broken copies refused), and
pact-train / the Trainer with --method asft."""

import json
import math
from pathlib import Path

import pytest
import torch

from pact_cache.cli import main as cache_main
from pact_cache.direction import DirectionError, compute_direction, read_direction, save_direction
from pact_cache.models import load_model, resolve_model
from trainer.cli import main as train_main
from trainer.losses import METHODS, asft_penalty
from trainer.loop import TrainConfig, train

from conftest import CHAT_ROWS, build_f32_cache, write_jsonl


def naive_asft(modules):
    """AsFT's code, literally: C = V V^T / ||V||_F (out x out), ||(I - C) @ (B @ A)||_F^2 summed."""
    total = 0.0
    for A, B, V in modules:
        C = V @ V.t() / torch.norm(V)
        total = total + torch.norm((torch.eye(C.shape[0], dtype=V.dtype) - C) @ (B @ A), p="fro") ** 2
    return total


def test_penalty_equals_the_d_by_d_formula_values_and_gradients():
    """Two modules of odd shapes (7x5 rank 3, 4x9 rank 2), P = V and P = U_r diag(s_r) at full rank."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5, 3), (4, 9, 2)]
    mods = [(torch.randn(r, i, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(o, r, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(o, i, generator=g, dtype=torch.float64)) for o, i, r in shapes]
    want = naive_asft(mods)
    want.backward()
    grads = [(A.grad.clone(), B.grad.clone()) for A, B, _ in mods]
    for A, B, _ in mods:
        A.grad = B.grad = None
    got = asft_penalty([(A, B, V, torch.linalg.matrix_norm(V)) for A, B, V in mods])
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for (A, B, _), (ga, gb) in zip(mods, grads):
        assert torch.allclose(A.grad.double(), ga, rtol=1e-4, atol=1e-6) and torch.allclose(B.grad.double(), gb, rtol=1e-4, atol=1e-6)
    factored = []
    for A, B, V in mods:
        U, s, _ = torch.linalg.svd(V, full_matrices=False)
        factored.append((A, B, U * s, torch.linalg.matrix_norm(V)))
    assert asft_penalty(factored).item() == pytest.approx(want.item(), rel=1e-5)
    assert asft_penalty([]).item() == 0.0
    assert METHODS["asft"].penalty is asft_penalty and METHODS["asft"].term is None and METHODS["asft"].metric == "asft"


@pytest.fixture(scope="module")
def direction_file(tiny_model, tiny_base_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dir") / "dir.safetensors"
    assert cache_main(["direction", "--aligned", tiny_model, "--base", tiny_base_model, "-o", str(out)]) == 0
    return out


def test_direction_file_holds_v_exactly(tiny_model, tiny_base_model, direction_file):
    a, _, _ = load_model(resolve_model(tiny_model), "fp32", "cpu")
    b, _, _ = load_model(resolve_model(tiny_base_model), "fp32", "cpu")
    d = read_direction(direction_file)
    names = sorted(n for n, _ in a.named_modules() if n.endswith(("q_proj", "v_proj")))
    assert sorted(d.factors) == names and d.rank is None and set(d.errors.values()) == {0.0}
    assert d.aligned["weights_sha256"] and d.base["weights_sha256"]
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    for n in names:
        V = mods_a[n].weight.detach() - mods_b[n].weight.detach()
        P, norm = d.factors[n]
        assert torch.equal(P, V) and norm.item() == pytest.approx(torch.linalg.matrix_norm(V).item(), rel=1e-6)


def test_rank_r_direction_states_its_error(tiny_model, tiny_base_model, tmp_path, capsys):
    out = tmp_path / "r4.safetensors"
    assert cache_main(["direction", "--aligned", tiny_model, "--base", tiny_base_model, "--rank", "4", "--modules", "v_proj",
                       "-o", str(out)]) == 0
    assert "rank 4, largest relative error of V V^T" in capsys.readouterr().out
    d = read_direction(out)
    a, _, _ = load_model(resolve_model(tiny_model), "fp32", "cpu")
    b, _, _ = load_model(resolve_model(tiny_base_model), "fp32", "cpu")
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    assert d.rank == 4 and all(n.endswith("v_proj") for n in d.factors)
    for n, (P, _) in d.factors.items():
        V = (mods_a[n].weight - mods_b[n].weight).detach()
        full = V @ V.t()
        err = (torch.linalg.matrix_norm(full - P @ P.t()) / torch.linalg.matrix_norm(full)).item()
        assert P.shape[1] == 4 and d.errors[n] == pytest.approx(err, rel=1e-3, abs=1e-6) and 0 < err < 1


def test_direction_errors_are_one_line(tiny_model, tiny_base_model, direction_file, tmp_path, capsys):
    assert cache_main(["direction", "--aligned", tiny_model, "--base", tiny_base_model, "-o", str(direction_file)]) != 0
    err = capsys.readouterr().err
    assert "exists" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    same = tmp_path / "same.safetensors"
    assert cache_main(["direction", "--aligned", tiny_model, "--base", tiny_model, "-o", str(same)]) != 0
    err = capsys.readouterr().err
    assert "V = 0" in err and not same.exists()
    assert cache_main(["direction", "--aligned", tiny_model, "--base", tiny_base_model, "--modules", "nope", "-o", str(same)]) != 0
    assert "no linear layer" in capsys.readouterr().err


def _copy_with(direction_file, tmp_path, name, edit=None, meta_edit=None):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(direction_file), framework="pt") as f:
        meta = json.loads(f.metadata()["pact"])
    tensors = load_file(str(direction_file))
    if edit:
        edit(tensors)
    if meta_edit:
        meta_edit(meta)
    out = tmp_path / name
    save_file(tensors, str(out), metadata={"pact": json.dumps(meta)})
    return out


def _random_bytes(path):
    path.write_bytes(bytes(range(256)) * 9)
    return path


@pytest.mark.parametrize("make, needle", [
    (lambda d, t: _random_bytes(t / "rand.safetensors"), "not a readable safetensors file"),
    (lambda d, t: _copy_with(d, t, "nan.safetensors", edit=lambda x: x[sorted(x)[0]].fill_(float("nan"))), "non-finite"),
    (lambda d, t: _copy_with(d, t, "fmt.safetensors", meta_edit=lambda m: m.update(format="v0")), "not a pact-direction/1 file"),
    (lambda d, t: _copy_with(d, t, "mods.safetensors", meta_edit=lambda m: m["modules"].pop()), "do not match its module list"),
    (lambda d, t: _copy_with(d, t, "norm.safetensors", edit=lambda x: x[[k for k in sorted(x) if k.endswith(".norm")][0]].fill_(0.0)),
     "not positive"),
    (lambda d, t: t / "missing.safetensors", "no such direction file"),
])
def test_broken_direction_files_are_refused(direction_file, tmp_path, make, needle):
    with pytest.raises(DirectionError, match=needle):
        read_direction(make(direction_file, tmp_path))


@pytest.fixture(scope="module")
def cache_dir(tiny_model, tmp_path_factory):
    return build_f32_cache(tmp_path_factory.mktemp("asftcache"), tiny_model)


def _cfg(model, cache, out, **kw):
    base = dict(batch_size=4, max_steps=4, shuffle=False, progress=False, plot=False, lr=1e-2, lora_dropout=0.0, method="asft")
    base.update(kw)
    return TrainConfig(model=model, cache=cache, out=str(out), **base)


def _metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_pact_train_asft_logs_and_applies_the_penalty(tiny_model, cache_dir, direction_file, tmp_path):
    """LoRA's B starts at 0, so the penalty starts at 0; loss = CE + lambda * penalty each step; a large
    lambda keeps the update nearer the aligned direction than lambda 0 does, and the adapter written
    has the penalty value logged for the last step."""
    train(_cfg(tiny_model, cache_dir, tmp_path / "l0", lam=0.0, direction=str(direction_file)))
    train(_cfg(tiny_model, cache_dir, tmp_path / "big", lam=1e3, direction=str(direction_file)))
    m0, mb = _metrics(tmp_path / "l0"), _metrics(tmp_path / "big")
    assert m0[0]["asft"] == 0.0 and mb[0]["asft"] == 0.0
    for r in mb:
        assert r["loss"] == pytest.approx(r["ce"] + 1e3 * r["asft"], rel=1e-5)
    assert m0[-1]["asft"] > 0 and mb[-1]["asft"] < 0.5 * m0[-1]["asft"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.loop import lora_direction_factors

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "big" / "adapter"))
    assert asft_penalty(lora_direction_factors(model, read_direction(direction_file))).item() == pytest.approx(mb[-1]["asft"], rel=0.5)


@pytest.mark.parametrize("argv, needle", [
    (["--method", "asft"], "needs --direction FILE"),
    (["--method", "pact", "--direction", "DIR"], "only a method with a parameter penalty"),
    (["--method", "asft", "--direction", "DIR", "--full"], "leave out --full"),
    (["--method", "asft", "--direction", "DIR", "--lora-targets", "q_proj,k_proj"], "no entry for"),
])
def test_asft_option_errors(tiny_model, cache_dir, direction_file, tmp_path, capsys, argv, needle):
    argv = [str(direction_file) if a == "DIR" else a for a in argv]
    assert train_main(["--model", tiny_model, "--cache", cache_dir, "-o", str(tmp_path / "run"), "--no-progress"] + argv) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]  # transformers' own bar
    assert needle in err and "Traceback" not in err and len(lines) == 1


def test_trainer_asft_adds_the_penalty_once_per_optimizer_step(tiny_model, cache_dir, direction_file, tmp_path):
    """PactTrainer with direction=: the logged asft value is the penalty; with gradient accumulation 2
    the update equals the one of the same rows in pact-train (penalty once per optimizer step)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from pact_cache.format import open_cache
    from trainer.hf import CacheDataset, PactCollator, PactTrainer
    from trainer.losses import LossParams
    from pact_cache.models import load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # a non-zero B, so that the penalty and its gradient are not zero from the start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    cache = open_cache(cache_dir)
    tok = load_tokenizer(resolve_model(tiny_model))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=0.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, lr_scheduler_type="constant")
    trainer = PactTrainer(model=model, args=args, train_dataset=CacheDataset(cache, shuffle=False),
                          data_collator=PactCollator(tok.pad_token_id or 0), cache=cache,
                          loss_params=LossParams(method="asft", lam=2.0), direction=direction_file)
    from trainer.loop import lora_direction_factors

    want = asft_penalty(lora_direction_factors(model, read_direction(direction_file))).item()
    trainer.train()
    logged = [h for h in trainer.state.log_history if "asft" in h]
    assert logged and logged[0]["asft"] == pytest.approx(want, rel=1e-5) and want > 0
    assert logged[0]["loss"] == pytest.approx(logged[0]["ce"] + 2.0 * want, rel=1e-4)
    with pytest.raises(Exception, match="needs direction="):
        PactTrainer(model=model, args=args, train_dataset=CacheDataset(cache, shuffle=False),
                    data_collator=PactCollator(tok.pad_token_id or 0), cache=cache, loss_params=LossParams(method="asft"))
