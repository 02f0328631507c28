"""pact_cache/models.py: a MODEL argument to a folder, devices and dtypes, fingerprints and the one tokenizer
check, each refusal one line."""

import pytest
import torch

from pact_cache.errors import CacheError, ModelError
from pact_cache.models import (
    check_tokenizer,
    load_tokenizer,
    model_fingerprint,
    pick_device,
    pick_dtype,
    resolve_model,
    tokenizer_fingerprint,
)


def test_a_model_argument_becomes_a_folder_or_one_line(tiny_model, tmp_path):
    r = resolve_model(tiny_model)
    assert (r.path / "config.json").is_file()
    (tmp_path / "empty").mkdir()
    for name, needle in (
        (str(tmp_path / "empty"), "folder has no config.json"),
        (str(tmp_path / "none"), "no such model folder"),
        ("./relative/x", "no such model folder"),
    ):
        with pytest.raises(ModelError, match=needle):
            resolve_model(name)


def test_devices_and_dtypes():
    assert pick_device("cpu") == "cpu" and pick_device("auto") in ("cpu", "cuda")
    with pytest.raises(ModelError, match="--device tpu: unknown; use auto, cpu or cuda"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device is visible"):
            pick_device("cuda")
    assert pick_dtype("auto", "cpu") == torch.float32 and pick_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ModelError, match="--dtype fp8: unknown"):
        pick_dtype("fp8", "cpu")


def test_fingerprints_and_the_tokenizer_check(tiny_model, tmp_path):
    from conftest import make_tiny_model

    tok = load_tokenizer(resolve_model(tiny_model))
    fp = tokenizer_fingerprint(tok)["sha256"]
    assert fp == tokenizer_fingerprint(load_tokenizer(resolve_model(tiny_model)))["sha256"]  # stable
    check_tokenizer(tok, fp, "cache c", "rebuild it")  # the same tokenizer: nothing to say
    with pytest.raises(CacheError) as e:
        check_tokenizer(tok, "0" * 64, "cache c", "rebuild it", CacheError)
    msg = str(e.value)
    assert msg.startswith("cache c: built with another tokenizer (fingerprint 000000000000, this one " + fp[:12])
    assert msg.endswith("; rebuild it")
    other = make_tiny_model(tmp_path / "other", seed=7)  # other weights, the same tokenizer
    assert (
        model_fingerprint(resolve_model(str(other)))["weights_sha256"]
        != model_fingerprint(resolve_model(tiny_model))["weights_sha256"]
    )
    assert tokenizer_fingerprint(load_tokenizer(resolve_model(str(other))))["sha256"] == fp
