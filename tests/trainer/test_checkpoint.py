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


def test_an_edited_trainer_state_is_one_line_before_any_step(made, tmp_path, capsys):
    """trainer_state.json edited by hand: a step past what the run can reach, an integer of 31 digits, a stream
    version this pact-train does not know, optimizer groups that name other parameters or give a setting of the
    wrong kind. Each is one line naming the checkpoint, before a step is taken (the run folder is untouched); the
    intact state resumes."""
    import json
    import shutil

    run = tmp_path / "run"
    base = ("--method", "pact", "--model", made["model"], "--cache", made["q8"], "-o", run, "--batch-size", 4)
    base += ("--no-progress", "--save-every", 1)
    assert cli(capsys, train_main, *base, "--max-steps", 1)[0] == 0
    path = run / "checkpoint" / "trainer_state.json"
    good = json.loads(path.read_text())
    shutil.copy(path, tmp_path / "good.json")

    def edited(**change):
        state = json.loads((tmp_path / "good.json").read_text())
        group = state["optimizer"]["param_groups"][0]
        for key, value in change.items():
            (group if key in group else state)[key] = value
        path.write_text(json.dumps(state))
        before = snapshot(run)
        line = one_line(capsys, train_main, *base, "--max-steps", 2, "--resume")
        assert snapshot(run) == before
        return line

    assert "do not fit this run" in edited(step=10_000) and "checkpoint" in edited(step=10_000)
    assert "below 2**63" in edited(step=10**30)
    assert "stream version 99 is not one this pact-train reads" in edited(stream=99)
    n = len(good["optimizer"]["param_groups"][0]["params"])
    assert "group 0: its parameters are not the model's" in edited(params=[0] * n)
    assert "group 0: 'betas' is 'ab'" in edited(betas="ab")
    assert "group 0: 'weight_decay' is True" in edited(weight_decay=True)
    shutil.copy(tmp_path / "good.json", path)
    assert cli(capsys, train_main, *base, "--max-steps", 2, "--resume")[0] == 0
