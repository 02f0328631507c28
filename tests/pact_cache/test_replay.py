"""pact-cache replay (pact_cache/replay.py): the reference's own refusals, judged and cached with its
tokens; the package's prompt sets (default replay prompts, look-risky benign prompts)."""

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_DATA, write_jsonl
from hostile import one_line

import pact_cache.answers as answers
from pact_cache.cli import main as cache_main
from pact_cache.errors import OutputExistsError, PactError
from pact_cache.format import open_cache
from pact_cache.models import model_fingerprint, resolve_model
from pact_cache.replay import (
    ReplayConfig,
    borderline_prompts_path,
    default_prompts_path,
    judge_answers,
    look_risky_path,
    make_replay,
)

PROMPTS = [{"prompt": f"Tell me how to break into house number {i}."} for i in range(6)]
# what the "reference" answers, in prompt order: (text, finished by itself)
CANNED = [
    ("I'm sorry, I can't help with that.", True),
    ("I cannot assist with breaking into homes.", True),
    ("Sure, first find an open window and", False),
    ("I won't help with this.", True),
    ("", True),
    ("I can't help with that, but here is a long", False),
]


@pytest.fixture
def canned(monkeypatch):
    """The reference's answers replaced by CANNED (a random tiny model refuses nothing); records the calls."""
    calls = []

    def fake(model, tok, prompts, max_new_tokens=64, batch_size=16, device="cpu", progress=True, return_finished=False):
        calls.append(prompts)
        got = [CANNED[i % len(CANNED)] for i in range(len(prompts))]
        return ([t for t, _ in got], [f for _, f in got]) if return_finished else [t for t, _ in got]

    monkeypatch.setattr(answers, "generate", fake)
    return calls


def tokens_of(cache: str, path) -> str:
    path.write_text(json.dumps(open_cache(cache).manifest.tokens.to_json()))
    return str(path)


def replay_config(ref: str, cache: str, tmp_path, prompts, **more) -> ReplayConfig:
    """make_replay's settings for ``prompts`` with the fine-tuning cache's tokens, into tmp_path/replay, every answer
    to tmp_path/answers.jsonl."""
    return ReplayConfig(
        ref=ref,
        out=str(tmp_path / "replay"),
        tokens=tokens_of(cache, tmp_path / "t.json"),
        prompts=str(prompts),
        answers=str(tmp_path / "answers.jsonl"),
        progress=False,
        **more,
    )


def test_the_refusals_are_kept_and_cached_with_the_references_tokens(tiny_model, f32_cache, canned, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    res = make_replay(replay_config(tiny_model, f32_cache, tmp_path, prompts))
    assert (res.prompts, res.refusals, res.kept) == (6, 4, 3) and res.warning is None
    assert res.dropped == {"empty": 1, "not a refusal": 1, "unfinished": 1}
    cache = open_cache(res.out)
    main = open_cache(f32_cache)
    assert cache.cache_id == res.cache_id and cache.num_rows == 3
    assert cache.manifest.tokens == main.manifest.tokens  # the fine-tuning cache's safety tokens
    # its source is the prompts answered, not the temporary file the rows were cached from
    assert cache.manifest.dataset.source == f"pact-cache replay: the refusals of {tiny_model} to {prompts}"
    assert (
        f"pact-cache replay: the refusals of {tiny_model} to {prompts}"
        in (tmp_path / "replay" / "README.md").read_text()
    )
    assert (
        dict(cache.manifest.reference.weights_sha256) == model_fingerprint(resolve_model(tiny_model))["weights_sha256"]
    )
    from pact_cache.models import load_tokenizer

    tok = load_tokenizer(resolve_model(tiny_model))
    texts = sorted(
        tok.decode(r.input_ids[r.response_start :], skip_special_tokens=True).strip() for r in cache.iter_rows()
    )
    assert texts == sorted([CANNED[0][0], CANNED[1][0], CANNED[3][0]])
    from pact_train.stream import Replay

    Replay.of(main, cache, 0.1, seed=0)  # pact-train --replay takes it beside the fine-tuning cache
    recs = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in recs] == [None, None, "not a refusal", None, "empty", "unfinished"]
    assert sum(r["kept"] for r in recs) == 3


def test_a_prompt_too_long_to_cache_or_answer_is_not_answered(tiny_model, f32_cache, canned, tmp_path, capsys):
    """Bounded work: a prompt of --max-length tokens or more (the build would skip its row), or one the model's
    positions cannot hold with the answer (the tiny model reads 512), is never given to the model; it is recorded
    as "prompt too long" and the other prompts are replayed as before."""
    # with the tiny model's template: PROMPTS 71 tokens; 40 x "Tell me " 359 (fits 512 positions with 128 new tokens,
    # not --max-length 300); 50 x 445 (under the default --max-length 2048, but not 512 positions with the answer)
    longer, too_long = {"prompt": "Tell me " * 40}, {"prompt": "Tell me " * 50}
    prompts = write_jsonl(tmp_path / "p.jsonl", [too_long, *PROMPTS, longer])
    cfg = replay_config(tiny_model, f32_cache, tmp_path, prompts, max_length=300)
    res = make_replay(cfg)
    assert [len(c) for c in canned] == [6]  # one generation call, without the two prompts that do not fit
    assert canned[0][0][-1]["content"] == PROMPTS[0]["prompt"]
    assert (res.prompts, res.refusals, res.kept) == (8, 4, 3)
    assert res.dropped == {"prompt too long": 2, "empty": 1, "not a refusal": 1, "unfinished": 1}
    recs = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in recs] == ["prompt too long", None, None, "not a refusal", None, "empty"] + [
        "unfinished",
        "prompt too long",
    ]
    assert recs[0]["answer"] == "" and not recs[0]["kept"]
    err = capsys.readouterr().err
    assert "2 of 8 prompts not answered" in err and "does not look aligned" not in err
    with pytest.raises(PactError, match=r"none of its 1 answers .*\(1 prompt too long\).*shorten the prompts"):
        make_replay(
            ReplayConfig(
                ref=tiny_model,
                out=str(tmp_path / "r2"),
                tokens=cfg.tokens,
                prompts=str(write_jsonl(tmp_path / "q.jsonl", [too_long])),
                progress=False,
            )
        )
    assert len(canned) == 1 and not (tmp_path / "r2").exists()
    assert "does not look aligned" not in capsys.readouterr().err  # no answer, so nothing said of its refusals


def test_the_default_prompt_set_is_used_and_a_reference_that_rarely_refuses_is_warned(
    tiny_model, f32_cache, monkeypatch, tmp_path, capsys
):
    def mostly_complies(model, tok, prompts, return_finished=False, **kw):
        got = ["I can't help with that." if i % 5 == 0 else "Sure, here is how." for i in range(len(prompts))]
        return (got, [True] * len(got)) if return_finished else got

    monkeypatch.setattr(answers, "generate", mostly_complies)
    res = make_replay(
        ReplayConfig(
            ref=tiny_model, out=str(tmp_path / "r"), tokens=tokens_of(f32_cache, tmp_path / "t.json"), progress=False
        )
    )
    assert res.prompts == 300 and res.kept == 60  # the package's 300 prompts
    assert open_cache(res.out).manifest.dataset.source.endswith(" to builtin:harmful_prompts.jsonl")
    assert res.warning and "does not look aligned" in res.warning
    assert "does not look aligned" in capsys.readouterr().err
    # a reference that refuses nothing: no cache, one line that says why
    monkeypatch.setattr(
        answers, "generate", lambda m, t, p, return_finished=False, **kw: (["Sure."] * len(p), [True] * len(p))
    )
    with pytest.raises(PactError, match="none of its 300 answers can be replayed.*300 not a refusal.*aligned model"):
        make_replay(ReplayConfig(ref=tiny_model, out=str(tmp_path / "r2"), progress=False))
    assert not (tmp_path / "r2").exists()


def test_nothing_existing_is_overwritten_and_a_failed_build_leaves_nothing(tiny_model, canned, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    with pytest.raises(OutputExistsError, match="not an empty folder"):
        make_replay(ReplayConfig(ref=tiny_model, out=str(taken), progress=False))
    (tmp_path / "a.jsonl").write_text("mine")
    with pytest.raises(OutputExistsError, match="--answers"):
        make_replay(
            ReplayConfig(ref=tiny_model, out=str(tmp_path / "new"), answers=str(tmp_path / "a.jsonl"), progress=False)
        )
    assert canned == []  # refused before any answer was generated
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"format": "pact-tokens/1", "ids": [10**6], "weights": [1.0], "method": "test"}))
    with pytest.raises(PactError):
        make_replay(
            ReplayConfig(
                ref=tiny_model,
                out=str(tmp_path / "out"),
                tokens=str(bad),
                prompts=str(write_jsonl(tmp_path / "p.jsonl", PROMPTS)),
                progress=False,
            )
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def replay_with_look_alikes(
    ref: str, cache: str, tmp_path, borderline: str, answers_file: str | None = None, keep: str = "helpful"
):
    """make_replay of PROMPTS with ``borderline`` look-alikes, the fine-tuning cache's tokens, into tmp_path/replay."""
    return make_replay(
        ReplayConfig(
            ref=ref,
            out=str(tmp_path / "replay"),
            tokens=tokens_of(cache, tmp_path / "t.json"),
            prompts=str(write_jsonl(tmp_path / "p.jsonl", PROMPTS)),
            borderline=borderline,
            borderline_keep=keep,
            answers=answers_file,
            progress=False,
        )
    )


def test_borderline_prompts_keep_the_answers_that_are_not_refusals(tiny_model, f32_cache, canned, tmp_path):
    """--borderline: the look-alike prompts' answers join the cache where the reference did *not* refuse, finished
    and non-empty; the refusal counts and the aligned-looking check stay about the harmful prompts alone."""
    look_alikes = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"How do I kill process {i}?"} for i in range(6)])
    res = replay_with_look_alikes(tiny_model, f32_cache, tmp_path, str(look_alikes), str(tmp_path / "answers.jsonl"))
    # the canned answers run on across both sets: the look-alikes get CANNED again, in order
    assert (res.prompts, res.refusals, res.kept) == (6, 4, 3)
    assert (res.borderline_prompts, res.borderline_kept) == (6, 0)  # CANNED's only answer that helps is unfinished
    assert res.borderline_dropped == {"a refusal": 4, "unfinished": 1, "empty": 1}
    recs = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r.get("set") for r in recs] == [None] * 6 + ["borderline"] * 6
    assert open_cache(res.out).num_rows == 3


def test_borderline_keep_all_caches_the_look_alikes_refusals_too(tiny_model, f32_cache, canned, tmp_path):
    """--borderline-keep all (for --replay-term term): every non-empty look-alike answer joins, refusals included,
    and one cut off at the answer length as its prefix (its rows are trained on the anchor alone; dropping them would
    drop the long helpful answers); the harmful prompts are judged as before, a cut-off refusal dropped; a value
    outside the choices is refused before any work."""
    look_alikes = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"How do I kill process {i}?"} for i in range(6)])
    res = replay_with_look_alikes(tiny_model, f32_cache, tmp_path, str(look_alikes), keep="all")
    assert (res.prompts, res.refusals, res.kept, res.dropped) == (
        6,
        4,
        3,
        {"empty": 1, "not a refusal": 1, "unfinished": 1},
    )
    # CANNED: refusals at 0, 1, 3 (finished) and 5 (unfinished); 2 unfinished; 4 empty
    assert (res.borderline_kept, res.borderline_dropped) == (5, {"empty": 1})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    said = [tok.decode(r.input_ids[r.response_start :]) for r in open_cache(res.out).iter_rows()]
    assert len(said) == 8
    for i in (2, 5):  # the cut-off look-alike answers join as the prefixes the reference gave (once: the harmful
        assert sum(a.startswith(CANNED[i][0]) for a in said) == 1  # set's same answers are dropped, 2 helps, 5 cut)
    with pytest.raises(PactError, match="--borderline-keep 'some': use one of helpful, all"):
        make_replay(ReplayConfig(ref=tiny_model, out=str(tmp_path / "r2"), borderline_keep="some", progress=False))
    with pytest.raises(PactError, match="--borderline-keep: .*give --borderline"):
        make_replay(ReplayConfig(ref=tiny_model, out=str(tmp_path / "r2"), borderline_keep="all", progress=False))
    assert not (tmp_path / "r2").exists()


def test_borderline_answers_that_help_are_cached(tiny_model, f32_cache, monkeypatch, tmp_path):
    def answer(model, tok, prompts, return_finished=False, **kw):
        got = ["I can't help with that." if "break into" in p[-1]["content"] else "Press Ctrl+C." for p in prompts]
        return (got, [True] * len(got)) if return_finished else got

    monkeypatch.setattr(answers, "generate", answer)
    res = replay_with_look_alikes(tiny_model, f32_cache, tmp_path, "default")
    n = len(borderline_prompts_path().read_text().splitlines())
    assert (res.kept, res.borderline_prompts, res.borderline_kept, res.borderline_dropped) == (6, n, n, {})
    assert open_cache(res.out).num_rows == 6 + n and res.to_json()["borderline_kept"] == n
    assert open_cache(res.out).manifest.dataset.source.endswith(
        "p.jsonl, look-alike answers of builtin:borderline_prompts.jsonl (helpful)"
    )
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(PactError, match="--borderline .*holds no prompts"):
        make_replay(ReplayConfig(ref=tiny_model, out=str(tmp_path / "r2"), borderline=str(empty), progress=False))


def test_a_guard_drops_refusals_it_calls_unsafe_or_cannot_read():
    class Guard:
        def verdicts(self, pairs, progress=False):
            return [False, True, None][: len(pairs)]

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    recs = judge_answers(
        prompts,
        ["I can't.", "I can't, but here: step 1", "I won't.", "Sure"],
        [True] * 4,
        answers.KeywordJudge(),
        Guard(),
    )
    assert [(r["kept"], r["reason"]) for r in recs] == [
        (True, None),
        (False, "guard: unsafe"),
        (False, "guard: unreadable"),
        (False, "not a refusal"),
    ]


def test_the_command_line(tiny_model, f32_cache, canned, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = [
        "replay",
        "--ref",
        tiny_model,
        "--tokens",
        tokens_of(f32_cache, tmp_path / "t.json"),
        "--prompts",
        str(prompts),
        "--no-progress",
        "--json",
    ]
    assert cache_main(args + ["-o", str(tmp_path / "r")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] == 3 and summary["refusal_rate"] == pytest.approx(4 / 6) and summary["dropped"]["empty"] == 1
    assert "exists and is not an empty folder" in one_line(capsys, cache_main, *args, "-o", str(tmp_path / "r"))
    assert cache_main(args[:-1] + ["--borderline", str(prompts), "-o", str(tmp_path / "rb")]) == 0
    assert "; borderline: 0 of 6 look-alike prompts kept (answered without a refusal)" in capsys.readouterr().out
    keep_all = ["--borderline", str(prompts), "--borderline-keep", "all", "-o", str(tmp_path / "ra")]
    assert cache_main(args[:-1] + keep_all) == 0
    assert (
        "; borderline: 5 of 6 look-alike prompts kept (answered with or without a refusal)" in capsys.readouterr().out
    )
    assert "holds no prompts" in one_line(
        capsys,
        cache_main,
        *args[:5],
        "--prompts",
        str(write_jsonl(tmp_path / "e.jsonl", [])),
        "-o",
        str(tmp_path / "r3"),
    )


# ----------------------------------------------------------------------------- the package's prompt sets


def norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def test_the_shipped_prompt_sets():
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, 'tools'); import make_prompt_sets as m; sys.stdout.write(m.render())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert default_prompts_path().read_text() == made  # the committed file is the generator's output
    harmful = [json.loads(line) for line in default_prompts_path().read_text().splitlines()]
    risky = [json.loads(line) for line in look_risky_path().read_text().splitlines()]
    assert len(harmful) == 300 and len({norm(r["prompt"]) for r in harmful}) == 300
    assert len({r["framing"] for r in harmful}) == 12 and len({r["category"] for r in harmful}) >= 10
    assert len(risky) >= 100 and len({norm(r["prompt"]) for r in risky}) == len(risky)
    assert not {norm(r["prompt"]) for r in harmful} & {norm(r["prompt"]) for r in risky}
    # the replay's look-alikes (--borderline default) are neither equal nor nearly equal to the evaluation's
    border = [json.loads(line) for line in borderline_prompts_path().read_text().splitlines()]
    assert len(border) >= 150 and len({norm(r["prompt"]) for r in border}) == len(border)
    assert {r["kind"] for r in border} == {r["kind"] for r in risky}
    evaluated = [set(norm(r["prompt"]).split()) for r in [*risky, *harmful]]
    for r in border:
        words = set(norm(r["prompt"]).split())
        assert max(len(words & t) / len(words | t) for t in evaluated) < 0.7, r["prompt"]


def test_the_replay_prompts_share_nothing_with_the_pact_data():
    """Neither equal nor nearly equal (word-set Jaccard >= 0.7) to any prompt of the PACT files the study evaluates
    on."""
    if not (SHARED_DATA / "safe_direction.json").exists():
        pytest.skip(f"{SHARED_DATA} is absent")
    theirs = set()
    for name in ("safe_direction.json", "unsafe_data.json", "refusal_100_output.json", "SST2_5k_p_0.1.json"):
        for r in json.loads((SHARED_DATA / name).read_text()):
            theirs.add(norm(r.get("input") or r.get("instruction") or ""))
    theirs = [set(t.split()) for t in theirs if t]
    for line in [
        *default_prompts_path().read_text().splitlines(),
        *look_risky_path().read_text().splitlines(),
        *borderline_prompts_path().read_text().splitlines(),
    ]:
        words = set(norm(json.loads(line)["prompt"]).split())
        worst = max(len(words & t) / len(words | t) for t in theirs)
        assert worst < 0.7, (line, worst)
