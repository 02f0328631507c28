"""Several processes (trainer/distributed.py): torchrun, accelerate, the Trainer, FSDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HELPERS, free_port
from pact_train.distributed import Ranks
from pact_train.loop import TrainConfig, TrainError, train
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess


COMMON = [
    "--method",
    "pact",
    "--lora-dropout",
    "0",
    "--lr",
    "1e-3",
    "--grad-accum",
    "3",
    "--warmup-steps",
    "1",
    "--no-progress",
    "--save-every",
    "1",
]


KEYS = ("loss", "ce", "pact_kl", "grad_norm", "lr", "tokens", "tokens_total", "epoch")


@pytest.fixture(scope="module")
def setup(tiny_model, f32_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cache = f32_cache
    return root, ["--model", tiny_model, "--cache", str(cache)] + COMMON


def launcher(nproc: int = 2) -> list[str]:
    """torchrun on this machine, its store on a free port (static rendezvous: no c10d rendezvous
    handler to shut down at exit, which --standalone uses)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
    ]


def torchrun(args: list[str], env: dict | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [*launcher(nproc), "-m", "pact_train", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def close(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-9), (ra["step"], k)


def one_process(args: list, out, **kw) -> TrainConfig:
    """COMMON's run as one process with twice the rows per micro-batch: the trajectory two ranks must follow
    (``kw`` replaces any of its settings)."""
    settings = dict(
        recipe="plain",
        batch_size=2,
        grad_accum=3,
        lora_dropout=0.0,
        lr=1e-3,
        warmup_steps=1,
        progress=False,
        plot=False,
    )
    return TrainConfig(model=args[1], cache=args[3], out=str(out), **{**settings, **kw})


@pytest.fixture(scope="module")
def one_and_two(setup):
    root, args = setup
    train(one_process(args, root / "one", padding_free=False))  # padded; two processes: padding-free
    res = torchrun(args + ["--batch-size", "1", "-o", str(root / "two"), "--report-to", "tensorboard"])
    assert res.returncode == 0, res.stderr[-3000:]
    return root, res


def test_qlora_on_two_processes_follows_one_process(setup, tmp_path):
    """--quantize nf4 under torchrun: each rank loads the same 4-bit base, DDP syncs the adapters' gradients,
    and the steps are one process's (padding-free on both sides)."""
    pytest.importorskip("bitsandbytes")
    root, args = setup
    train(one_process(args, tmp_path / "one", quantize="nf4", max_steps=2))
    res = torchrun(args + ["--batch-size", "1", "-o", str(tmp_path / "two"), "--quantize", "nf4", "--max-steps", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    close(metrics(tmp_path / "one"), metrics(tmp_path / "two"))


def test_clip_split_on_two_processes_follows_one_process(setup, tmp_path):
    """--clip split under torchrun: the two groups' gradients stay out of DDP's all-reduce and are averaged
    after the window (Ranks.mean_), then clipped each on its own: the steps are one process's,
    anchored_grad_norm included. The hard gate here anchors one row of the cache: in its window the other
    rank has no anchored row, and the ranks still all-reduce the same tensors."""
    from pact_train.stream import RowGate

    from pact_cache.format import open_cache

    root, args = setup
    cache = open_cache(args[3])
    masses = sorted(RowGate.of_cache(cache, "soft").mass(r) for r in cache.iter_rows())
    at = (masses[-1] + masses[-2]) / 2
    train(one_process(args, tmp_path / "one", clip="split", row_gate="hard", gate_at=at))
    extra = ["--clip", "split", "--row-gate", "hard", "--gate-at", repr(at)]
    res = torchrun(args + ["--batch-size", "1", "-o", str(tmp_path / "two"), *extra])
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    close(one, two)
    assert [r["anchored_grad_norm"] for r in two] == pytest.approx([r["anchored_grad_norm"] for r in one], rel=1e-5)
    assert [r["anchored_grad_norm"] > 0 for r in two].count(True) == 1 and min(r["grad_norm"] for r in two) > 0


def test_shares_are_disjoint_and_cover_every_row():
    rows = list(range(7))
    for world in (1, 2, 3, 7, 8, 10):
        shares = [Ranks(r, world).take(rows) for r in range(world)]
        real = [x for share, scale in shares if scale == 1.0 for x in share]
        assert sorted(real) == rows and len(real) == len(set(real))
        stand_ins = [share for share, scale in shares if scale == 0.0]
        assert len(stand_ins) == max(0, world - len(rows)) and all(s == rows[:1] for s in stand_ins)


def test_two_processes_follow_the_one_process_trajectory(one_and_two):
    """Two processes, padding-free (the default), against one padded process: the same steps (1e-5)."""
    root, res = one_and_two
    one, two = metrics(root / "one"), metrics(root / "two")
    assert (
        len(one) == 4 and one[-1]["tokens_total"] == two[-1]["tokens_total"]
    )  # the whole epoch, every response token once
    close(one, two)
    wa = load_file(str(root / "one" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(root / "two" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), k
    # rank 0 alone writes: one metrics line per step, one config, one adapter
    assert json.loads((root / "two" / "config.json").read_text())["processes"] == 2
    assert "data-parallel on 2 processes" in res.stderr and res.stdout.count("steps in") == 1
    # and one TensorBoard event file, rank 0's, with the logged steps
    events = list((root / "two" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "two" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in two]


def test_resume_after_every_rank_is_killed(setup, one_and_two):
    root, args = setup
    out = root / "killed"
    pids = root / "pids"
    pids.mkdir()
    env = {
        "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]),
        "PACT_TEST_KILL_AT": "2",
        "PACT_TEST_PIDS": str(pids),
    }
    res = torchrun(args + ["--batch-size", "1", "-o", str(out)], env=env)
    assert res.returncode != 0  # killed right after the checkpoint of step 2
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "adapter").exists()
    res = torchrun(args + ["--batch-size", "1", "-o", str(out), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr
    close(metrics(root / "two"), metrics(out))


def test_resuming_with_another_process_count_is_refused(setup, one_and_two):
    root, args = setup
    with pytest.raises(TrainError, match="started on 2 process.*--nproc-per-node 2"):
        train(
            TrainConfig(
                model=args[1],
                cache=args[3],
                out=str(root / "two"),
                recipe="plain",
                batch_size=1,
                grad_accum=3,
                lora_dropout=0.0,
                lr=1e-3,
                warmup_steps=1,
                progress=False,
                plot=False,
                resume=True,
            )
        )


def pact_train_reference(setup, out: Path, **kw) -> list[dict]:
    """pact-train, 1 process x 2 rows x 2 accumulation, cache order, constant lr: 4 steps."""
    root, args = setup
    train(one_process(args, out, grad_accum=2, schedule="constant", warmup_steps=0, shuffle=False, max_steps=4, **kw))
    return metrics(out)


def trainer_logged(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def same_steps(want: list[dict], logged: list[dict]) -> None:
    assert len(logged) == len(want) == 4
    for a, b in zip(want, logged):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-5
        )
        # the term under its own name, summed over both processes
        assert b["ce"] == pytest.approx(a["ce"], rel=1e-5) and b["pact_kl"] == pytest.approx(a["pact_kl"], rel=1e-5)


@pytest.mark.parametrize("clip", ["joint", "split"])
def test_trainer_on_two_processes_follows_pact_train(setup, tmp_path, clip):
    """PactTrainer under torchrun (accelerate shards the cache by rank, DDP syncs the gradients):
    4 optimizer steps of 2 processes x 1 row x 2 accumulation equal pact-train's 1 process x 2 rows
    x 2 accumulation (same rows in cache order, constant lr, AdamW): loss and grad norm, 1e-5. split:
    clip="split" with a hard gate anchoring one of the 16 rows the steps take (the window runs outside
    DDP's all-reduce, a rank without an anchored row reduces zeros): the same against pact-train's
    --clip split, anchored norm too."""
    root, args = setup
    gate = {}
    if clip == "split":
        from pact_train.stream import RowGate

        from pact_cache.format import open_cache

        cache = open_cache(args[3])
        first = list(cache.iter_rows())[:16]  # the rows of the 4 steps, in cache order
        masses = sorted(RowGate.of_cache(cache, "soft").mass(r) for r in first)
        gate = dict(clip="split", row_gate="hard", gate_at=(masses[-1] + masses[-2]) / 2)
    argv = [args[1], args[3], str(tmp_path / "hf"), "1", "2", "4"] + ([repr(gate["gate_at"])] if gate else [])
    cmd = [*launcher(), str(HELPERS / "hf_run.py"), *argv]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "hf" / "run.json").read_text()) == {"distributed_type": "MULTI_CPU", "processes": 2}
    want, logged = pact_train_reference(setup, tmp_path / "pt", **gate), trainer_logged(tmp_path / "hf")
    same_steps(want, logged)
    if gate:
        got = [r["anchored_grad_norm"] for r in logged]
        assert got == pytest.approx([r["anchored_grad_norm"] for r in want], rel=1e-5)
        assert sum(x > 0 for x in got) == 1


def test_fsdp2_gradients_equal_one_process(setup, tmp_path):
    """The loss core under FSDP2 (fully_shard on every layer and the root, 2 processes): its hooks run
    inside the sharded model's forward, so the output head is gathered when the chunks use it, in
    forward and in the recomputation of backward; gradients equal one process's (1e-5 relative)."""
    root, args = setup
    cmd = [*launcher(), str(HELPERS / "fsdp_check.py"), args[1], args[3]]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0 and "largest relative gradient difference" in res.stdout, (
        res.stdout[-2000:] + res.stderr[-3000:]
    )


def test_accelerate_launch_runs_the_same_job(setup, one_and_two, tmp_path):
    """accelerate launch --multi_gpu starts the ranks as torchrun does (here on CPU, gloo)."""
    root, args = setup
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed next to this Python")
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "--dynamo_backend",
        "no",
        "-m",
        "pact_train",
        *args,
        "--batch-size",
        "1",
        "-o",
        str(tmp_path / "acc"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data-parallel on 2 processes" in res.stderr
    close(metrics(root / "two"), metrics(tmp_path / "acc"))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0"}, "RANK=5 is outside 0..1"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=''"),
    ],
)
def test_a_broken_launcher_environment_is_one_line(env, message, monkeypatch):
    from pact_train.distributed import ranks_from_env

    from pact_cache.errors import PactError

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(PactError, match=message):
        ranks_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ranks_from_env() == Ranks()
