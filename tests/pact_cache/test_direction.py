"""AsFT's direction file (pact_cache/direction.py)."""

import json

import pytest
import torch

from pact_cache.cli import main as cache_main
from pact_cache.direction import DirectionError, read_direction
from pact_cache.models import load_model, resolve_model


def _copy_with(direction_file, tmp_path, name, edit=None, meta_edit=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

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
    assert (
        cache_main(
            [
                "direction",
                "--aligned",
                tiny_model,
                "--base",
                tiny_base_model,
                "--rank",
                "4",
                "--modules",
                "v_proj",
                "-o",
                str(out),
            ]
        )
        == 0
    )
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
    assert (
        cache_main(
            ["direction", "--aligned", tiny_model, "--base", tiny_base_model, "--modules", "nope", "-o", str(same)]
        )
        != 0
    )
    assert "no linear layer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d, t: _random_bytes(t / "rand.safetensors"), "not a readable safetensors file"),
        (
            lambda d, t: _copy_with(d, t, "nan.safetensors", edit=lambda x: x[sorted(x)[0]].fill_(float("nan"))),
            "non-finite",
        ),
        (
            lambda d, t: _copy_with(d, t, "fmt.safetensors", meta_edit=lambda m: m.update(format="v0")),
            "not a pact-direction/1 file",
        ),
        (
            lambda d, t: _copy_with(d, t, "mods.safetensors", meta_edit=lambda m: m["modules"].pop()),
            "do not match its module list",
        ),
        (
            lambda d, t: _copy_with(
                d, t, "norm.safetensors", edit=lambda x: x[[k for k in sorted(x) if k.endswith(".norm")][0]].fill_(0.0)
            ),
            "not positive",
        ),
        (lambda d, t: t / "missing.safetensors", "no such direction file"),
        # finite values whose products overflow float32 (norm 1e-38, entries 3e38): refused at load, not NaN at step 2
        (
            lambda d, t: _copy_with(
                d,
                t,
                "huge.safetensors",
                edit=lambda x: [x[k].fill_(1e-38 if k.endswith(".norm") else 3e38) for k in sorted(x)[:2]],
            ),
            "overflow float32",
        ),
    ],
)
def test_broken_direction_files_are_refused(direction_file, tmp_path, make, needle):
    with pytest.raises(DirectionError, match=needle):
        read_direction(make(direction_file, tmp_path))
