"""The built wheel, not the editable install every other test uses: the standard build backend
makes the sdist and the wheel; the wheel holds the two packages, their resources and entry points
and nothing else (no tests, no tools); installed alone into a fresh virtual environment it runs the
commands and a tiny build + one training step from outside the repository."""

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import CHAT_ROWS, ROOT, make_tiny_model, write_jsonl

pytest.importorskip("build")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # the sdist, then the wheel built from the sdist (so nothing but what the sdist ships can reach the wheel)
    res = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_the_wheel_holds_what_users_need_and_nothing_else(dist):
    wheel = next(dist.glob("*.whl"))
    assert next(dist.glob("*.tar.gz"))  # the sdist builds too
    names = zipfile.ZipFile(wheel).namelist()
    print(f"{wheel.name}: " + ", ".join(sorted(names)))
    tops = {n.split("/")[0] for n in names}
    assert {"pact_cache", "pact_train"} <= tops and not tops & {"trainer", "tests", "tools", "docs"}, sorted(tops)
    for need in (
        "pact_cache/resources/refusals.jsonl",
        "pact_cache/resources/benign.jsonl",
        "pact_cache/resources/demo.jsonl",
        "pact_train/__main__.py",
        "pact_train/hf.py",
        "pact_cache/card.py",
    ):
        assert need in names, need
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    for line in (
        "pact-cache = pact_cache.cli:main",
        "pact-train = pact_train.cli:main",
        "pact-eval = pact_train.cli:main_eval",
    ):
        assert line in text


def test_the_installed_wheel_runs_the_main_job(dist, tmp_path):
    """A fresh venv whose only pact-cache is the wheel (its dependencies come from this environment's
    site-packages through a path entry, which does not run this environment's editable finder)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(dist.glob("*.whl"))
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    work = tmp_path / "outside"  # not the repository: nothing there shadows the installed packages
    work.mkdir()

    def run(*args):
        r = subprocess.run(
            [str(py), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=work,
            timeout=600,
            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        )
        assert r.returncode == 0, (args, r.stderr[-3000:])
        return r.stdout

    where = run("-c", "import pact_cache, pact_train; print(pact_cache.__file__); print(pact_train.__file__)")
    assert str(ROOT) not in where and site in where, where
    assert "usage:" in run("-m", "pact_cache", "--help") and "usage:" in run("-m", "pact_train", "--help")
    model = make_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS[:6])
    run("-m", "pact_cache", "build", data, "--ref", model, "-o", tmp_path / "cache", "--no-progress")
    out = run(
        "-m",
        "pact_train",
        "--model",
        model,
        "--cache",
        tmp_path / "cache",
        "-o",
        tmp_path / "run",
        "--method",
        "pact",
        "--max-steps",
        1,
        "--batch-size",
        2,
        "--no-progress",
    )
    assert "1 steps" in out and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
