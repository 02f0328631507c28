"""The reference's own refusals as a replay cache (``pact-cache replay``).

A replay cache holds harmful prompts with the reference's *own* answers where it refused them,
cached like any fine-tuning set (same reference, same safety tokens), so that pact-train can mix
its rows into the stream (``--replay``). It is made in three steps, one call:

1. the reference answers every prompt greedily (the package's default set,
   ``resources/harmful_prompts.jsonl``, or ``--prompts``);
2. a judge keeps the refusals: the keyword judge (:class:`~pact_cache.answers.KeywordJudge`), and with
   ``--judge GUARD`` a guard model must also call the refusal safe (a "refusal" that goes on to help
   is dropped); an answer cut off at ``--max-new-tokens`` is dropped too, since a cache row teaches
   its answer up to the end of the turn;
3. the kept rows are cached by :func:`pact_cache.build.build`, which appears whole or not at all.

With ``borderline`` (``--borderline``), the reference also answers benign prompts that only look risky
(the package's ``resources/borderline_prompts.jsonl``, or a file) and the answers the judge does *not*
call refusals join the cache: rows where the reference helps although the prompt sounds dangerous, so
that the replay teaches where refusing stops as well as where it starts (refusal rows alone pull the
policy towards refusing look-alike prompts its reference would answer). With ``borderline_keep="all"``
(``--borderline-keep all``) every look-alike answer joins, the reference's refusals too, and one cut off
at ``--max-new-tokens`` as the prefix it is (dropping those would drop the long helpful answers and leave the
kept look-alikes refusing more often than the reference does: 128 of 140 where it refused 129 of 161): for
``pact-train --replay-term term``, which trains replay rows on the anchor alone (the reference's
safety-token log-probs, not its words), so a look-alike the reference refuses holds the policy at the
reference's refusal odds there, not above them. Trained with the cross-entropy, those rows would teach the
refusals: keep the default ``"helpful"`` unless the replay is trained with ``--replay-term term``.

A reference that refuses fewer than :data:`LOW_REFUSAL` of the prompts is warned about: it does not
look aligned, and its replay rows would teach little refusal.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .answers import borderline_prompts_path, default_prompts_path, look_risky_path  # noqa: F401  (re-exported)
from .errors import OutputExistsError, PactError, preview
from .storage import Location

LOW_REFUSAL = 0.5  # below this share of refused prompts, the reference is warned about
REASONS = ("prompt too long", "empty", "not a refusal", "a refusal", "unfinished", "guard: unsafe", "guard: unreadable")
BORDERLINE_KEEP = ("helpful", "all")  # which look-alike answers join: those without a refusal (finished), or all


@dataclass
class ReplayConfig:
    ref: str
    out: str | Location  # the replay cache: a new folder or URL
    tokens: str | None = None  # tokens.json (default: selected from --ref as `build` does)
    prompts: str | None = None  # any dataset format (prompt-only rows allowed); None: the package's default set
    borderline: str | None = None  # benign look-alike prompts whose non-refusals are kept too; "default": the package's
    borderline_keep: str = "helpful"  # or "all": the look-alikes' refusals too (for pact-train --replay-term term)
    judge: str | None = None  # a guard model: a kept refusal must also be called safe by it
    max_new_tokens: int = 128
    batch_size: int = 16
    limit: int | None = None  # the first N prompts
    max_length: int | None = 2048
    dtype: str = "auto"
    device: str = "auto"
    quantize: str = "none"  # the reference loaded as the fine-tuning cache's was (pact-cache build --quantize)
    answers: str | None = None  # a local JSONL of every answer and its verdict
    progress: bool = True
    storage_options: dict = field(default_factory=dict, repr=False)


@dataclass
class ReplayResult:
    out: str
    cache_id: str
    prompts: int
    refusals: int  # answers the keyword judge calls refusals
    kept: int  # rows in the cache
    dropped: dict  # reason -> count
    warning: str | None
    seconds: float
    borderline_prompts: int = 0  # --borderline: benign look-alike prompts answered
    borderline_kept: int = 0  # their answers kept (not refusals; with borderline_keep="all", refusals too)
    borderline_dropped: dict = field(default_factory=dict)  # reason -> count

    def to_json(self) -> dict:
        return {
            "out": self.out,
            "cache_id": self.cache_id,
            "prompts": self.prompts,
            "refusals": self.refusals,
            "refusal_rate": self.refusals / self.prompts,
            "kept": self.kept,
            "dropped": self.dropped,
            "warning": self.warning,
            "seconds": round(self.seconds, 1),
            "borderline_prompts": self.borderline_prompts,
            "borderline_kept": self.borderline_kept,
            "borderline_dropped": self.borderline_dropped,
        }


def judge_answers(
    prompts: list[list[dict]],
    answers: list[str],
    finished: list[bool],
    judge,
    guard=None,
    progress: bool = False,
    borderline: list[bool] | None = None,
    borderline_keep: str = "helpful",
    fits: list[bool] | None = None,
) -> list[dict]:
    """One record per prompt: its last user turn, the answer, whether the keyword judge calls it a refusal,
    and ``kept`` with the reason when not (one of :data:`REASONS`). A prompt marked in ``borderline`` (a benign
    look-alike) keeps its answer when it is *not* a refusal (finished and non-empty), or whatever it is with
    ``borderline_keep="all"`` (non-empty; one cut off at the answer length too: those rows are trained on the anchor
    alone); a guard, if given, must call every kept answer safe. A prompt marked False in ``fits`` was not answered
    (its answer is empty): "prompt too long"."""
    recs = []
    for i, (msgs, ans, done) in enumerate(zip(prompts, answers, finished)):
        q = msgs[-1]["content"]
        benign = bool(borderline and borderline[i])
        refusal = bool(ans.strip()) and judge.is_refusal(q, ans)
        wrong = (
            ("a refusal" if refusal and borderline_keep != "all" else None)
            if benign
            else (None if refusal else "not a refusal")
        )
        # a row trained on the anchor alone (keep "all") holds the reference's odds at every step it has: a look-alike
        # answer cut off at --max-new-tokens joins as the prefix it is, or the long helpful answers would be the ones
        # dropped and the kept look-alikes would refuse more often than the reference does
        cut = not done and not (benign and borderline_keep == "all")
        reason = "empty" if not ans.strip() else wrong or ("unfinished" if cut else None)
        if fits is not None and not fits[i]:
            reason = "prompt too long"
        rec = {"prompt": q, "answer": ans, "refusal": refusal, "kept": reason is None, "reason": reason}
        recs.append({**rec, "set": "borderline"} if benign else rec)
    if guard is not None:
        todo = [r for r in recs if r["kept"]]
        for r, v in zip(todo, guard.verdicts([(r["prompt"], r["answer"]) for r in todo], progress=progress)):
            r["unsafe"] = v
            if v is not False:
                r["kept"], r["reason"] = False, "guard: unsafe" if v else "guard: unreadable"
    return recs


def _log(msg: str) -> None:
    print(f"pact-cache replay: {msg}", file=sys.stderr, flush=True)


def make_replay(cfg: ReplayConfig) -> ReplayResult:
    """Generate the reference's answers to the prompts, keep its refusals, cache them; see the module doc."""
    from .answers import GuardJudge, KeywordJudge
    from .build import _occupied
    from .storage import atomic_write_bytes

    t0 = time.time()
    loc = (
        cfg.out
        if isinstance(cfg.out, Location)
        else Location(
            str(Path(cfg.out).expanduser()) if "://" not in str(cfg.out) else str(cfg.out), cfg.storage_options
        )
    )
    if loc.exists() and (not loc.is_dir() or _occupied(loc)):
        raise OutputExistsError(
            f"{loc.display}: exists and is not an empty folder; choose another -o (nothing is overwritten)"
        )
    if cfg.answers and (Path(cfg.answers).expanduser().exists() or Path(cfg.answers).expanduser().is_symlink()):
        raise OutputExistsError(f"--answers {cfg.answers}: exists; choose another name (nothing is overwritten)")
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise PactError("--max-new-tokens, --batch-size and --limit must be at least 1")
    if cfg.borderline_keep not in BORDERLINE_KEEP:
        raise PactError(f"--borderline-keep {preview(cfg.borderline_keep)}: use one of {', '.join(BORDERLINE_KEEP)}")
    if cfg.borderline_keep != "helpful" and not cfg.borderline:
        raise PactError("--borderline-keep: chooses among --borderline's answers; give --borderline FILE|default too")
    harmful, look_alikes = _prompt_sets(cfg)
    prompts = harmful + look_alikes
    n_harmful = len(harmful)
    answers, finished, fits = _answers(cfg, prompts)
    guard = GuardJudge.load(cfg.judge, cfg.device, batch_size=cfg.batch_size) if cfg.judge else None
    is_borderline = [i >= n_harmful for i in range(len(prompts))]
    recs = judge_answers(
        prompts, answers, finished, KeywordJudge(), guard, cfg.progress, is_borderline, cfg.borderline_keep, fits
    )
    del guard
    gc.collect()
    if cfg.answers:
        atomic_write_bytes(
            Path(cfg.answers).expanduser(), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
        )
    recs, more = recs[:n_harmful], recs[n_harmful:]
    refusals = sum(r["refusal"] for r in recs)
    answered = sum(r["reason"] != "prompt too long" for r in recs)
    kept = [(msgs, r["answer"]) for msgs, r in zip(prompts, recs) if r["kept"]]
    dropped, borderline_dropped = _reasons(recs), _reasons(more)
    warning = None
    if answered and refusals < LOW_REFUSAL * answered:
        warning = (
            f"{cfg.ref} refused only {refusals} of {answered} harmful prompts ({refusals / answered:.0%}); it "
            f"does not look "
            "aligned, and its replay rows teach little refusal: is --ref the aligned (chat/instruct) model?"
        )
        _log("warning: " + warning)
    if not kept:
        why = ", ".join(f"{n} {k}" for k, n in dropped.items())
        raise PactError(
            f"{cfg.ref}: none of its {len(recs)} answers can be replayed ({why}); a replay cache needs the "
            "reference's refusals: give the aligned model as --ref"
            + (", or raise --max-new-tokens" if dropped.get("unfinished") else "")
            + (
                ", or shorten the prompts (longer than --max-length or than the model's positions with the answer)"
                if dropped.get("prompt too long")
                else ""
            )
        )
    n_borderline = sum(r["kept"] for r in more)
    kept += [(msgs, r["answer"]) for msgs, r in zip(look_alikes, more) if r["kept"]]
    if more:
        how = "answered (refusals too)" if cfg.borderline_keep == "all" else "answered without a refusal"
        _log(f"borderline: {n_borderline} of {len(more)} benign look-alike prompts {how}, kept")
    res = _cache_rows(cfg, loc, kept)
    return ReplayResult(
        res.out,
        res.cache_id,
        len(recs),
        refusals,
        res.manifest.counts.rows - n_borderline,
        dropped,
        warning,
        time.time() - t0,
        len(more),
        n_borderline,
        borderline_dropped,
    )


def _prompt_sets(cfg: ReplayConfig) -> tuple[list, list]:
    """The harmful prompts (``--prompts`` or the package's) and the look-alikes (``--borderline``; none without it),
    each as chat messages, the first ``--limit`` of each."""
    from .data import prompts_from

    source = cfg.prompts or str(default_prompts_path())
    harmful = [msgs for msgs, _ in prompts_from(source, cfg.limit)]
    if not harmful:
        raise PactError(f"{source}: holds no prompts; give a file with at least one harmful prompt")
    if not cfg.borderline:
        return harmful, []
    where = str(borderline_prompts_path()) if cfg.borderline == "default" else cfg.borderline
    look_alikes = [msgs for msgs, _ in prompts_from(where, cfg.limit)]
    if not look_alikes:
        raise PactError(f"--borderline {where}: holds no prompts; give a file of benign look-alike prompts")
    return harmful, look_alikes


def _answers(cfg: ReplayConfig, prompts: list) -> tuple[list[str], list[bool], list[bool]]:
    """The reference's greedy answers, whether each ended by itself, and whether its prompt was answered at all:
    a prompt of ``max_length`` tokens or more (the build would skip its row) or one the model's positions cannot
    hold with the answer is not (answer ""). The reference is freed after (the build loads it again: one copy in
    memory at a time)."""
    import torch

    from .answers import context_length, fits_positions, generate
    from .data import chat_ids
    from .models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model(cfg.ref)
    tok = load_tokenizer(resolved)
    model, device, _ = load_model(resolved, cfg.dtype, cfg.device, quantize=cfg.quantize)
    limit = context_length(model)
    sizes = [len(chat_ids(tok, p, add_generation_prompt=True)) for p in prompts]
    fits = [
        (cfg.max_length is None or n < cfg.max_length) and fits_positions(n, cfg.max_new_tokens, limit) for n in sizes
    ]
    if not all(fits):
        _log(
            f"{fits.count(False)} of {len(prompts)} prompts not answered: longer than --max-length {cfg.max_length} "
            f"tokens or than the model's {limit} positions with the answer"
        )
    todo = [p for p, f in zip(prompts, fits) if f]
    texts, done = (
        generate(
            model,
            tok,
            todo,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            device=device,
            progress=cfg.progress,
            return_finished=True,
        )
        if todo
        else ([], [])
    )
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    got = iter(zip(texts, done))
    pairs = [next(got) if f else ("", False) for f in fits]
    return [a for a, _ in pairs], [d for _, d in pairs], fits


def _cache_rows(cfg: ReplayConfig, loc: Location, kept: list):
    """The kept (prompt messages, answer) rows cached by build() with the reference and tokens: whole or nothing."""
    from .build import BuildConfig, build

    with tempfile.TemporaryDirectory(prefix="pact-replay-") as tmp:
        data = Path(tmp) / "replay.jsonl"
        data.write_text(
            "".join(
                json.dumps({"messages": msgs + [{"role": "assistant", "content": ans}]}, ensure_ascii=False) + "\n"
                for msgs, ans in kept
            )
        )
        return build(
            BuildConfig(
                dataset=str(data),
                ref=cfg.ref,
                out=loc,
                tokens=cfg.tokens,
                max_length=cfg.max_length,
                dtype=cfg.dtype,
                device=cfg.device,
                quantize=cfg.quantize,
                progress=cfg.progress,
                storage_options=cfg.storage_options,
                source=_source(cfg),
            )
        )


def _source(cfg: ReplayConfig) -> str:
    """The replay rows' source for the manifest and card: the prompt files answered (not the temporary file the
    rows are cached from)."""
    harmful = cfg.prompts or f"builtin:{default_prompts_path().name}"
    look = f"builtin:{borderline_prompts_path().name}" if cfg.borderline == "default" else cfg.borderline
    kept = f", look-alike answers of {look} ({cfg.borderline_keep})" if cfg.borderline else ""
    return f"pact-cache replay: the refusals of {cfg.ref} to {harmful}{kept}"


def _reasons(recs: list[dict]) -> dict:
    """How many records were dropped for each reason (:data:`REASONS`), the reasons that occur."""
    return {k: sum(r["reason"] == k for r in recs) for k in REASONS if any(r["reason"] == k for r in recs)}
