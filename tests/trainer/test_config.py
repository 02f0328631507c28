"""pact-train's options come from one declaration (trainer/config.py): the parser, --config files
(YAML or a run's config.json) and the range checks all follow TrainConfig's fields."""

import json
import math
import os
from dataclasses import MISSING, fields

import pytest
from hostile import one_line, program_lines, yaml_alias_bomb
from pact_train.cli import main as train_main
from pact_train.config import RECIPE_FIELDS, TrainConfig, TrainError, check_config, parse_config
from pact_train.losses import PactParams

from pact_cache.format import open_cache


@pytest.fixture(scope="module")
def cache(f32_cache):
    return f32_cache


def metrics(out):
    return [
        {k: v for k, v in json.loads(line).items() if k != "step_time_s"}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def test_no_flags_give_the_declared_defaults():
    cfg = parse_config(["--model", "m", "--cache", "c", "-o", "o"])
    want = TrainConfig(model="m", cache="c", out="o")
    assert cfg == want and cfg.pact == PactParams()


def test_every_flag_sets_its_field(tmp_path):
    """Each option the parser has reaches the field it is declared on (a value other than the default)."""
    cfg = parse_config(
        [
            "--model",
            "m",
            "--cache",
            "c",
            "-o",
            "o",
            "--cache-id",
            "abcdef12",
            "--method",
            "str",
            "--reference",
            "online",
            "--ref-model",
            "r",
            "--token-mask",
            "0.2",
            "--lambda",
            "3",
            "--full",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lora-dropout",
            "0.1",
            "--lora-targets",
            "q_proj",
            "--epochs",
            "2",
            "--batch-size",
            "3",
            "--grad-accum",
            "2",
            "--lr",
            "1e-4",
            "--weight-decay",
            "0.01",
            "--warmup-steps",
            "5",
            "--schedule",
            "step",
            "--max-steps",
            "7",
            "--seed",
            "9",
            "--no-shuffle",
            "--shuffle-buffer",
            "64",
            "--gradient-checkpointing",
            "--logits-chunk",
            "32",
            "--save-every",
            "3",
            "--resume",
            "--merge",
            "--device",
            "cpu",
            "--no-progress",
            "--pact-t",
            "1.5",
            "--pact-n",
            "4",
            "--storage-option",
            "anon=true",
            "--row-gate",
            "soft",
            "--gate-at",
            "0.5",
            "--replay",
            "r",
            "--replay-ratio",
            "0.1",
            "--replay-term",
            "ce",
            "--clip",
            "split",
            "--report-to",
            "tensorboard",
            "--no-padding-free",
            "--group-by-length",
            "16",
            "--quantize",
            "nf4",
            "--optim",
            "paged-adamw-8bit",
            "--dry-run",
        ]
    )
    changed = {
        f.name
        for f in fields(TrainConfig)
        if getattr(cfg, f.name) != f.default and f.name not in ("model", "cache", "out")
    }
    declared = {
        f.name
        for f in fields(TrainConfig)
        if f.metadata.get("cli", True) and f.name not in ("model", "cache", "out", "direction")
    }
    assert declared <= changed  # --direction only goes with asft (checked elsewhere)
    assert cfg.lam == 3.0 and cfg.shuffle is False and cfg.progress is False and cfg.grad_checkpointing is True
    assert cfg.pact == PactParams(T=1.5, N=4) and cfg.storage_options == {"anon": True}


def test_yaml_config_equals_the_same_flags_and_flags_win(tiny_model, cache, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"model: {tiny_model}\ncache: {cache}\nmethod: pact\nbatch_size: 4\nmax_steps: 2\n"
        "lr: 1e-3   # YAML reads this as a string; it is taken as the number\n"
        "shuffle: false\nlora_dropout: 0.0\nprogress: false\nplot: false\npact:\n  T: 1.5\n  N: 4\n"
    )
    assert train_main(["--config", str(yaml_file), "-o", str(tmp_path / "a")]) == 0
    assert (
        train_main(
            [
                "--model",
                tiny_model,
                "--cache",
                cache,
                "-o",
                str(tmp_path / "b"),
                "--method",
                "pact",
                "--batch-size",
                "4",
                "--max-steps",
                "2",
                "--lr",
                "1e-3",
                "--no-shuffle",
                "--lora-dropout",
                "0",
                "--no-progress",
                "--pact-t",
                "1.5",
                "--pact-n",
                "4",
            ]
        )
        == 0
    )
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    rec = json.loads((tmp_path / "a" / "config.json").read_text())
    assert rec["lr"] == 1e-3 and rec["pact"]["T"] == 1.5 and rec["batch_size"] == 4
    cfg = parse_config(["--config", str(yaml_file), "-o", "x", "--batch-size", "2", "--pact-t", "3"])
    assert (
        cfg.batch_size == 2 and cfg.pact.T == 3.0 and cfg.pact.N == 4 and cfg.plot is False
    )  # flags win, the rest stays


def test_a_runs_config_json_reruns_it(tiny_model, cache, tmp_path):
    assert (
        train_main(
            [
                "--method",
                "pact",
                "--model",
                tiny_model,
                "--cache",
                cache,
                "-o",
                str(tmp_path / "a"),
                "--batch-size",
                "4",
                "--max-steps",
                "2",
                "--method",
                "str",
                "--lambda",
                "2",
                "--lora-dropout",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert train_main(["--config", str(tmp_path / "a" / "config.json"), "-o", str(tmp_path / "b")]) == 0
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


@pytest.mark.parametrize(
    "text, name, needle",
    [
        (
            "batch_size: 8\nbatchsize: 4\n",
            "run.yaml",
            "unknown option 'batchsize'; options are field names: model, cache",
        ),
        ("batch_size: eight\n", "run.yaml", "batch_size: 'eight' is not an integer"),
        ("batch_size: 2.5\n", "run.yaml", "batch_size: 2.5 is not an integer"),
        ("shuffle: 0\n", "run.yaml", "shuffle: 0 is not true or false"),
        ("- 1\n- 2\n", "run.yaml", "must be a mapping of option names to values, not a list"),
        ("a: [1, \n", "run.yaml", "line 2: not valid YAML"),
        ('{"lr": 1e-3,}', "config.json", "not valid JSON"),
        ("pact: {T: 1, Tau: 3}\n", "run.yaml", "pact: unknown parameter 'Tau'; they are T, T_gate"),
        ("pact: 3\n", "run.yaml", "pact must be a mapping"),
        ("lr: -1\n", "run.yaml", "--lr -1.0: must be a finite number in (0, inf)"),
        ("step_gamma: 1.5\n", "run.yaml", "step_gamma 1.5: must be a finite number in (0, 1]"),
        ("anchored_max_grad_norm: 0\n", "run.yaml", "anchored_max_grad_norm 0.0: must be a finite number in (0, inf)"),
        ("anchored_max_grad_norm: .nan\n", "run.yaml", "anchored_max_grad_norm nan: must be a finite number"),
        (
            "anchored_max_grad_norm: 0.5\nclip: joint\n",
            "run.yaml",
            "only --clip split has (this run clips jointly); give --clip split or leave it out",
        ),
        ("pact: {top_p: 0}\n", "run.yaml", "--pact-top-p 0.0: must be a finite number in (0, 1]"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, capsys, text, name, needle):
    f = tmp_path / name
    f.write_text(text)
    rc = train_main(
        ["--config", str(f), "--model", "m", "--cache", str(tmp_path / "nothing"), "-o", str(tmp_path / "o")]
    )
    err = program_lines(capsys.readouterr().err, ("pact-train",))
    assert rc == 1 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_missing_and_unreadable_config(tmp_path, capsys):
    assert train_main(["--cache", "c", "-o", "o"]) == 1
    assert "missing --model: give it as flags or in --config" in capsys.readouterr().err
    assert train_main(["--config", str(tmp_path / "none.yaml")]) == 1
    assert "--config" in capsys.readouterr().err
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00model")
    assert train_main(["--config", str(tmp_path / "bin.yaml")]) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert train_main(["--config", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, needle",
    [
        (
            lambda f: f.write_text(yaml_alias_bomb("lr: *i\n")),
            "holds more than 10,000 values once its YAML aliases are expanded",
        ),
        (lambda f: f.write_text(yaml_alias_bomb("pact: *i\n")), "holds more than 10,000 values"),
        (lambda f: f.write_text(yaml_alias_bomb("storage_options: {key: *i}\n")), "holds more than 10,000 values"),
        (
            lambda f: f.write_text("# padding\n" * 120_000 + "lr: 1.0e-3\n"),
            "is 1,200,011 bytes, more than the 1,048,576 a YAML",
        ),
        (
            lambda f: f.write_bytes(b"lr: 1.0e-3  # \xe2\x82\xac\n" * 20 + b"seed: \xff\n"),
            ":21: is not UTF-8 text (byte 366)",
        ),
        (
            lambda f: f.write_text("group_by_length: " + "9" * 400 + "\n"),
            "--group-by-length <an integer of 400 digits>: must be an integer in [0, 2147483647]",
        ),
        (
            lambda f: f.write_text("lr: " + "9" * 400 + "\n"),
            "--lr <an integer of 400 digits>: must be a finite number in (0, inf)",
        ),
        (
            lambda f: f.write_text("lr: '" + "9" * 400 + "'\n"),
            "lr: '999999999999999999999999999...9999999999999999999999999999' is not a number",
        ),
        (lambda f: f.write_text("lr: '1e400'\n"), "--lr inf: must be a finite number"),
        (
            lambda f: f.write_text("method: " + "x" * 5000 + "\n"),
            "--method 'xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxxxx': use one of",
        ),
        (
            lambda f: f.write_text("batch_size: [" + "1, " * 5000 + "1]\n"),
            "batch_size: [1, 1, 1, 1, ...] is not an integer",
        ),
        (lambda f: os.mkfifo(f), "is a FIFO, not a regular file; give the YAML or JSON config file as a file"),
    ],
)
def test_hostile_config_files_cost_nothing_and_are_one_line(tmp_path, capsys, make, needle):
    """Alias bombs, oversized, half-text, unbounded numbers and values, FIFOs: refused before anything grows, the
    value in the message cut short."""
    f = tmp_path / "run.yaml"
    make(f)
    rc = train_main(
        ["--config", str(f), "--model", "m", "--cache", str(tmp_path / "nothing"), "-o", str(tmp_path / "o")]
    )
    err = program_lines(capsys.readouterr().err, ("pact-train",))
    assert rc == 1 and len(err) == 1 and needle in err[0] and len(err[0]) < 400, err
    assert not (tmp_path / "o").exists()


def test_device_and_oversized_binary_configs(tmp_path, capsys):
    assert train_main(["--config", "/dev/zero"]) == 1
    assert "--config /dev/zero: is a device or socket, not a regular file" in capsys.readouterr().err
    big = tmp_path / "weights.safetensors"
    with open(big, "wb") as f:  # sparse: 540 MB declared, nothing read
        f.truncate(540_000_000)
    assert train_main(["--config", str(big)]) == 1
    assert (
        "is 540,000,000 bytes, more than the 1,048,576 a YAML or JSON config file may hold" in capsys.readouterr().err
    )


def test_unbounded_numbers_on_the_command_line(tmp_path, capsys):
    base = ["--model", "m", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "o")]
    assert train_main(base + ["--group-by-length", "1" + "0" * 400]) == 1
    assert (
        "--group-by-length <an integer of 401 digits>: must be an integer in [0, 2147483647]" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as e:  # past the interpreter's digit limit: argparse's own refusal, cut short
        train_main(base + ["--batch-size", "9" * 5000])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid int value: '999" in err and len(err) < 400


def test_ranges_come_from_the_declarations():
    """A value just outside each declared range is refused, naming its flag (or field)."""
    for f in fields(TrainConfig):
        m = f.metadata
        if m.get("lo") is None:
            continue
        bad = m["lo"] if m.get("lo_open") else m["lo"] - 1
        cfg = TrainConfig(model="m", cache="c", out="o", **{f.name: bad})
        with pytest.raises(TrainError, match="must be"):
            check_config(cfg)


@pytest.mark.parametrize(
    "opt, value, needle",
    [
        ("--lr", "inf", "--lr inf: must be a finite number in (0, inf)"),
        ("--lr", "nan", "--lr nan: must be a finite number"),
        ("--lr", "0", "--lr 0.0: must be a finite number in (0, inf)"),
        ("--pact-t", "0", "--pact-t 0.0: must be a finite number in (0, inf); the distillation temperature"),
        ("--pact-t-gate", "-1", "--pact-t-gate -1.0: must be a finite number in (0, inf)"),
        ("--pact-top-p", "1.5", "--pact-top-p 1.5: must be a finite number in (0, 1]"),
        ("--pact-alpha", "nan", "--pact-alpha nan: must be a finite number"),
        ("--pact-boost", "-1", "--pact-boost -1.0"),
        ("--pact-n", "-1", "--pact-n -1: must be an integer in [0, 2147483647]"),
        ("--weight-decay", "-1", "--weight-decay -1.0: must be a finite number in [0, inf)"),
        ("--lambda", "inf", "--lambda inf"),
        ("--lora-dropout", "1", "--lora-dropout 1.0: must be a finite number in [0, 1)"),
        ("--save-every", "0", "--save-every 0: must be an integer in [1, 2147483647]"),
        ("--shuffle-buffer", "0", "--shuffle-buffer 0: must be an integer in [1, 2147483647]"),
        ("--batch-size", "0", "--batch-size 0"),
        ("--warmup-steps", "-2", "--warmup-steps -2: must be an integer in [-1, 2147483647]; -1 means 3% of the run"),
        ("--seed", "-1", "--seed -1"),
        ("--max-steps", "0", "--max-steps 0"),
        ("--lr", "abc", "argument --lr: invalid float value: 'abc'"),
    ],
)
def test_train_options_are_range_checked(made, tmp_path, capsys, opt, value, needle):
    out = tmp_path / "run"
    code = 2 if value == "abc" else 1
    line = one_line(
        capsys,
        train_main,
        "--method",
        "pact",
        "--model",
        made["model"],
        "--cache",
        made["q8"],
        "-o",
        out,
        opt,
        value,
        code=code,
    )
    assert needle in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------- the defaults: the study's recipe


def test_without_a_method_the_run_is_the_recipe_and_a_method_alone_is_plain():
    cfg = parse_config(["--model", "m", "--cache", "c", "-o", "o"])
    assert (cfg.recipe, cfg.method, cfg.lam, cfg.row_gate, cfg.gate_at, cfg.replay, cfg.replay_ratio, cfg.clip) == (
        "safe",
        "str",
        3.0,
        "hard",
        0.9,
        "auto",
        0.05,
        "split",
    )
    assert cfg.defaults_record()["filled"] == ["method", "lam", "row_gate", "replay", "replay_ratio", "clip"]
    paper = parse_config(["--model", "m", "--cache", "c", "-o", "o", "--method", "pact"])
    assert (paper.recipe, paper.method, paper.lam, paper.row_gate, paper.replay, paper.mix_ratio, paper.clip) == (
        "plain",
        "pact",
        1.0,
        "none",
        None,
        0.0,
        "joint",
    )
    # a flag given always wins; what is left comes from the recipe
    mine = parse_config(["--model", "m", "--cache", "c", "-o", "o", "--lambda", "1", "--replay", "none"])
    assert (mine.method, mine.lam, mine.row_gate, mine.replay, mine.replay_ratio) == ("str", 1.0, "hard", None, None)
    assert mine.clip == "split"
    check_config(mine)
    sft = parse_config(["--model", "m", "--cache", "c", "-o", "o", "--recipe", "safe", "--method", "sft"])
    # SFT takes the replay, not the gate (nor the split clip, which needs one)
    assert (sft.row_gate, sft.replay, sft.replay_ratio, sft.clip) == ("none", "auto", 0.05, "joint")
    check_config(sft)
    ungated = parse_config(["--model", "m", "--cache", "c", "-o", "o", "--row-gate", "none"])
    assert (ungated.method, ungated.clip) == ("str", "joint") and "clip" not in ungated.from_recipe
    check_config(ungated)
    joint = parse_config(["--model", "m", "--cache", "c", "-o", "o", "--clip", "joint"])
    assert joint.clip == "joint" and "clip" not in joint.from_recipe
    joint.anchored_max_grad_norm = 0.25  # the anchored rows' own clip: split's only
    with pytest.raises(TrainError, match="only --clip split has .this run clips jointly.; give --clip split"):
        check_config(joint)
    assert TrainConfig(model="m", cache="c", out="o", method="pact").recipe == "plain"  # the Python API alike


def test_a_run_without_replay_rows_reruns_from_its_config_json_without_them(tmp_path):
    """--replay none is written out as "none": read back as --config, a null would be a setting left to the recipe,
    and the safe recipe would add --replay auto to a run that had none. A config.json recorded before (null, with
    the run's cache_id) reads as none too; a --config file of the user's keeps null as "left to the recipe"."""
    from pact_train.config import config_record

    run = parse_config(["--model", "m", "--cache", "c", "-o", "o", "--replay", "none"])
    assert run.replay is None and run.mix_ratio == 0.0
    rec = config_record(run, "ab" * 32)
    assert rec["replay"] == "none"
    for replay in ("none", None):
        path = tmp_path / f"config_{replay}.json"
        path.write_text(json.dumps({**rec, "replay": replay}))
        again = parse_config(["--config", str(path)])
        assert again.replay is None and again.mix_ratio == 0.0 and "replay" not in again.left_to_recipe
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"model": "m", "cache": "c", "out": "o", "replay": None}))
    assert parse_config(["--config", str(mine)]).replay == "auto"
    with_replay = config_record(parse_config(["--model", "m", "--cache", "c", "-o", "o"]), "ab" * 32)
    assert with_replay["replay"] == "auto"


def test_the_safe_benign_recipe_and_its_look_alike_replay(tmp_path, capsys):
    """--recipe safe-benign: the safe recipe plus the look-alikes' answers in --replay auto (refusals too), every
    replay row on the anchor alone, the anchored rows' own clip at 0.5; each filled only where it applies, and the
    combinations with no effect or a harmful one refused in one line."""
    base = ["--model", "m", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "o")]
    cfg = parse_config(base + ["--recipe", "safe-benign"])
    check_config(cfg)
    got = (cfg.method, cfg.lam, cfg.row_gate, cfg.replay, cfg.replay_ratio, cfg.replay_term, cfg.replay_borderline)
    assert got == ("str", 3.0, "hard", "auto", 0.07, "term", "all")
    assert (cfg.clip, cfg.anchored_max_grad_norm) == ("split", 0.5)
    assert cfg.defaults_record()["filled"] == list(RECIPE_FIELDS)
    assert "look_alike_cut07" in cfg.defaults_record()["source"]
    # the safe recipe leaves them as they were until the data are measured: at most 1% of the rows anchored, the
    # look-alike settings join (each left to the recipe); above, nothing changes; safe-mixed never measures
    safe = parse_config(base)
    assert (safe.replay_term, safe.replay_borderline, safe.anchored_max_grad_norm) == ("both", "none", None)
    assert safe.fits_to_data and not parse_config(base + ["--recipe", "safe-mixed"]).fits_to_data
    assert safe.fit_to_data(0.0101) == () and safe.replay_term == "both" and safe.anchored_share == 0.0101
    assert safe.replay_ratio == 0.05
    for share in (0.0, 0.01):
        fitted = parse_config(base)
        took = ("replay_ratio", "replay_term", "replay_borderline", "anchored_max_grad_norm")
        assert fitted.fit_to_data(share) == took
        assert tuple(getattr(fitted, k) for k in took) == (0.07, "term", "all", 0.5)
        assert fitted.defaults_record()["filled"] == list(RECIPE_FIELDS)
        assert fitted.defaults_record()["anchored_share"] == share
        check_config(fitted)
    (tmp_path / "cap.yaml").write_text("anchored_max_grad_norm: 2\n")
    mine = parse_config(
        base + ["--replay-term", "both", "--replay-ratio", "0.05", "--config", str(tmp_path / "cap.yaml")]
    )
    assert mine.fit_to_data(0.0) == ()  # given: ratio, term and cap; the look-alikes' refusals need the term
    assert (mine.replay_term, mine.replay_borderline, mine.anchored_max_grad_norm) == ("both", "none", 2.0)
    # a replay cache given: its look-alikes are what its maker put in; no replay: no replay term either
    given = parse_config(base + ["--recipe", "safe-benign", "--replay", str(tmp_path / "r")])
    assert (given.replay_term, given.replay_borderline) == ("term", "none")
    bare = parse_config(base + ["--recipe", "safe-benign", "--replay", "none"])
    assert (bare.replay, bare.replay_term, bare.replay_borderline) == (None, "both", "none")
    check_config(bare)
    joint = parse_config(base + ["--recipe", "safe-benign", "--clip", "joint"])
    assert joint.anchored_max_grad_norm is None
    check_config(joint)
    both = parse_config(base + ["--recipe", "safe-benign", "--replay-term", "both"])
    assert both.replay_borderline == "none" and "replay_borderline" not in both.from_recipe  # refusals need term
    for extra, needle in (
        (
            ["--replay-term", "both", "--replay-borderline", "all"],
            "--replay-borderline all: keeps the reference's refusals of benign look-alike",
        ),
        (["--replay", str(tmp_path / "r"), "--replay-borderline", "all"], "--replay-borderline all: chooses the look"),
    ):
        assert train_main(base + ["--recipe", "safe-benign", *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    with pytest.raises(SystemExit):  # argparse's choices
        train_main(base + ["--replay-borderline", "some"])
    assert "invalid choice: 'some'" in capsys.readouterr().err


def test_a_run_with_no_method_flags_trains_the_recipe_and_says_so_in_config_json(
    tiny_model, cache, tmp_path, monkeypatch, capsys
):
    """--replay auto: the policy is the cache's reference, so it answers the package's prompts itself before the
    first step; the replay cache is kept in the cache home and the next run reuses it."""
    import pact_cache.answers as answers

    monkeypatch.setenv("PACT_CACHE_HOME", str(tmp_path / "home"))
    calls = []

    def refuses(model, tok, prompts, return_finished=False, **kw):  # a random tiny model refuses nothing by itself
        calls.append(len(prompts))
        return ["I'm sorry, I can't help with that."] * len(prompts), [True] * len(prompts)

    monkeypatch.setattr(answers, "generate", refuses)
    args = [
        "--model",
        tiny_model,
        "--cache",
        cache,
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--lora-dropout",
        "0",
        "--no-progress",
    ]
    # a random tiny reference puts almost no mass on the safety tokens: no row anchored, the data look benign, so
    # the safe recipe's look-alike settings join and --replay auto answers the look-alike prompts too
    assert train_main(args + ["-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "--replay auto: the policy is the cache's reference" in err and "300 of 300 answers kept" in err
    assert "and 161 of 161 answers to look-alike prompts (--replay-borderline all)" in err
    n = open_cache(cache).num_rows
    assert f"the safe recipe: 0 of {n} rows (0.0%) anchored (step-0 refusal mass >= 0.9)" in err
    assert "at most 1%: the data look benign to the reference, so also --replay-ratio 0.07, --replay-term term, " in err
    rec = json.loads((tmp_path / "a" / "config.json").read_text())
    got = ("method", "lam", "row_gate", "replay", "replay_ratio", "clip", "recipe", "replay_term", "replay_borderline")
    assert tuple(rec[k] for k in got) == ("str", 3.0, "hard", "auto", 0.07, "split", "safe", "term", "all")
    assert rec["anchored_max_grad_norm"] == 0.5 and rec["defaults"]["anchored_share"] == 0.0
    assert rec["defaults"]["filled"] == list(RECIPE_FIELDS)
    assert "docs/study.md" in rec["defaults"]["source"] and rec["replay_cache_id"]
    assert train_main(args + ["-o", str(tmp_path / "b")]) == 0
    assert calls == [300 + 161]  # made once, reused
    assert json.loads((tmp_path / "b" / "config.json").read_text())["replay_cache_id"] == rec["replay_cache_id"]
    assert (
        train_main(["--config", str(tmp_path / "a" / "config.json"), "-o", str(tmp_path / "c")]) == 0
    )  # config.json reruns it
    assert metrics(tmp_path / "a") == metrics(tmp_path / "c")
    # every row anchored (--gate-at 0): rows the reference would refuse are in the data, so the harmful-data
    # settings: the refusals alone replayed (their own replay cache), with their cross-entropy, no anchored cap
    capsys.readouterr()
    assert train_main(args + ["--gate-at", "0", "-o", str(tmp_path / "d")]) == 0
    assert calls == [300 + 161, 300]
    assert f"{n} of {n} rows (100.0%) anchored" in capsys.readouterr().err
    mixed = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (mixed["replay_borderline"], mixed["replay_term"], mixed["anchored_max_grad_norm"]) == ("none", "both", None)
    assert mixed["defaults"]["filled"] == ["method", "lam", "row_gate", "replay", "replay_ratio", "clip"]
    assert mixed["replay_cache_id"] != rec["replay_cache_id"] and mixed["defaults"]["anchored_share"] == 1.0


def test_replay_auto_needs_the_policy_to_be_the_reference(tiny_base_model, cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACT_CACHE_HOME", str(tmp_path / "home"))
    line = one_line(
        capsys, train_main, "--model", tiny_base_model, "--cache", cache, "-o", str(tmp_path / "o"), "--no-progress"
    )
    assert "--replay auto" in line and "is not the reference" in line and "pact-cache replay --ref" in line
    assert not (tmp_path / "o").exists()


def test_gate_at_goes_with_the_hard_gate_only(tmp_path, capsys):
    """An option with no effect in the combination given is refused: on the command line, in a config file; a run
    folder's config.json from before (gate_at 0.9 beside row_gate none) still reads."""
    base = ["--model", "m", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "o")]
    for extra in (["--method", "pact"], ["--row-gate", "none"], ["--row-gate", "soft", "--method", "str"]):
        assert train_main(base + extra + ["--gate-at", "0.8"]) == 1
        assert "--gate-at 0.8: is the hard row gate's threshold, and with --row-gate" in capsys.readouterr().err
    check_config(parse_config(base + ["--gate-at", "0.8"]))  # the safe recipe's gate is hard
    assert parse_config(base).gate_at == 0.9 and parse_config(base + ["--method", "pact"]).gate_at is None
    f = tmp_path / "run.yaml"
    f.write_text("row_gate: soft\nmethod: str\ngate_at: 0.5\n")
    assert train_main(base + ["--config", str(f)]) == 1
    assert (
        "--gate-at 0.5: is the hard row gate's threshold, and with --row-gate soft there is none"
        in capsys.readouterr().err
    )
    f.write_text("row_gate: none\nmethod: pact\ngate_at: 0.9\n")  # what config.json recorded before
    cfg = parse_config(base + ["--config", str(f)])
    check_config(cfg)
    assert cfg.gate_at is None


def test_lr_schedules():
    """Schedule.at, as the window loop reads it from the options (linear warmup, then the schedule)."""

    def at(c, *args):
        return c.loop_settings().schedule.at(*args)

    c = TrainConfig(model="", cache="", out="", lr=1.0, warmup_steps=2, schedule="cosine")
    assert [at(c, s, 10, 5) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert at(c, 9, 10, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    c = TrainConfig(model="", cache="", out="", lr=1.0, warmup_steps=0, schedule="step")
    assert [at(c, s, 20, 5) for s in (0, 4, 5, 10)] == [1.0, 1.0, 0.85, 0.85**2]
    c = TrainConfig(model="", cache="", out="", lr=2.0, warmup_steps=-1, schedule="linear")
    assert at(c, 0, 100, 10) == pytest.approx(2.0 / 3) and at(c, 99, 100, 10) == pytest.approx(2.0 * (1 - 96 / 97))


def test_each_stage_reads_a_view_of_the_options_with_no_default_of_its_own():
    """PolicySettings, StartSettings, Outputs and LoopSettings take every value from TrainConfig's same-named field
    (one source): a view declares no default, and each of its fields is a TrainConfig field (or computed)."""

    from pact_train.config import LoopSettings, Outputs, PolicySettings, StartSettings

    names = {f.name for f in fields(TrainConfig)}
    computed = {LoopSettings: {"schedule"}, PolicySettings: {"loss"}, StartSettings: set(), Outputs: set()}
    for view, extra in computed.items():
        for f in fields(view):
            assert f.default is MISSING and f.default_factory is MISSING, (view.__name__, f.name)
            assert f.name in names or f.name in extra, (view.__name__, f.name)
    c = TrainConfig(model="m", cache="c", out="o", lora_r=4, lr=0.5, epochs=3, merge=True, quantize="nf4", seed=7)
    p, s, o = c.policy_settings(), c.start_settings(), c.outputs()
    assert (p.model, p.cache, p.lora_r, p.seed, p.quantize, p.targets) == ("m", "c", 4, 7, "nf4", ["q_proj", "v_proj"])
    assert p.loss == c.loss_params()
    assert (s.lr, s.epochs, s.optim) == (0.5, 3, "adamw") and (o.merge, o.quantize, o.full) == (True, "nf4", False)


def test_a_run_record_from_before_the_split_clip_reruns_with_the_joint_clip(tmp_path):
    """--config with a run folder's config.json recorded before --clip existed: that run clipped jointly, so the
    rerun does too; a config file that is not a run record (no cache_id) still takes the recipe's clip."""
    from pact_train.config import config_record

    rec = config_record(parse_config(["--model", "m", "--cache", "c", "-o", "o"]), "abc")
    del rec["clip"]
    (tmp_path / "config.json").write_text(json.dumps(rec))
    assert parse_config(["--config", str(tmp_path / "config.json"), "-o", str(tmp_path / "again")]).clip == "joint"
    (tmp_path / "mine.yaml").write_text("model: m\ncache: c\n")
    assert parse_config(["--config", str(tmp_path / "mine.yaml"), "-o", str(tmp_path / "b")]).clip == "split"
