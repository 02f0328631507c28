"""Peak memory of a run before it starts: weights by dtype and quantization, adapters, gradients,
optimizer state, activations for the batch and sequence length (with and without gradient
checkpointing) and the loss's logits blocks.

The model is counted from its config alone (instantiated on the ``meta`` device: no weights read,
no memory used), so ``pact-train --dry-run`` and ``pact-cache build`` can say what a run needs
before loading anything. The activation term is a per-layer count of the tensors a decoder layer
of the Llama family keeps for its backward pass. On a CPU the peak can come before the first step: the
loader holds the checkpoint file while it converts the weights. ``tools/bench.py qlora`` prints the
estimate beside measured peaks (docs/benchmarks.md states the error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .projection import LOGITS_CHUNK

GiB = 1024**3

# bytes per parameter of a linear layer's weight when loaded quantized by bitsandbytes:
# nf4: 4 bits + one 8-bit absmax per block of 64 (double quantization) + one fp32 per 256 blocks
# int8: 8 bits + one fp32 scale per output row (counted per parameter as a tiny share)
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# optimizer state per trainable parameter, in bytes: AdamW's two fp32 moments, or two 8-bit ones
# (bitsandbytes keeps tensors under 4,096 values in 32 bits; LoRA's A and B matrices are mostly larger)
OPTIM_BYTES = {"adamw": 8, "adamw-8bit": 2, "paged-adamw-8bit": 2}
# values a decoder layer keeps per token for backward, in units of hidden size h and MLP size i:
# the two norms' inputs and outputs, q/k/v and the attention output, o_proj's input, the residuals,
# and the MLP's gate, up, activation and down input
LAYER_VALUES_H, LAYER_VALUES_I = 10, 4


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config."""

    linear: int  # parameters of the decoder's linear layers (what bitsandbytes quantizes)
    other: int  # embeddings, output layer, norms (kept in 16 or 32 bits)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    lora: dict = field(default_factory=dict)  # module name -> (in_features, out_features) count, per target name
    checkpoint_bytes: int = 0  # the weight files on disk (read whole while the model is loaded)

    @classmethod
    def of_model_dir(cls, path, targets: list[str] | None = None) -> "ModelShape":
        from dataclasses import replace
        from pathlib import Path

        from transformers import AutoConfig

        from .models import ModelError

        files = [f for pattern in ("*.safetensors", "*.bin") for f in Path(path).glob(pattern) if f.is_file()]
        try:
            shape = cls.of_config(AutoConfig.from_pretrained(str(path)), targets)
        except Exception as err:  # a config transformers cannot read or instantiate
            raise ModelError(
                f"{path}: cannot read the model's shape from its config ({type(err).__name__}: "
                f"{(str(err).splitlines() or [''])[0][:120]}); the memory estimate needs it"
            ) from None
        return replace(shape, checkpoint_bytes=sum(f.stat().st_size for f in files))

    @classmethod
    def of_config(cls, config, targets: list[str] | None = None) -> "ModelShape":
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        out_layer = model.get_output_embeddings()
        linear = other = 0
        seen = set()
        lora: dict = {}
        for name, mod in model.named_modules():
            for p in mod.parameters(recurse=False):
                if id(p) in seen:  # tied embeddings count once
                    continue
                seen.add(id(p))
                if isinstance(mod, torch.nn.Linear) and mod is not out_layer:
                    linear += p.numel()
                else:
                    other += p.numel()
            if targets and isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                ins, outs = lora.get(name.rsplit(".", 1)[-1], (0, 0))
                lora[name.rsplit(".", 1)[-1]] = (ins + mod.in_features, outs + mod.out_features)
        text = getattr(config, "text_config", config)
        return cls(
            linear=linear,
            other=other,
            hidden=int(text.hidden_size),
            intermediate=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
            layers=int(text.num_hidden_layers),
            heads=int(text.num_attention_heads),
            vocab=int(text.vocab_size),
            lora=lora,
        )

    def lora_params(self, r: int) -> int:
        """Parameters of rank-``r`` LoRA adapters on the target modules: r * (in + out) each."""
        return sum(r * (i + o) for i, o in self.lora.values())


def human(n: float) -> str:
    """Bytes as GiB from one GiB up, MiB below."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class Estimate:
    """Estimated peak memory of a run, in bytes, by part."""

    parts: dict  # name -> bytes, at the peak of a step
    device: str
    # on the CPU the checkpoint is read into the process while its weights are converted (to fp32, or quantized):
    # the weights plus the file, a peak of its own before the first step (a GPU's memory holds only the weights)
    loading: int = 0

    @property
    def step(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def total(self) -> int:
        return max(self.step, int(self.loading))

    def lines(self) -> list[str]:
        width = max([len(k) for k in self.parts] + [len("while loading the model")])
        rows = [f"  {k:<{width}}  {human(v):>10}" for k, v in self.parts.items()]
        if self.loading:
            rows += [
                f"  {'a step':<{width}}  {human(self.step):>10}",
                f"  {'while loading the model':<{width}}  {human(self.loading):>10} (weights and checkpoint file)",
            ]
        return rows + [f"  {'estimated peak':<{width}}  {human(self.total):>10} on {self.device}"]

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "total_bytes": self.total,
            "step_bytes": self.step,
            "loading_bytes": int(self.loading),
            "parts": {k: int(v) for k, v in self.parts.items()},
        }


def activation_bytes(shape: ModelShape, tokens: int, value_bytes: int, checkpointing: bool, attn_scores: int) -> int:
    """What the forward keeps for backward over ``tokens`` tokens of a micro-batch: every layer's
    tensors, or with gradient checkpointing each layer's input plus one layer recomputed.
    ``attn_scores``: the attention matrix's values per layer (0 where attention runs fused)."""
    per_layer = tokens * (LAYER_VALUES_H * shape.hidden + LAYER_VALUES_I * shape.intermediate) * value_bytes
    per_layer += attn_scores * value_bytes
    if checkpointing:
        return shape.layers * tokens * shape.hidden * value_bytes + per_layer
    return shape.layers * per_layer


def estimate_training(
    shape: ModelShape,
    *,
    device: str,
    batch_size: int,
    seq_len: int,
    full: bool = False,
    lora_r: int = 8,
    quantize: str = "none",
    optim: str = "adamw",
    checkpointing: bool = False,
    logits_chunk: int = LOGITS_CHUNK,
    response_tokens: int | None = None,
) -> Estimate:
    """The peak of one training step: the model as pact-train loads it (CUDA: bf16 base under LoRA,
    fp32 when fully fine-tuned; CPU: fp32; quantized: 4 or 8 bits for the decoder's linear layers
    and, after PEFT's k-bit preparation, fp32 for the rest), the trainable parameters with their
    gradients and optimizer state, the activations of a micro-batch of ``batch_size`` rows of
    ``seq_len`` tokens, and the loss's (positions, vocab) logits blocks over at most ``logits_chunk``
    response positions."""
    cuda = device.startswith("cuda")
    compute = 2 if cuda and not full else 4  # bytes of the values the forward computes in
    quantized = quantize not in (None, "none")
    if full:
        weights, label = (shape.linear + shape.other) * 4, "weights (fp32, trained)"
    elif quantized:
        weights, label = shape.linear * QUANT_BYTES[quantize] + shape.other * 4, f"weights ({quantize} linear layers)"
    else:
        weights, label = (shape.linear + shape.other) * compute, f"weights ({'bf16' if compute == 2 else 'fp32'})"
    trainable = shape.linear + shape.other if full else shape.lora_params(lora_r)
    tokens = batch_size * seq_len
    # CPU and eager attention keep the (heads, seq, seq) scores; CUDA's fused SDPA kernels do not
    scores = 0 if cuda else batch_size * shape.heads * seq_len * seq_len
    parts = {label: weights}
    if not full:
        parts[f"adapters (rank {lora_r}, fp32)"] = trainable * 4
    parts["gradients"] = trainable * 4
    parts[f"optimizer state ({optim})"] = trainable * OPTIM_BYTES[optim]
    parts["activations" + (" (checkpointed)" if checkpointing else "")] = activation_bytes(
        shape, tokens, compute, checkpointing, scores
    )
    parts["logits blocks"] = min(logits_chunk, response_tokens or tokens) * shape.vocab * 4 * 3
    return Estimate(parts, "cuda" if cuda else "cpu", 0 if cuda else weights + shape.checkpoint_bytes)


def estimate_build(shape: ModelShape, *, device: str, dtype_bytes: int, quantize: str, batch_size: int, seq_len: int):
    """The peak of a build's forward pass: the reference's weights and one batch's layer output
    (no backward), with the last hidden states and the safety tokens' log-probs."""
    quantized = quantize not in (None, "none")
    weights = (
        shape.linear * QUANT_BYTES[quantize] + shape.other * dtype_bytes
        if quantized
        else (shape.linear + shape.other) * dtype_bytes
    )
    tokens = batch_size * seq_len
    # without backward only a layer's live tensors count: its input, q/k/v, and the MLP's gate, up and product
    one_layer = tokens * (4 * shape.hidden + 3 * shape.intermediate) * dtype_bytes
    cuda = device.startswith("cuda")
    return Estimate(
        {
            "weights" + (f" ({quantize} linear layers)" if quantized else ""): weights,
            "one layer's activations": one_layer,
            "hidden states": tokens * shape.hidden * 4,
        },
        "cuda" if cuda else "cpu",
        0 if cuda else weights + shape.checkpoint_bytes,
    )
