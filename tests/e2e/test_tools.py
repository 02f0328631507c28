"""The benchmark script's own paths: a random-weight model that fits caches of its tokenizer,
and small `bench.py train` and `bench.py stacks` runs (ratios printed and written as JSON)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHAT_ROWS, ROOT, write_jsonl

from pact_cache.build import BuildConfig, build
from pact_cache.models import load_tokenizer, resolve_model, tokenizer_fingerprint
from pact_cache.score import score_cache

BENCH = ROOT / "tools" / "bench.py"


@pytest.fixture
def bench(monkeypatch, capsys):
    """tools/bench.py's main() with these arguments, in this process (its imports paid once for the suite), a
    bench's variants one after the other (PACT_BENCH_IN_PROCESS); returns what it printed. The benchmarks' own way,
    a process per variant, is tested once on one variant (test_random_model_and_train_bench), and the script as a
    command by test_gpu_check_dry_run."""
    spec = importlib.util.spec_from_file_location("pact_bench_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("PACT_BENCH_IN_PROCESS", "1")

    def run(*args):
        monkeypatch.setattr(sys, "argv", [str(BENCH), *map(str, args)])  # parsed by main(); the JSON's command
        module.main()
        return capsys.readouterr().out

    return run


def test_random_model_and_train_bench(bench, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = bench(
        "random-model", "--preset", "tiny", "--tokenizer", tiny_model, "-o", tmp_path / "rand", "--device", "cpu"
    )
    assert "tiny" in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rand")
    tok = load_tokenizer(resolve_model(str(tmp_path / "rand")))
    src = load_tokenizer(resolve_model(tiny_model))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.hidden_size == 64 and model.config.vocab_size >= len(src)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(src)  # so caches built with tiny_model fit it
    with pytest.raises(SystemExit, match="already exists"):
        bench("random-model", "--preset", "tiny", "--tokenizer", tiny_model, "-o", tmp_path / "rand")

    cache = build(
        BuildConfig(str(write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS)), tiny_model, str(tmp_path / "c"), progress=False)
    ).out
    # with TOSS scores (any two models of the tokenizer will do for the cost), the bench adds a toss variant
    score_cache(cache, tiny_model, tiny_model, str(tmp_path / "scored"), device="cpu", progress=False)
    # a replay cache with the same reference and tokens adds the gated and replay rows
    from pact_cache.format import open_cache

    (tmp_path / "tokens.json").write_text(json.dumps(open_cache(cache).manifest.tokens.to_json()))
    refusals = write_jsonl(
        tmp_path / "r.jsonl", [{"prompt": f"harm {i}", "completion": "I can't help with that."} for i in range(5)]
    )
    replay = build(
        BuildConfig(
            str(refusals), tiny_model, str(tmp_path / "replay"), tokens=str(tmp_path / "tokens.json"), progress=False
        )
    ).out
    out = bench(
        "train",
        "--model",
        tmp_path / "rand",
        "--cache",
        tmp_path / "scored",
        "--batch-size",
        2,
        "--steps",
        3,
        "--warmup",
        1,
        "--device",
        "cpu",
        "--json",
        tmp_path / "r.json",
        "--replay",
        replay,
        "--replay-ratio",
        0.3,
        "--only",
        "asft,toss,str+gate+replay",
    )
    res = json.loads((tmp_path / "r.json").read_text())
    # --only: sft, pact and the live reference, and the variants named (a method that needs a direction file,
    # TOSS from the scored cache, the gated and replay rows); without it every registered method runs too
    assert set(res["runs"]) == {"sft", "pact", "asft", "toss", "str+gate+replay", "online"}
    assert "toss: memory/sft" in out and "str+gate+replay: memory/sft" in out and "asft: a random" in out
    assert res["provenance"]["commit"] and res["provenance"]["versions"]["torch"]
    # replay rows in: they take batch slots, so the windows hold other tokens than SFT's
    assert res["runs"]["str+gate+replay"]["runs"][0]["tokens"] != res["runs"]["sft"]["runs"][0]["tokens"]
    assert all(len(r["runs"][0]["step_times"]) == 3 for r in res["runs"].values())
    assert all(v > 0 for v in res["ratios"].values())
    assert "pact/online" in out
    # the benchmarks' own way: each variant in a process of its own, its peak memory measured above the libraries'
    child = subprocess.run(
        [sys.executable, str(BENCH), "_train_child", "--variant", "pact", "--cache", str(tmp_path / "scored")]
        + ["--model", str(tmp_path / "rand"), "--batch-size", "2", "--steps", "2", "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    line = next(x for x in child.stdout.splitlines() if x.startswith("BENCH_RESULT "))
    got = json.loads(line[len("BENCH_RESULT ") :])
    assert len(got["step_times"]) == 2 and got["peak_rss"] >= got["base_rss"] > 0  # the imports may set the peak

    # the training stacks side by side: TRL's SFTTrainer, pact-train sft and pact, PactTrainer
    pytest.importorskip("trl")
    out = bench(
        "stacks",
        "--model",
        tmp_path / "rand",
        "--cache",
        cache,
        "--batch-size",
        2,
        "--steps",
        3,
        "--warmup",
        1,
        "--device",
        "cpu",
        "--json",
        tmp_path / "s.json",
    )
    res = json.loads((tmp_path / "s.json").read_text())
    assert set(res["runs"]) == {"trl-sft", "sft", "pact", "trainer-pact"}
    assert all(len(r["runs"][0]["step_times"]) == 3 for r in res["runs"].values())
    assert res["ratios"]["trl-sft"]["time_over_trl"] == 1.0 and all(
        r["mem_over_trl"] > 0 for r in res["ratios"].values()
    )
    assert "TRL SFTTrainer" in out


def test_gpu_check_dry_run(tiny_model, tmp_path):
    """tools/gpu_check.sh --dry-run: every step of the GPU check on the CPU with the tiny preset, each figure one
    JSON with its provenance (so the script cannot rot while no GPU is lent)."""
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TOKENIZER": tiny_model}
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["gpu_build_dry-tiny.json", "gpu_qlora_dry-tiny.json", "gpu_train_dry-tiny.json"]
    got = {f: json.loads((tmp_path / "out" / f).read_text()) for f in files}
    assert all({"commit", "date", "device", "versions", "command"} <= set(g["provenance"]) for g in got.values())
    assert set(got["gpu_train_dry-tiny.json"]["runs"]) == {"sft", "pact", "online"}
    rows = got["gpu_qlora_dry-tiny.json"]["rows"]
    assert set(rows) == {"lora", "qlora", "qlora+paged8"}
    assert all(r["peak_estimated_bytes"] > 0 and r["peak_measured_bytes"] > 0 for r in rows.values())
    assert got["gpu_build_dry-tiny.json"]["build_tok_s"] > 0 and got["gpu_build_dry-tiny.json"]["mfu"] is None
    bad = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr


def test_padding_bench(bench, tiny_model, tmp_path):
    """bench.py padding builds its mixed-length set from SST-2-shaped rows and runs the four variants side by side."""
    reviews = [
        {
            "instruction": "Sentiment?",
            "input": " ".join(["a fine film"] * (1 + i % 5)) + f" number {i}",
            "output": "positive" if i % 2 else "negative",
        }
        for i in range(40)
    ]
    (tmp_path / "sst2.json").write_text(json.dumps(reviews))
    out = bench(
        "padding",
        "--model",
        tiny_model,
        "--data",
        tmp_path / "sst2.json",
        "--rows",
        12,
        "--batch-size",
        4,
        "--group",
        2,
        "--max-length",
        500,
        "--device",
        "cpu",
        "--json",
        tmp_path / "p.json",
    )
    res = json.loads((tmp_path / "p.json").read_text())
    v = res["variants"]
    assert set(v) == {"pact+padded", "pact", "pact+padded+grouped", "pact+grouped"} and res["rows"] == 12
    assert v["pact"]["processed_tokens"] == v["pact"]["real_tokens"] < v["pact+padded"]["processed_tokens"]
    assert (
        v["pact"]["real_tokens"] <= v["pact+padded+grouped"]["processed_tokens"] <= v["pact+padded"]["processed_tokens"]
    )
    assert res["lengths"][2] > 2 * res["lengths"][0]  # very different lengths
    assert all(x["epoch_s"] > 0 and x["peak_above_base"] > 0 for x in v.values()) and "padding-free" in out


def test_the_import_graph_has_no_cycle_and_keeps_the_layers():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert " 0 cycle(s), 0 layering violation(s)" in proc.stdout.strip().splitlines()[-1]


def test_the_layering_rule_catches_a_command_importing_a_command():
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    ig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ig)
    graph = {
        "pact_cache.score": ["pact_cache.build", "pact_cache.rows"],
        "pact_train.stream": ["pact_cache.combine"],
        "pact_cache.replay": ["pact_cache.build"],
        "pact_cache.cli": ["pact_cache.build"],
    }
    assert ig.violations(graph) == [
        "pact_cache.score imports the command module pact_cache.build",
        "pact_train.stream imports the command module pact_cache.combine",
    ]


def test_a_study_row_a_later_grid_passed_over_is_no_longer_called_chosen():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", ROOT / "tools" / "study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    rows = {
        "SFT": ("sft", None),
        "PACT lambda 1 (the paper's), default S": ("pact_default_lam1", 1.0),
        "PACT lambda 10 (chosen), default S": ("pact_default_lam10", 10.0),  # an earlier grid's choice
        "PACT lambda 30 (chosen), default S": ("pact_default_lam30", 30.0),
        "X lambda 1 (chosen)": ("x_lam1", 1.0),  # a later grid stopped below it: same group, not tried
        "X lambda 0.3 (chosen)": ("x_lam0.3", 0.3),
        "TOSS fraction 0.2 (chosen)": ("toss_mask0.2", 0.2),
        "AsFT lambda 10 (chosen)": ("asft_lam10", 10.0),
    }  # no later choice of its group: untouched
    choices = {
        "pact_default": {
            "stage": "pact_default_lam30",
            "tried": [{"stage": f"pact_default_lam{v}"} for v in (1, 3, 10, 30)],
        },
        "x": {"stage": "x_lam0.3", "tried": [{"stage": "x_lam0.3"}]},
        "toss": {"stage": "toss_mask0.1", "tried": [{"stage": "toss_mask0.1"}, {"stage": "toss_mask0.2"}]},
        "old": {"lambda": 1.0, "tried": [{"lambda": 1.0}]},
    }  # a choice recorded before stages were: ignored
    got = study.superseded(rows, choices)
    assert list(got) == [
        "SFT",
        "PACT lambda 1 (the paper's), default S",
        "PACT lambda 10 (tried), default S",
        "PACT lambda 30 (chosen), default S",
        "X lambda 1 (tried)",
        "X lambda 0.3 (chosen)",
        "TOSS fraction 0.2 (tried)",
        "AsFT lambda 10 (chosen)",
    ]
    assert list(got.values()) == list(rows.values())


def load_study():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", ROOT / "tools" / "study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_the_study_gives_device_to_every_command_that_loads_a_model(monkeypatch):
    study = load_study()
    seen = []
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, check=True: seen.append([str(c) for c in cmd]))
    cmds = [
        ["/b/pact-train", "--model", "m"],
        ["/b/pact-eval", "--model", "m"],
        ["/b/pact-cache", "build", "d", "--ref", "m"],
        ["/b/pact-cache", "tokens", "--aligned", "m"],
        ["/b/pact-cache", "replay", "--ref", "m"],
        ["/b/pact-cache", "filter", "c"],
        ["/b/pact-cache", "info", "c"],
    ]
    for c in cmds:
        study.run(c)
    assert all(s == c for s, c in zip(seen, cmds))  # auto: nothing added
    monkeypatch.setattr(study, "DEVICE", "cuda")
    seen.clear()
    for c in cmds:
        study.run(c)
    assert [s[-2:] == ["--device", "cuda"] for s in seen] == [True] * 5 + [False] * 2


def test_the_study_options_and_splits(shared_data):
    """--model/--device/--judge/--seeds parse; the splits are disjoint where they must be, the task set has 800 rows."""
    study = load_study()
    a = study.parse_args(
        ["--model", "my/model", "--device", "cuda", "--judge", "my/guard", "--seeds", "3,4", "--rows", "recipe"]
    )
    assert (a.model, a.device, a.judge, a.seeds, a.rows, a.n_task_eval) == (
        "my/model",
        "cuda",
        "my/guard",
        [3, 4],
        ["recipe"],
        800,
    )
    sp = study.Study.__new__(study.Study)
    sp.a = a
    s = sp.splits()
    key = lambda r: (r["instruction"], r.get("input", ""))  # noqa: E731
    task = {key(r) for r in s["task_eval"]}
    assert len(task) == 800
    for other in ("ft", "benign_ft", "toss_utility", "benign_eval", "benign_align"):
        assert not task & {key(r) for r in s[other]}, other
    harmful = [{r["input"] for r in s[k]} for k in ("eval_harmful", "align_harmful", "val_harmful")]
    assert not (harmful[0] & harmful[1] or harmful[0] & harmful[2] or harmful[1] & harmful[2])
    assert not {r["input"] for r in s["eval_unsafe"]} & {r["instruction"] for r in s["ft"]}
    # the larger held-out sets (tools/study/larger_sets.py): the prompts of both sources no split takes, and no
    # draw above moves with them
    more = {r["input"] for r in s["more_harmful"]}
    assert len(more) == len(s["more_harmful"]) == 300 and not more & set().union(*harmful)
    unsafe = {r["input"].strip() for r in s["more_unsafe"]}
    assert len(unsafe) == len(s["more_unsafe"]) == 260
    for other in ("eval_unsafe", "toss_degraded"):
        assert not unsafe & {r["input"].strip() for r in s[other]}, other
    assert not unsafe & {r["instruction"].strip() for r in s["ft"]}
    replay = {json.loads(line)["prompt"].strip() for line in open(ROOT / "pact_cache/resources/harmful_prompts.jsonl")}
    assert not (more | unsafe) & replay
    sp.a = study.parse_args(["--n-more-harmful", "10"])
    fewer = sp.splits()
    assert len(fewer["more_harmful"]) == 10 and all(fewer[k] == s[k] for k in s if not k.startswith("more_"))


def test_larger_sets_add_the_further_prompts_to_each_row_and_check_the_goal(shared_data, tmp_path):
    """tools/study/larger_sets.py: per row and set, the 100 prompts, the further ones and both with their Wilson
    intervals, the goal on the 100 and on both; finished evaluations are read, not rerun."""
    spec = importlib.util.spec_from_file_location("larger_sets", ROOT / "tools" / "study" / "larger_sets.py")
    ls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ls)

    def row(name, held, unsafe, more_held, more_unsafe):
        d = tmp_path / name
        for sub, k, n in (("eval", held, 100), ("unsafe", unsafe, 100), ("more_harmful", more_held, 300),
                          ("more_unsafe", more_unsafe, 260)):  # fmt: skip
            (d / sub).mkdir(parents=True)
            summary = {"model": "m", "adapter": None, "harmful_refusal": {"refusals": k, "n": n}}
            (d / sub / "summary.json").write_text(json.dumps(summary))
        return d

    def look_risky(d, refused):
        (d / "eval" / "look_risky.jsonl").write_text(
            "".join(json.dumps({"prompt": f"q{i}", "refusal": i in refused}) + "\n" for i in range(20))
        )

    ref = row("ref", 100, 100, 298, 259)
    a = row("a", 97, 94, 290, 250)  # one short on the 100 unsafe_data prompts, 344 of 360 together (>= 0.95x 359/360)
    b = row("b", 97, 96, 290, 230)  # holds on the 100, 326 of 360 together
    look_risky(ref, set(range(10)))
    look_risky(a, set(range(2, 14)))  # 12 refusals: 4 the row's alone, 2 the reference's alone
    ls.main(["--study", str(tmp_path / "study"), "--reference", str(ref), "--row", f"a={a}", "--row", f"b={b}",
             "-o", str(tmp_path / "out")])  # fmt: skip
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["rows"]["a"]["goal"] == {"100": False, "together": True}
    assert got["rows"]["b"]["goal"] == {"100": True, "together": False}
    cell = got["rows"]["a"]["unsafe_data"]["all"]
    assert (cell["refusals"], cell["n"]) == (344, 360) and cell["ci95"][0] < cell["rate"] < cell["ci95"][1]
    assert got["reference"]["held_out"]["all"]["refusals"] == 398 and got["provenance"]["commit"]
    # exact McNemar on 6 discordant prompts, 4 against 2: 2 * (1 + 6 + 15) / 64
    assert got["rows"]["a"]["look_risky"] == {
        "n": 20, "refusals": 12, "reference": 10, "only_row": 4, "only_reference": 2, "mcnemar_p": 44 / 64
    }  # fmt: skip
    assert "look_risky" not in got["rows"]["b"]  # no answers there: no pairs
    md = (tmp_path / "out.md").read_text()
    assert "| a | 12/20 | 10/20 | 4 | 2 | 0.69 |" in md
    assert "| a | held-out harmful (safe_direction.json) | 97/100 = 97.0%" in md and "**not met** / met" in md
    assert len((tmp_path / "study" / "data" / "more_unsafe.jsonl").read_text().splitlines()) == 260
    with pytest.raises(SystemExit):
        ls.main(["--study", str(tmp_path), "--reference", str(ref), "--row", "no-folder", "-o", str(tmp_path / "x")])
    (b / "eval" / "look_risky.jsonl").write_text(json.dumps({"prompt": "other", "refusal": True}) + "\n")
    with pytest.raises(SystemExit, match="not the reference's look-risky prompts"):
        ls.main(
            ["--study", str(tmp_path / "study"), "--reference", str(ref), "--row", f"b={b}", "-o", str(tmp_path / "z")]
        )
    # answers to other splits' prompts are not read as these
    with pytest.raises(SystemExit, match="holds answers to 300 prompts, .* has 10; remove"):
        ls.main(["--study", str(tmp_path / "study"), "--reference", str(ref), "--split-args=--n-more-harmful 10",
                 "-o", str(tmp_path / "y")])  # fmt: skip


def test_study_candidates_are_seeded_rows_with_their_flags(capsys):
    study = load_study()
    sp = study.Study.__new__(study.Study)
    sp.a = study.parse_args(
        ["--candidate", "r05=--replay-ratio 0.05 --replay-term ce", "--candidate", "lam1=--lambda 1"]
    )
    assert sp.seeded_rows()[2:] == [
        (
            "candidate r05: --replay-ratio 0.05 --replay-term ce",
            "cand_r05",
            None,
            ["--replay-ratio", "0.05", "--replay-term", "ce"],
        ),
        ("candidate lam1: --lambda 1", "cand_lam1", None, ["--lambda", "1"]),
    ]
    assert [r[1] for r in sp.seeded_rows()[:2]] == ["sft", "defaults"]
    assert not any(sp.only_reported(r[1]) for r in sp.seeded_rows())
    sp.a = study.parse_args(["--candidates-only", "--candidate", "lam1=--lambda 1"])
    assert [sp.only_reported(r[1]) for r in sp.seeded_rows()] == [True, True, False]
    with pytest.raises(SystemExit):
        study.parse_args(["--candidates-only"])
    assert "give the rows to run with --candidate" in capsys.readouterr().err
    for bad in ("no-equals", "a b=--lambda 1"):
        with pytest.raises(SystemExit):
            study.parse_args(["--candidate", bad])
        assert "--candidate" in capsys.readouterr().err


def test_the_seed_table_reports_the_mean_range_and_the_goal_per_seed(tmp_path):
    study = load_study()
    sp = study.Study.__new__(study.Study)
    sp.a, sp.out = study.parse_args(["--out", str(tmp_path)]), tmp_path

    def ev(h, u, b, x, acc):
        r = lambda k, n=100: {"n": n, "refusals": k, "rate": k / n}  # noqa: E731
        return {
            "harmful_refusal": r(h),
            "unsafe_refusal": r(u),
            "benign_refusal": r(b),
            "over_refusal": r(x, 120),
            "task": {"n": 800, "correct": acc, "accuracy": acc / 800},
            "train_seconds": 1.0,
        }

    evals = {("reference", "aligned reference", None): ev(100, 100, 4, 12, 120)}
    for seed, (sft, rec) in enumerate([(680, 676), (672, 670), (664, 650)]):
        evals[("harmful mix", "SFT", seed)] = ev(0, 0, 0, 1, sft)
        evals[("harmful mix", "defaults (no method flags)", seed)] = ev(100, 99 if seed else 90, 0, 5, rec)
    sp.seeds_report(evals)
    md = (tmp_path / "seeds.md").read_text()
    assert "| harmful mix | SFT | 0,1,2 | 0.0% [0.0%, 0.0%]" in md
    assert "| - | aligned reference | - | 100.0% (96.3%-100.0%)" in md  # one value: its Wilson interval
    assert "harmful mix, defaults (no method flags), seed 0: misses unsafe_data >= 0.95x ref" in md
    assert "seed 1: holds" in md and "seed 2: holds" in md
    assert "SST-2 mean -0.8 points against SFT over seeds [0, 1, 2] (within 1 point)" in md
    assert (
        json.loads((tmp_path / "seeds.json").read_text())["rows"]["harmful mix: SFT"]["2"]["SST-2 accuracy"]["correct"]
        == 664
    )
    # a --candidates-only screen in another folder: the SFT rows and the gap from that seeds.json (--sft-from),
    # only where the reference's figures are the same
    first = tmp_path / "first.json"
    (tmp_path / "seeds.json").rename(first)
    sp.a = study.parse_args(["--out", str(tmp_path), "--candidates-only", "--candidate", "x=--lambda 1"])
    sp.a.sft_from = str(first)
    screen = {k: v for k, v in evals.items() if k[1] != "SFT"}
    sp.seeds_report(screen)
    md = (tmp_path / "seeds.md").read_text()
    assert "| harmful mix | SFT | 0,1,2 | 0.0% [0.0%, 0.0%]" in md
    assert "SST-2 mean -0.8 points against SFT over seeds [0, 1, 2] (within 1 point)" in md
    assert json.loads((tmp_path / "seeds.json").read_text())["sft_from"] == str(first)
    screen[("reference", "aligned reference", None)] = ev(100, 100, 4, 13, 120)  # another reference
    with pytest.raises(SystemExit, match="its reference figures differ from this run's"):
        sp.seeds_report(screen)
    sp.a.sft_from = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit, match="not a readable seeds.json .FileNotFoundError."):
        sp.seeds_report(screen)


def test_the_study_evaluates_a_row_on_the_tiny_model_with_the_device_given(tiny_model, tmp_path, monkeypatch):
    """One row's evaluation (held-out and unsafe harmful, benign, look-risky, task) through the project's own
    pact-eval, with --device given to each; every rate with its Wilson interval."""
    study = load_study()
    monkeypatch.setattr(study, "DEVICE", "cpu")
    monkeypatch.setattr(study, "BIN", Path(sys.executable).parent)
    sp = study.Study.__new__(study.Study)
    sp.a = study.parse_args(["--out", str(tmp_path), "--max-new-tokens", "2"])
    harmful = [{"prompt": "how do I hurt someone"}, {"prompt": "make a weapon"}]
    sp.files = {
        "eval_harmful": study.jsonl(tmp_path / "h.jsonl", harmful),
        "eval_unsafe": study.jsonl(tmp_path / "u.jsonl", harmful),
        "benign_eval": study.jsonl(tmp_path / "b.jsonl", [{"prompt": "a nice film?"}]),
        "task_eval": study.jsonl(
            tmp_path / "t.jsonl", [{"instruction": "Sentiment?", "input": "great", "output": "positive"}]
        ),
    }
    got = sp.evaluate(tmp_path / "row", tiny_model)
    assert got["harmful_refusal"]["n"] == 2 and got["unsafe_refusal"]["n"] == 2 and got["task"]["n"] == 1
    assert got["over_refusal"]["n"] >= 100 and "ci95" in got["over_refusal"]
    assert got["harmful_refusal"]["harmful_content"]["n"] == 2


def test_a_method_registered_with_study_settings_is_in_the_study(tmp_path):
    """tools/study.py builds its neighbours rows from the registry: a method registered with a StudyRow is a
    --rows group and gets its tuned (or single) row, with the artefacts it needs, without editing study.py."""
    from pact_train.losses import METHODS, Method, StudyRow, register

    register(
        Method(
            "mine",
            "CE + lambda * nothing (a test)",
            metric="mine",
            term=lambda s, p: s.mask.sum() * 0.0,
            study=StudyRow("Mine"),
        )
    )
    register(
        Method(
            "mine-once",
            "one run",
            metric="mine_once",
            term=lambda s, p: s.mask.sum() * 0.0,
            study=StudyRow("Mine once", tune=False, needs=("direction",)),
        )
    )
    try:
        study = load_study()
        assert {"mine", "mine-once", "str", "constrained-sft", "asft", "toss"} <= set(study.NEIGHBOURS)
        assert {"mine", "mine-once"} <= set(study.GROUPS)
        sp = study.Study.__new__(study.Study)
        sp.a, sp.out = study.parse_args(["--out", str(tmp_path)]), tmp_path
        calls = []
        sp.stage = lambda name, fn: calls.append(("stage", name)) or {}
        sp.validate = lambda *args: {}
        rows, res = {}, {}

        def tune(key, values, stage_for):
            name, _ = stage_for(values[0])
            calls.append(("tune", key, name))
            return values[0], name

        def fine_tune(method, cache, lam, extra=()):
            calls.append(("fine_tune", method, lam, tuple(map(str, extra))))
            return lambda d: {}

        sp.neighbours(
            res, rows, tune, fine_tune, tmp_path / "aligned", tmp_path / "cache", [1.0, 3.0], {"mine", "mine-once"}
        )
        assert ("tune", "mine", "mine_lam1") in calls and rows["Mine lambda 1 (chosen)"] == ("mine_lam1", 1.0)
        assert ("stage", "asft_direction") in calls  # the artefact mine-once needs, made first
        direction = str(tmp_path / "asft_direction" / "direction.safetensors")
        assert ("fine_tune", "mine-once", None, ("--direction", direction)) in calls
        assert rows["Mine once (no lambda)"] == ("mine-once", None) and ("stage", "val_mine-once") in calls
    finally:
        METHODS.pop("mine", None)
        METHODS.pop("mine-once", None)


def test_replay_token_shares_count_the_loss_tokens_of_each_trained_mix(tiny_model, tmp_path, monkeypatch):
    """seeds.json's replay_token_shares: per (fine-tuning cache, replay cache, ratio) a run trained with, the
    tokens per row of each and the replay's share of the loss tokens, R r / (R r + (1 - R) t); a run without
    replay and a second run of the same mix add nothing."""
    from conftest import build_f32_cache

    from pact_cache.format import open_cache

    study = load_study()
    monkeypatch.setenv("PACT_CACHE_HOME", str(tmp_path / "home"))  # no --replay auto cache here
    for d in ("task", "replay"):
        (tmp_path / d).mkdir()
    task = build_f32_cache(tmp_path / "task", tiny_model)
    long_rows = [
        {"messages": [r["messages"][0], {"role": "assistant", "content": "I cannot help with that at all. " * 3}]}
        for r in CHAT_ROWS[:5]
    ]
    replay = build_f32_cache(tmp_path / "replay", tiny_model, rows=long_rows)
    tc, rc = open_cache(task), open_cache(replay)
    for run, ratio, rid in (("a", 0.05, rc.cache_id), ("b", 0.05, rc.cache_id), ("c", 0.0, None)):
        (tmp_path / "out" / run / "run").mkdir(parents=True)
        record = {"cache": task, "cache_id": tc.cache_id, "replay": replay, "replay_cache_id": rid}
        (tmp_path / "out" / run / "run" / "config.json").write_text(json.dumps({**record, "replay_ratio": ratio}))
    (got,) = study.replay_token_shares(tmp_path / "out")
    t, r = tc.num_steps / tc.num_rows, rc.num_steps / rc.num_rows
    assert r > 2 * t  # the replay's answers are the longer ones
    assert got["replay_share_of_loss_tokens"] == pytest.approx(0.05 * r / (0.05 * r + 0.95 * t), abs=1e-4)
    assert (got["task_tokens_per_row"], got["replay_tokens_per_row"]) == (round(t, 2), round(r, 2))
    assert got["example_run"] == "a" and got["replay_cache_id"] == rc.cache_id


def test_clip_budgets_sum_what_the_clip_left_of_each_step(tmp_path):
    """seeds.json's clip_budgets: per run, the sum over steps of min(1, max_grad_norm / grad_norm) (a split
    step with no task rows, grad_norm 0, counts 0), the anchored steps under --clip split, the median step
    time; runs without metrics or with a damaged config add nothing."""
    study = load_study()
    runs = {
        "joint": ({"max_grad_norm": 1.0}, [(4.0, None, 2.0), (0.5, None, 3.0), (2.0, None, 1.0)]),
        "split": ({"max_grad_norm": 2.0, "clip": "split"}, [(4.0, 0.0, 1.0), (0.0, 3.0, 5.0), (1.0, 1.0, 2.0)]),
    }
    for name, (conf, steps) in runs.items():
        d = tmp_path / name / "run"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(conf))
        lines = [
            {"grad_norm": n, "step_time_s": t, **({} if a is None else {"anchored_grad_norm": a})} for n, a, t in steps
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "broken" / "run").mkdir(parents=True)
    (tmp_path / "broken" / "run" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "broken" / "run" / "config.json").write_text("{not json")
    joint, split = study.clip_budgets(tmp_path)
    assert joint == {"run": "joint", "clip": "joint", "steps": 3, "task_step_sum": 1.8, "median_step_s": 2.0}
    assert split == {
        "run": "split",
        "clip": "split",
        "steps": 3,
        "task_step_sum": 1.5,
        "median_step_s": 2.0,
        "steps_with_anchored_rows": 2,
    }


def test_a_finished_defaults_row_trained_under_other_defaults_is_named(tmp_path):
    """recipe_drift: a run whose config.json holds, for a setting the recipe fills, another value than the same
    flags give today (the safe recipe's clip was joint before 2026-12-06) is named with the setting; a setting
    the flags gave is not the recipe's, and a run that matches gives None. The safe recipe's data-aware part is
    compared as the data chose it (the share of anchored rows config.json records, or else measured on the cache)."""
    from pact_train.config import config_record, parse_config

    study = load_study()
    args = ["--model", "m", "--cache", "c", "--seed", "1", "-o", str(tmp_path / "run")]
    (tmp_path / "run").mkdir()
    then = config_record(parse_config(args + ["--clip", "joint"]), "id")  # clip recorded joint, as the old recipe
    then["defaults"]["anchored_share"] = 0.5  # the data held rows the reference would refuse: safe's first branch
    (tmp_path / "run" / "config.json").write_text(json.dumps(then))
    assert study.recipe_drift(tmp_path / "run", args) == "clip 'joint' then, 'split' now"
    del then["clip"]  # recorded before --clip existed: joint, as a resume reads it
    (tmp_path / "run" / "config.json").write_text(json.dumps(then))
    assert study.recipe_drift(tmp_path / "run", args) == "clip 'joint' then, 'split' now"
    assert study.recipe_drift(tmp_path / "run", args[:-2] + ["(a label)"] + args[-2:]) is None  # cannot tell
    assert study.recipe_drift(tmp_path / "run", args[:-2] + ["--clip", "joint"] + args[-2:]) is None
    now = config_record(parse_config(args), "id")
    now["defaults"]["anchored_share"] = 0.5
    (tmp_path / "run" / "config.json").write_text(json.dumps(now))
    assert study.recipe_drift(tmp_path / "run", args) is None
    now["defaults"]["anchored_share"] = 0.0  # the same settings on data that look benign: today's recipe differs
    (tmp_path / "run" / "config.json").write_text(json.dumps(now))
    assert study.recipe_drift(tmp_path / "run", args) == "replay_ratio 0.05 then, 0.07 now"
    del now["defaults"]["anchored_share"]  # recorded before the recipe measured its data, and "c" is no cache
    (tmp_path / "run" / "config.json").write_text(json.dumps(now))
    assert study.recipe_drift(tmp_path / "run", args) is None  # cannot tell
