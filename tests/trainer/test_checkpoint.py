"""Checkpoints (trainer/checkpoint.py): safetensors and JSON only, damage as one line."""

from __future__ import annotations

from hostile import cli, one_line, snapshot
from pact_train.cli import main as train_main


def test_a_truncated_checkpoint_is_one_line(made, tmp_path, capsys):
    run = tmp_path / "run"
    base = (
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        made["q8"],
        "-o",
        run,
        "--batch-size",
        4,
        "--no-progress",
        "--save-every",
        1,
    )
    assert cli(capsys, train_main, *base, "--max-steps", 1)[0] == 0
    f = run / "checkpoint" / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    before = snapshot(run)
    line = one_line(capsys, train_main, *base, "--max-steps", 2, "--resume")
    assert "checkpoint: the checkpoint is damaged" in line
    assert snapshot(run) == before
    (run / "checkpoint" / "trainer_state.json").write_text('{"step": "x"')
    assert "trainer_state.json" in one_line(capsys, train_main, *base, "--max-steps", 2, "--resume")
