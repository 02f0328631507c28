"""The memory estimate (pact_cache/memory.py): the model counted from its config alone, and each part
moving the way the setting says."""

import pytest
import torch
from conftest import make_tiny_model

from pact_cache.memory import QUANT_BYTES, ModelShape, estimate_build, estimate_training, human


def test_the_shape_counts_every_parameter_once(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "m", hidden=64, layers=3)
    shape = ModelShape.of_model_dir(path, ["q_proj", "v_proj"])
    assert shape.checkpoint_bytes == sum(f.stat().st_size for f in path.glob("*.safetensors")) > 0
    model = AutoModelForCausalLM.from_pretrained(path)
    assert shape.linear + shape.other == sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
    )
    assert shape.linear == linear and (shape.hidden, shape.layers) == (64, 3)
    q, v = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj
    assert shape.lora_params(8) == 3 * 8 * (q.in_features + q.out_features + v.in_features + v.out_features)


def test_each_setting_moves_its_part():
    shape = ModelShape(linear=10**9, other=2 * 10**8, hidden=2048, intermediate=8192, layers=16, heads=32, vocab=10**5)
    shape = ModelShape(**{**shape.__dict__, "lora": {"q_proj": (2048 * 16, 2048 * 16)}})
    kw = dict(device="cuda", batch_size=16, seq_len=512)
    bf16 = estimate_training(shape, **kw)
    nf4 = estimate_training(shape, quantize="nf4", **kw)
    int8 = estimate_training(shape, quantize="int8", **kw)
    w = lambda e: next(iter(e.parts.values()))  # noqa: E731
    assert w(bf16) == 1.2e9 * 2 and w(nf4) == pytest.approx(1e9 * QUANT_BYTES["nf4"] + 2e8 * 4)
    assert w(nf4) < w(int8) < w(bf16)
    paged = estimate_training(shape, quantize="nf4", optim="paged-adamw-8bit", **kw)
    assert paged.parts["optimizer state (paged-adamw-8bit)"] * 4 == nf4.parts["optimizer state (adamw)"]
    ckpt = estimate_training(shape, checkpointing=True, **kw)
    assert ckpt.parts["activations (checkpointed)"] < bf16.parts["activations"] / 4
    full = estimate_training(shape, full=True, **kw)
    assert "adapters (rank 8, fp32)" not in full.parts and full.total > 16 * 1.2e9
    cpu = estimate_training(shape, device="cpu", batch_size=16, seq_len=512)
    assert cpu.parts["activations"] > 2 * bf16.parts["activations"]  # fp32 values and the attention scores
    # on a CPU, loading holds the weights and the checkpoint file; a GPU's memory holds only the weights
    on_disk = ModelShape(**{**shape.__dict__, "checkpoint_bytes": 24 * 10**8})
    small = estimate_training(on_disk, device="cpu", batch_size=1, seq_len=8, quantize="nf4")
    assert small.loading == w(small) + 24e8 and small.total == int(small.loading) > small.step
    assert estimate_training(on_disk, quantize="nf4", **kw).loading == 0 and bf16.total == bf16.step
    b = dict(device="cuda", dtype_bytes=2, batch_size=8, seq_len=2048)
    b4, b16 = estimate_build(shape, quantize="nf4", **b), estimate_build(shape, quantize="none", **b)
    assert b16.total - b4.total == pytest.approx(w(bf16) - (w(nf4) - 2e8 * 2))  # the rest stays 16-bit in a build
    assert "GiB" in b4.lines()[-1] and human(3 * 1024**2) == "3.0 MiB"


def test_a_config_that_cannot_be_read_is_one_model_error(tmp_path):
    from pact_cache.models import ModelError

    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelError, match="cannot read the model's shape from its config"):
        ModelShape.of_model_dir(tmp_path)
