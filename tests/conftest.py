"""Shared fixtures: a tiny random-weight Llama with a real BPE tokenizer and a ChatML template,
built in code (no network), and helpers for the shared data and the embedded model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# tools/test.sh runs one pytest-xdist worker per core: each worker's torch then takes one thread (set before torch is
# imported; its subprocesses inherit it), or the workers' thread pools fight over the cores and the suite runs slower
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parents[1]  # the repository
HELPERS = ROOT / "tests" / "helpers"
SHARED_DATA = ROOT.parent / "shared" / "data"
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "I can't help with that. I'm sorry, but I cannot assist with this request.",
    "Sure, here is how to do it: first, open the box and take out the parts.",
    "The movie was wonderful and the acting was great. positive negative",
    "What is the capital of France? Paris is the capital of France.",
    "Write a short poem about the sea, the wind and the autumn leaves.",
    "Classify the sentiment of the review as positive or negative.",
] * 20


def tiny_tokenizer(path: Path, vocab: int = 400):
    """A real byte-level BPE tokenizer trained on CORPUS, with a ChatML template, saved in ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return tok


# Real configuration classes of families whose causal LM transforms the head's logits (Gemma-2:
# softcapping; Cohere: logit_scale; Granite: logits_scaling), beside a plain Llama.
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"final_logit_softcapping": 2.0, "head_dim": 8, "query_pre_attn_scalar": 8},
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
}


def make_tiny_model(
    path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 400, arch: str = "llama"
) -> Path:
    import torch
    import transformers

    tok = tiny_tokenizer(path, vocab)
    torch.manual_seed(seed)
    config_cls, model_cls, extra = ARCHS[arch]
    cfg = getattr(transformers, config_cls)(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        **extra,
    )
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # random init is near-uniform; widen the logits so log-probs spread like a real model's
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    return path


def pytest_collection_modifyitems(items):
    """The files that start several processes (``multiprocess``) or load the embedded model (``slow``) first: under
    pytest-xdist's --dist loadfile (tools/test.sh) a long file that starts last keeps one worker busy alone at the
    end. A stable sort: the order within a file, and among the other files, is unchanged."""
    first = {0: "multiprocess", 1: "slow"}
    files = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        rank = next((r for r, m in first.items() if item.get_closest_marker(m)), len(first))
        files[path] = min(rank, files.get(path, rank))
    items.sort(key=lambda item: files[item.nodeid.split("::")[0]])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tinybase") / "model", seed=1))


def free_port() -> int:
    """A port nobody listens on now (the kernel picks it), for one launch's rendezvous: two tests (or two
    suites, or two pytest-xdist workers) on one machine never share the launcher's default port."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_f32_cache(
    root: Path, model: str, ids=(3, 17, 42, 99, 150), weights=(0.5, 0.1, -0.2, 0.7, 0.3), rows=None
) -> str:
    """A float32 cache of ``rows`` (CHAT_ROWS by default) built with ``model``, with mixed-sign token weights."""
    from pact_cache.build import BuildConfig, build

    tokens = root / "tokens.json"
    tokens.write_text(
        json.dumps({"format": "pact-tokens/1", "ids": list(ids), "weights": list(weights), "method": "test"})
    )
    data = write_jsonl(root / "d.jsonl", CHAT_ROWS if rows is None else rows)
    return build(BuildConfig(str(data), model, str(root / "c"), tokens=str(tokens), encoding="f32", progress=False)).out


CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Classify the sentiment of the review number {i} as positive or negative."},
            {"role": "assistant", "content": ("positive" if i % 2 else "negative") + " sure" * (i % 7)},
        ]
    }
    for i in range(23)
]


@pytest.fixture
def chat_dataset(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", CHAT_ROWS)


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """The embedded default model; skipped (not failed) when it cannot be obtained here."""
    from pact_cache.errors import ModelError
    from pact_cache.models import DEFAULT_MODEL, ensure_embedded_model

    try:
        ensure_embedded_model(DEFAULT_MODEL)
    except ModelError as err:
        pytest.skip(f"embedded model unavailable: {err}")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "SST2_5k_p_0.1.json").exists():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def naive_reference(model_dir, dataset, ids, max_length=2048):
    """Plain forward pass, one row at a time, log_softmax over the whole vocabulary."""
    import torch

    from pact_cache.data import assistant_header_ids, tokenize_dataset
    from pact_cache.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(model_dir)
    tok = load_tokenizer(resolved)
    model, _, _ = load_model(resolved, "fp32", "cpu")
    header = assistant_header_ids(tok)
    examples, _ = tokenize_dataset(dataset, tok, max_length, progress=False)
    out = []
    with torch.no_grad():
        for ex in examples:
            rs, n = ex.response_start, ex.steps
            lp = torch.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].float(), -1)
            full = lp[rs - 1 : rs - 1 + n][:, ids].numpy()
            target = lp[torch.arange(rs - 1, rs - 1 + n), torch.tensor(ex.input_ids[rs:])].numpy()
            post_seq = header + ex.input_ids[rs:-1]
            lpp = torch.log_softmax(model(torch.tensor([post_seq])).logits[0].float(), -1)
            post = lpp[len(header) - 1 : len(header) - 1 + n][:, ids].numpy()
            out.append((ex.example_id, full, post, target))
    return out


def row_result(example_id, input_ids, response_start, full, post, target):
    """A builder's row (:class:`pact_cache.format.RowResult`) from its three reference columns."""
    from pact_cache.format import RowResult

    return RowResult(example_id, input_ids, response_start, {"full": full, "post": post, "target": target})


def write_manifest(out: Path, parts, enc, K: int, vocab: int = 1000, weights=None):
    """A valid pact-cache/2 manifest over parts written by ``write_part`` (made-up provenance)."""
    from pact_cache.format import MANIFEST
    from pact_cache.manifest import (
        FORMAT,
        BuildParams,
        Counts,
        DatasetInfo,
        Manifest,
        Reference,
        SafetyTokens,
        Tokenizer,
    )
    from pact_cache.storage import atomic_write_json

    m = Manifest(
        FORMAT,
        "",
        "test",
        Reference("test-model", {"model.safetensors": "a" * 64}),
        Tokenizer("b" * 64, vocab),
        SafetyTokens(tuple(range(K)), tuple(weights or [1.0] * K), method="test"),
        DatasetInfo("c" * 64, "test"),
        BuildParams(None, 8, 1024, "float32", "cpu", (1,), vocab),
        enc,
        Counts(sum(p.rows for p in parts), sum(p.steps for p in parts), 0, 0, {}, {}),
        tuple(parts),
    ).with_content_id()
    atomic_write_json(out / MANIFEST, m.to_json())
    return m


def edit_manifest(out: Path, fn, resign: bool = False):
    """Edit ``out``'s manifest.json as a careless or hostile sender would; ``resign`` also recomputes
    the cache id, as a sender covering their tracks would."""
    from pact_cache.format import MANIFEST
    from pact_cache.manifest import Manifest

    m = json.loads((out / MANIFEST).read_text())
    fn(m)
    if resign:
        m["cache_id"] = Manifest.parse(m, "edit", check_id=False).content_id()
    (out / MANIFEST).write_text(json.dumps(m))
    return m


# ----------------------------------------------------------------------------- made-up rows and caches


def realistic_logprobs(rng, n, K):
    """Log-softmax of heavy-tailed logits, like a language model's: a few likely tokens, a long tail."""
    import numpy as np

    logits = rng.normal(size=(n, 2000)) * 3.5
    logits[:, :K] += rng.normal(size=(n, K)) * 6  # the safety tokens: some likely, some far in the tail
    mx = logits.max(1, keepdims=True)
    lp = logits - mx - np.log(np.exp(logits - mx).sum(1, keepdims=True))
    return lp[:, :K].astype(np.float32)


def random_rows(n_rows=5, K=4, seed=0):
    """Rows of made-up, realistic log-probs (no model): row i has 10 + i tokens, 4 + i response steps."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_rows):
        L, rs = 10 + i, 6
        n = L - rs
        out.append(
            row_result(
                f"{i:08d}-abc",
                list(range(L)),
                rs,
                realistic_logprobs(rng, n, K),
                realistic_logprobs(rng, n, K),
                -np.abs(rng.normal(size=n)).astype(np.float32),
            )
        )
    return out


def random_cache(tmp_path, enc="q8", n_rows=5, K=4):
    """A cache of random_rows in two parts, with a valid manifest: (folder, rows, manifest)."""
    from pact_cache.format import ENCODINGS, write_part

    out = tmp_path / "cache"
    out.mkdir()
    rs = random_rows(n_rows, K)
    parts = [
        write_part(out / "part-00000.parquet", rs[:3], ENCODINGS[enc]),
        write_part(out / "part-00001.parquet", rs[3:], ENCODINGS[enc]),
    ]
    return out, rs, write_manifest(out, parts, ENCODINGS[enc], K)


def tokens_file(tmp_path, ids, weights=None):
    p = tmp_path / "tokens.json"
    p.write_text(
        json.dumps(
            {
                "format": "pact-tokens/1",
                "ids": ids,
                "weights": weights or [1.0] * len(ids),
                "method": "test",
                "params": {},
                "aligned": None,
                "base": None,
            }
        )
    )
    return p


def masses_cache(tmp_path, step0, weights=(0.7, 0.2, -0.3)):
    """Rows whose step-0 mass over the tokens with positive weight is known: step0[i] for row i."""
    import numpy as np

    from pact_cache.format import ENCODINGS, write_part

    rng = np.random.default_rng(0)
    rows = []
    for i, m0 in enumerate(step0):
        n = 2 + i % 3
        full = np.log(np.full((n, 3), 0.01, dtype=np.float64))
        full[0, :2] = np.log([m0 * 0.75, m0 * 0.25])  # tokens 0 and 1 weigh > 0; token 2 does not count
        rows.append(
            row_result(
                f"{i:08d}-x{i}",
                list(range(3, 8 + n)),
                5,
                full.astype(np.float32),
                full.astype(np.float32),
                -rng.random(n).astype(np.float32),
            )
        )
    out = tmp_path / "src"
    out.mkdir()
    half = (len(rows) + 1) // 2
    parts = [
        write_part(out / "part-00000.parquet", rows[:half], ENCODINGS["f32"]),
        write_part(out / "part-00001.parquet", rows[half:], ENCODINGS["f32"]),
    ]
    write_manifest(out, parts, ENCODINGS["f32"], 3, weights=list(weights))
    return out


# ----------------------------------------------------------------------------- caches shared by the session
# Built once per test session; tests that change a cache copy it first (fixture ``copy``).


@pytest.fixture(scope="session")
def f32_cache(tiny_model, tmp_path_factory) -> str:
    """The tiny model's f32 cache of CHAT_ROWS, mixed-sign weights (build_f32_cache's defaults)."""
    return build_f32_cache(tmp_path_factory.mktemp("f32cache"), tiny_model)


@pytest.fixture(scope="session")
def made(tiny_model, tmp_path_factory):
    """q8 and f32 caches of CHAT_ROWS (parts of 8 rows), and a cache of another dataset, same tokens."""
    from pact_cache.build import BuildConfig, build

    root = tmp_path_factory.mktemp("trust")
    data = write_jsonl(root / "train.jsonl", CHAT_ROWS)
    other = write_jsonl(
        root / "other.jsonl",
        [{"prompt": f"Tell me about the sea, part {i}", "completion": "waves " * (i + 2)} for i in range(23)],
    )
    tokens = root / "tokens.json"
    tokens.write_text(
        json.dumps(
            {"format": "pact-tokens/1", "ids": [3, 17, 42, 99], "weights": [0.5, 0.2, 0.1, 0.4], "method": "test"}
        )
    )
    f32 = build(
        BuildConfig(
            str(data),
            tiny_model,
            str(root / "f32"),
            tokens=str(tokens),
            encoding="f32",
            rows_per_part=8,
            progress=False,
        )
    )
    q8 = build(
        BuildConfig(str(data), tiny_model, str(root / "q8"), tokens=str(tokens), rows_per_part=8, progress=False)
    )
    theirs = build(
        BuildConfig(str(other), tiny_model, str(root / "theirs"), tokens=str(tokens), rows_per_part=8, progress=False)
    )
    return {
        "data": data,
        "other": other,
        "tokens": tokens,
        "f32": Path(f32.out),
        "q8": Path(q8.out),
        "theirs": Path(theirs.out),
        "model": tiny_model,
    }


@pytest.fixture
def copy(made, tmp_path):
    """A private copy of one of ``made``'s caches, to damage."""
    import shutil

    def _copy(which="q8"):
        dst = tmp_path / f"cache-{which}"
        shutil.copytree(made[which], dst)
        return dst

    return _copy


@pytest.fixture(scope="session")
def direction_file(tiny_model, tiny_base_model, tmp_path_factory):
    from pact_cache.cli import main

    out = tmp_path_factory.mktemp("dir") / "dir.safetensors"
    assert main(["direction", "--aligned", tiny_model, "--base", tiny_base_model, "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def scored(tiny_model, tiny_base_model, f32_cache, tmp_path_factory):
    """(the f32 cache, a copy of it scored for TOSS with the tiny model as degraded and its sibling as utility)."""
    from pact_cache.cli import main as cache_main

    root = tmp_path_factory.mktemp("toss")
    src = f32_cache
    out = root / "scored"
    assert (
        cache_main(
            [
                "score",
                src,
                "--degraded",
                tiny_model,
                "--utility",
                tiny_base_model,
                "-o",
                str(out),
                "--batch-size",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    return src, str(out)
