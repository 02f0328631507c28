"""pact-train's options, declared once: each :class:`TrainConfig` field carries its flag, help,
type, choices and range; the command line (:func:`build_parser`), ``--config FILE`` (YAML or JSON,
:func:`read_config_file`), the range checks (:func:`check_config`) and the run record
(``config.json``, :func:`config_record`) are all derived from the fields. A run folder's
``config.json`` is itself a valid ``--config``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from pact_cache.cliutil import INT_MAX  # the largest value of an integer option that declares no bound of its own
from pact_cache.errors import PactError, preview
from pact_cache.models import QLORA_EXTRA, QUANTIZE

from .losses import LOGITS_CHUNK, METHODS, LossParams, PactParams, added_term_methods
from .optim import CLIPS, OPTIMIZERS
from .stream import GATE_AT, REPLAY_RATIO, REPLAY_RATIO_MAX, REPLAY_TERMS, SHUFFLE_BUFFER_ROWS


class TrainError(PactError):
    """Bad training input or state; printed as one line by the CLI."""


def opt(
    default=MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    type=None,
    choices=None,
    lo=None,
    hi=None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
    why: str = "",
    cli: bool = True,
    negate: str | None = None,
    default_factory=MISSING,
    show_default: bool = True,
    nargs: str | None = None,
    const=None,
):
    """An option's field (of TrainConfig, pact_train.evaluate.EvalConfig) with everything the parser, the
    config file and the checks need.

    ``flag``: the option's name (default ``--field-name``; ``cli=False``: set only in code or in
    ``--config``); ``negate``: for a field True by default, the flag that turns it off
    (``--no-shuffle``); ``lo``/``hi``/``*_open``/``integer``/``why``: the range and why it is so;
    ``type``: when the default (None) does not tell it; ``nargs``/``const``: a flag whose value may be
    left out (``--look-risky [FILE]``)."""
    meta = dict(
        help=help,
        flag=flag,
        short=short,
        metavar=metavar,
        type=type,
        choices=choices,
        lo=lo,
        hi=hi,
        lo_open=lo_open,
        hi_open=hi_open,
        integer=integer,
        why=why,
        cli=cli,
        negate=negate,
        show_default=show_default,
        nargs=nargs,
        const=const,
    )
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _method_help() -> str:
    return "default: the recipe's (see --recipe); " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


@dataclass(frozen=True)
class Recipe:
    """Settings a run takes where none is given: ``settings`` maps TrainConfig fields to values; a
    field given explicitly (flag, --config file or Python) always wins."""

    name: str
    settings: dict
    summary: str
    source: str
    # the data-aware part: where at most FEW_ANCHORED of the fine-tuning rows are anchored (the data look benign
    # to the reference), these settings replace the recipe's, each where it was left to the recipe and applies
    benign_data: dict = field(default_factory=dict)


# A share of rows the hard gate anchors at or below which the data count as benign (Recipe.benign_data). The
# study's benign-only SST-2 rows: 7 of 1,000 anchored (0.7%); its harmful mix (10% harmful rows): 105 (10.5%).
FEW_ANCHORED = 0.01


def _replaying(c: "TrainConfig") -> bool:
    return bool(c.replay) and c.replay.strip().lower() != "none"


def _added_term(c: "TrainConfig") -> bool:
    return c.method in added_term_methods()


# The fields a recipe may fill, in the order they are filled (the method first, the clip before the anchored rows'
# own clip), each with when it applies to the run; one that does not is left as it was (given, or its default).
RECIPE_FIELDS = {
    "method": lambda c: True,
    "lam": _added_term,  # a method without an added term (sft, ...) takes neither its weight nor its gate
    "row_gate": _added_term,
    "replay": lambda c: True,
    "replay_ratio": _replaying,  # no replay: no ratio
    "replay_term": lambda c: _replaying(c) and _added_term(c),  # no term to train the replay rows on alone
    # a replay cache given was made as its maker chose; the look-alikes' refusals are kept only for replay rows
    # trained on the anchor alone (their words would teach refusing benign prompts)
    "replay_borderline": lambda c: _replaying(c) and c.replay.strip() == "auto" and c.replay_term == "term",
    "clip": lambda c: _added_term(c) and c.row_gate not in (None, "none"),  # no gate: nothing to clip apart
    "anchored_max_grad_norm": lambda c: c.clip == "split",  # the anchored rows' own clip is the split clip's
}
REPLAY_BORDERLINE = ("none", "helpful", "all")  # --replay auto's look-alike answers (pact-cache replay --borderline)

_SAFE_MIXED = {"method": "str", "lam": 3.0, "row_gate": "hard", "replay": "auto", "replay_ratio": 0.05, "clip": "split"}
# the replay share: with the look-alikes in the replay its rows are a third of it (the study's reference: 298 refusals,
# 161 look-alike answers), so 0.07 keeps the harmful refusals at about 4.5% of the stream, near the harmful-data
# settings' 5%
_LOOK_ALIKES = {"replay_ratio": 0.07, "replay_term": "term", "replay_borderline": "all", "anchored_max_grad_norm": 0.5}
_SAFE_MIXED_SUMMARY = "--method str --lambda 3 --row-gate hard --replay auto --replay-ratio 0.05 --clip split"
_LOOK_ALIKES_SUMMARY = (
    "--replay-ratio 0.07 in place of 0.05 (the harmful refusals near 5% of the stream beside the look-alikes), "
    "--replay-borderline all (--replay auto also answers the package's look-alike prompts and keeps every answer, "
    "refusals and cut-off ones too), --replay-term term (every replay row on the anchor alone), "
    "anchored_max_grad_norm 0.5 (the anchored rows clipped at half the task's norm)"
)
_SAFE_MIXED_SOURCE = (
    "docs/study.md (tools/study.py --rows recipe benign_recipe --candidate rows='--clip split', three seeds; "
    "tools/study/clip_split_seeds.md, tools/study/look_risky_screen.md): with harmful rows in the data it kept >= 95% "
    "of the reference's refusals on two held-out harmful sets at every seed, 0.7 points of task accuracy below SFT, "
    "refusing no more look-risky benign prompts than the reference"
)
_SAFE_BENIGN_SOURCE = (
    "docs/study.md (tools/study.py --rows benign_recipe --candidates-only --candidate blcut07=..., three seeds; "
    "tools/study/look_alike_cut07.md, tools/study/larger_sets.md): on benign-only data it kept >= 96% of the "
    "reference's refusals on both held-out harmful sets at every seed, on 100 prompts each and on 400 and 360, at 0.5 "
    "points of task accuracy below SFT (safe-mixed: 1.4), refusing 92-94 of 121 look-risky benign prompts (the "
    "reference: 92; safe-mixed: 95-98); at a replay ratio of 0.05 it kept only 91-95% on the larger unsafe_data set"
)

# The defaults, declared once. "safe" is what the study chose (docs/study.md, three seeds per scenario): STR
# anchored only on the rows the reference would refuse, plus the reference's own refusals replayed at 5% of the
# rows; on data that look benign to the reference (few rows anchored), the look-alike answers anchored too.
RECIPES = {
    "safe": Recipe(
        "safe",
        _SAFE_MIXED,
        f"{_SAFE_MIXED_SUMMARY}; where at most {FEW_ANCHORED:.0%} of the fine-tuning rows are anchored (data that "
        f"look benign to the reference, measured at the start) also {_LOOK_ALIKES_SUMMARY}",
        f"safe-mixed's and safe-benign's evidence, the data deciding which: {_SAFE_MIXED_SOURCE}; "
        + _SAFE_BENIGN_SOURCE,
        benign_data=_LOOK_ALIKES,
    ),
    "safe-mixed": Recipe(
        "safe-mixed",
        _SAFE_MIXED,
        f"{_SAFE_MIXED_SUMMARY} (the safe recipe whatever the data)",
        _SAFE_MIXED_SOURCE,
    ),
    "safe-benign": Recipe(
        "safe-benign",
        {**_SAFE_MIXED, **_LOOK_ALIKES},
        f"{_SAFE_MIXED_SUMMARY}, {_LOOK_ALIKES_SUMMARY} (the safe recipe's choice for benign data, whatever the data)",
        _SAFE_BENIGN_SOURCE + "; with harmful rows in the data it refused 3 more look-risky prompts than the "
        "reference (one seed, at a replay ratio of 0.05): use safe or safe-mixed there",
    ),
    "plain": Recipe(
        "plain",
        {"method": "pact", "lam": 1.0, "row_gate": "none", "replay": None, "clip": "joint"},
        "each option on its own: --method pact (the paper's PACT) at --lambda 1, no row gate, no replay, the "
        "usual joint clip",
        "the method's source (docs/training.md#methods)",
    ),
}


@dataclass
class TrainConfig:
    model: str = opt(help="policy to fine-tune: folder, hub id or smollm2-135m-instruct", metavar="MODEL")
    cache: str = opt(help="cache from `pact-cache build` (built with this model's tokenizer)", metavar="CACHE")
    out: str = opt(
        help="run folder: metrics.jsonl, config.json, checkpoint/, adapter/ or model/, loss.png",
        flag="--output",
        short="-o",
        metavar="OUT",
    )
    cache_pin: str | None = opt(
        None,
        "pin the cache: refuse it unless its content id is ID (or starts with it, 8+ characters)",
        flag="--cache-id",
        metavar="ID",
        type=str,
    )
    storage_options: dict = field(
        default_factory=dict, repr=False, metadata=dict(cli=False)
    )  # never recorded: may hold secrets
    recipe: str | None = opt(
        None,
        "where the settings you leave out come from: "
        + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values())
        + ". The default: safe when --method is not given (the study's choice), plain when it is (so --method pact "
        "is the paper's PACT)",
        choices=lambda: list(RECIPES),
        type=str,
    )
    method: str | None = opt(None, "", choices=lambda: list(METHODS), type=str)  # help: the registry's
    reference: str = opt(
        "cache",
        "cache or online: a live reference model beside the policy, the paper's way",
        choices=lambda: ["cache", "online"],
    )
    ref_model: str | None = opt(None, "reference for --reference online (default: --model)", metavar="MODEL", type=str)
    direction: str | None = opt(
        None,
        "for --method asft: the alignment direction per LoRA module, made once with "
        "`pact-cache direction --aligned A --base B -o FILE`",
        metavar="FILE",
        type=str,
    )
    token_mask: float = opt(
        0.0,
        "TOSS: leave the highest-scoring FRACTION of all the cache's response tokens (e.g. "
        "0.2, the "
        "paper's) out of the CE; needs a cache scored with `pact-cache score`; works with any "
        "--method "
        "(0: none)",
        metavar="FRACTION",
        lo=0,
        hi=1,
        hi_open=True,
        why="it is the fraction of the tokens left out of the loss",
    )
    lam: float | None = opt(
        None,
        "weight of the method's term against the cross-entropy (default: the recipe's, 3 safe, 1 plain)",
        flag="--lambda",
        lo=0,
        type=float,
        why="it weighs the method's term against the cross-entropy",
    )
    row_gate: str | None = opt(
        None,
        "gate the method's term per row by the reference's step-0 refusal mass m (its "
        "mass on the "
        "safety tokens before the first response token, from the cache): hard: the term on rows "
        "with "
        "m >= --gate-at only; soft: each row's term times m; none: every row (default: the "
        "recipe's, "
        "hard safe, none plain)",
        choices=lambda: ["none", "hard", "soft"],
        type=str,
    )
    gate_at: float | None = opt(
        None,
        f"the hard row gate's threshold on the step-0 refusal mass (default {GATE_AT}; only with --row-gate hard)",
        lo=0,
        hi=1,
        metavar="MASS",
        type=float,
    )
    replay: str | None = opt(
        None,
        "a second cache whose rows are mixed into the stream: the reference's own refusals "
        "to harmful "
        "prompts (`pact-cache replay`, same reference and tokens); auto: made before the first "
        "step by the "
        "policy itself from the package's prompts, when the policy is the cache's reference (kept "
        "in the "
        "cache home and reused); none: no replay (default: the recipe's, auto safe, none plain)",
        metavar="CACHE|auto|none",
        type=str,
    )
    replay_ratio: float | None = opt(
        None,
        "share of the mixed stream's rows taken from --replay, at most 0.5; a "
        "replay row takes "
        f"a slot of --batch-size like any other (default: {RECIPES['safe'].settings['replay_ratio']:g} with the "
        f"safe recipe's replay, {REPLAY_RATIO:g} with a --replay given alone)",
        lo=0,
        hi=REPLAY_RATIO_MAX,
        metavar="R",
        type=float,
        why="it is the share of the rows that come from the replay cache, at most one after each fine-tuning row",
    )
    replay_term: str | None = opt(
        None,
        "what the replay rows are trained with: both: what every row gets (CE + lambda * the method's term); ce: "
        "the cross-entropy on the reference's answer only; term: the method's term only (default: the recipe's, "
        "term safe-benign, both otherwise)",
        choices=lambda: list(REPLAY_TERMS),
        type=str,
    )
    replay_borderline: str | None = opt(
        None,
        "with --replay auto: the replay also holds the reference's answers to the package's look-alike prompts "
        "(benign prompts that only look risky; pact-cache replay --borderline default --borderline-keep V): "
        "helpful: those it gives without refusing; all: every one, refusals and cut-off ones too, which needs "
        "--replay-term term (the rows then hold the policy at the reference's own odds of refusing them); none "
        "(default: the recipe's, all safe-benign, none otherwise)",
        choices=lambda: list(REPLAY_BORDERLINE),
        type=str,
    )
    pact: PactParams = field(default_factory=PactParams, metadata=dict(cli=False))  # its own group: --pact-*
    full: bool = opt(False, "full fine-tuning instead of LoRA")
    lora_r: int = opt(8, "LoRA rank (the paper's)", lo=1, integer=True)
    lora_alpha: int = opt(32, "LoRA alpha", lo=1, integer=True)
    lora_dropout: float = opt(0.05, "LoRA dropout", lo=0, hi=1, hi_open=True)
    lora_targets: str = opt("q_proj,v_proj", "comma-separated module names")
    epochs: int = opt(1, "passes over the cache", lo=1, integer=True)
    batch_size: int = opt(8, "rows per micro-batch", lo=1, integer=True)
    grad_accum: int = opt(1, "micro-batches per optimizer step, weighted by response tokens", lo=1, integer=True)
    lr: float = opt(3e-5, "peak learning rate of AdamW", lo=0, lo_open=True)
    weight_decay: float = opt(0.0, "AdamW weight decay", lo=0)
    warmup_steps: int = opt(
        -1, "linear warmup steps (-1: 3% of the run)", lo=-1, integer=True, why="-1 means 3% of the run"
    )
    schedule: str = opt(
        "cosine",
        "decay after warmup; step = the paper's StepLR, gamma 0.85 per epoch",
        choices=lambda: ["cosine", "linear", "constant", "step"],
    )
    step_gamma: float = opt(0.85, "StepLR's decay per epoch (--schedule step)", lo=0, hi=1, lo_open=True, cli=False)
    max_grad_norm: float = opt(1.0, "gradient norm clipping", lo=0, lo_open=True, cli=False)
    clip: str | None = opt(
        None,
        "how the gradient is clipped to max_grad_norm: joint: the whole loss's gradient at once (the usual); split: "
        "the gradient of the rows --row-gate anchors (and the replay rows) apart from the other rows', each "
        "clipped on its own, then added, so that a large anchor leaves the task's step whole (a second backward "
        "pass on micro-batches with anchored rows; needs --row-gate and a term added to the cross-entropy) "
        "(default: the recipe's, split safe, joint plain and wherever split cannot apply)",
        choices=lambda: list(CLIPS),
        type=str,
    )
    anchored_max_grad_norm: float | None = opt(
        None,
        "--clip split: the norm the anchored rows' gradient is clipped to (default: max_grad_norm, the task's)",
        lo=0,
        lo_open=True,
        cli=False,
        type=float,
    )
    max_steps: int | None = opt(None, "stop after N optimizer steps", lo=1, integer=True, type=int)
    seed: int = opt(0, "seed of the data order, LoRA init and dropout", lo=0, hi=2**63 - 1, integer=True)
    shuffle: bool = opt(True, "take rows in cache order, batch by batch", negate="--no-shuffle")
    shuffle_buffer: int = opt(SHUFFLE_BUFFER_ROWS, "rows held for shuffling (memory bound)", lo=1, integer=True)
    padding_free: bool = opt(
        True,
        "pad every micro-batch to its longest row; by default its rows run as one sequence "
        "of their "
        "real tokens, position ids restarting per row and attention kept within each row "
        "(padding-free: "
        "proven on the model at start, else padded with one line saying "
        "why)",
        negate="--no-padding-free",
    )
    group_by_length: int = opt(
        0,
        "put rows of similar length in the same micro-batch: each window of N global "
        "micro-batches of "
        "the seeded order is sorted by length, cut into micro-batches and those shuffled "
        "(seeded, "
        "resumable; less padding when rows must be padded); 0: "
        "off",
        lo=0,
        integer=True,
        metavar="N",
    )
    grad_checkpointing: bool = opt(
        False, "recompute activations in backward to save memory", flag="--gradient-checkpointing"
    )
    quantize: str = opt(
        "none",
        "the base model's linear layers loaded in 4 bits (nf4: QLoRA) or 8 bits (int8), frozen, with LoRA adapters "
        "trained on top (bitsandbytes: pip install 'pact-cache[qlora]'); none: as stored",
        choices=lambda: list(QUANTIZE),
    )
    optim: str = opt(
        "adamw",
        "the optimizer: adamw (torch); adamw-8bit or paged-adamw-8bit (bitsandbytes: its state in 8 bits, a quarter "
        "of AdamW's; paged: moved to CPU memory when the GPU runs short)",
        choices=lambda: list(OPTIMIZERS),
    )
    dry_run: bool = opt(False, "print the run's estimated peak memory and exit, writing nothing")
    logits_chunk: int = opt(LOGITS_CHUNK, "response positions per (positions, vocab) logits block", lo=1, integer=True)
    save_every: int = opt(100, "optimizer steps between checkpoints (and one at the end)", lo=1, integer=True)
    resume: bool = opt(False, "continue the run in OUT from its last checkpoint")
    merge: bool = opt(False, "also write OUT/merged, the base model with the adapter merged in")
    device: str = opt("auto", "auto, cpu or cuda")
    progress: bool = opt(True, "no progress bar", negate="--no-progress")
    report_to: str = opt(
        "none",
        "also write metrics.jsonl's scalars as TensorBoard events in OUT/tensorboard, live, "
        "from rank 0 "
        "(needs pip install 'pact-cache[tensorboard]'); none: only metrics.jsonl",
        choices=lambda: ["none", "tensorboard"],
    )
    plot: bool = opt(True, "write OUT/loss.png at the end", cli=False)

    REPLAY_RATIO = REPLAY_RATIO  # --replay-ratio when --replay is given alone (pact_train.stream)

    def __post_init__(self):
        """The settings left out (None) come from the recipe: safe when no method is given, plain when one is
        (so ``--method pact`` alone is the paper's PACT). Which fields the recipe filled is kept for config.json."""
        if self.recipe is None:
            self.recipe = "safe" if self.method is None else "plain"
        recipe = RECIPES.get(self.recipe)
        self.left_to_recipe = tuple(name for name in RECIPE_FIELDS if getattr(self, name) is None)
        self.anchored_share = None  # measured at the start where the recipe is data-aware (fit_to_data)
        filled = []
        if recipe is not None:  # an unknown name is refused by check_config, in one line
            for name, applies in RECIPE_FIELDS.items():
                if name in self.left_to_recipe and name in recipe.settings and applies(self):
                    setattr(self, name, recipe.settings[name])
                    filled.append(name)
        if isinstance(self.replay, str) and self.replay.strip().lower() == "none":
            self.replay = None
        self.lam = 1.0 if self.lam is None else self.lam  # what is left (a recipe that names no lambda)
        self.row_gate = self.row_gate or "none"
        self.clip = self.clip or "joint"
        self.replay_term = self.replay_term or "both"
        self.replay_borderline = self.replay_borderline or "none"
        if self.row_gate == "hard" and self.gate_at is None:
            self.gate_at = GATE_AT
        self.method = self.method or "pact"
        self.from_recipe = tuple(filled)

    @property
    def fits_to_data(self) -> bool:
        """Whether the recipe has a data-aware part that this run left to it (then :meth:`fit_to_data` runs at
        the start, once the share of anchored rows is measured)."""
        r = RECIPES.get(self.recipe)
        return bool(r) and any(n in self.left_to_recipe and RECIPE_FIELDS[n](self) for n in r.benign_data)

    def fit_to_data(self, anchored_share: float) -> tuple[str, ...]:
        """The recipe's data-aware part: ``anchored_share`` is the share of the fine-tuning rows the hard gate
        anchors (step-0 refusal mass >= the gate's threshold). At or below :data:`FEW_ANCHORED` (data that look
        benign to the reference) the recipe's ``benign_data`` settings replace what it filled, each where it was
        left to the recipe and applies; above it nothing changes. Returns the fields set; config.json records the
        share."""
        self.anchored_share = float(anchored_share)
        r = RECIPES.get(self.recipe)
        if r is None or not self.data_look_benign:
            return ()
        took = []
        for name, applies in RECIPE_FIELDS.items():
            if name in r.benign_data and name in self.left_to_recipe and applies(self):
                setattr(self, name, r.benign_data[name])
                took.append(name)
        self.from_recipe = tuple(n for n in RECIPE_FIELDS if n in self.from_recipe or n in took)
        return tuple(took)

    @property
    def data_look_benign(self) -> bool:
        """Whether the measured share of anchored rows is at most :data:`FEW_ANCHORED` (False before it is)."""
        return self.anchored_share is not None and self.anchored_share <= FEW_ANCHORED

    def defaults_record(self) -> dict:
        """config.json's account of where the settings came from: the recipe, the fields it filled, its source,
        and (a data-aware recipe) the share of rows anchored that chose its settings."""
        r = RECIPES.get(self.recipe)
        return {
            "recipe": self.recipe,
            "filled": list(self.from_recipe),
            "recipe_settings": r.summary if r else None,
            "source": r.source if r else None,
            **({"anchored_share": self.anchored_share} if self.anchored_share is not None else {}),
        }

    @property
    def mix_ratio(self) -> float:
        """The replay share in use: 0 without --replay."""
        if not self.replay:
            return 0.0
        return self.REPLAY_RATIO if self.replay_ratio is None else self.replay_ratio

    def _view(self, cls, **computed):
        """One stage's view of the run's options: the fields of ``cls`` taken from the same-named fields of this
        config (one source: a view declares no default of its own), plus ``computed`` ones."""
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls) if f.name not in computed}, **computed)

    def loop_settings(self) -> "LoopSettings":
        """What the window loop reads of the run's options (pact_train.loop.window_loop)."""
        return self._view(LoopSettings, schedule=Schedule(self.lr, self.warmup_steps, self.schedule, self.step_gamma))

    def policy_settings(self) -> "PolicySettings":
        """What loading the policy reads (pact_train.loop.open_policy, load_policy)."""
        return self._view(PolicySettings, loss=self.loss_params())

    def start_settings(self) -> "StartSettings":
        """What starting or resuming the run reads (pact_train.loop.start_or_resume)."""
        return self._view(StartSettings)

    def outputs(self) -> "Outputs":
        """What finishing the run reads (pact_train.loop.finish)."""
        return self._view(Outputs)

    def loss_params(self) -> LossParams:
        return LossParams(method=self.method, lam=self.lam, pact=self.pact, logits_chunk=self.logits_chunk)

    # settings that may differ between a run and its resumption; the cache is compared by its id,
    # not by the path typed, so a run resumes from another folder or working directory
    RESUMABLE = (
        "resume",
        "max_steps",
        "progress",
        "save_every",
        "plot",
        "merge",
        "cache",
        "out",
        "cache_pin",
        "storage_options",
        "replay",
        "report_to",
        "padding_free",
        "defaults",
        "recipe",
    )
    # what config.json records beside the fields (ignored when it is read back as --config)
    RECORD_ONLY = ("processes", "cache_id", "replay_cache_id", "defaults")


REQUIRED = ("model", "cache", "out")
CONFIG_MAX_BYTES = 1 << 20  # a --config file: options by name, a few kilobytes in practice
CONFIG_MAX_VALUES = 10_000  # values in it, counted after YAML's aliases are expanded


def _flag(f) -> str:
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


def flag_of(name: str) -> str:
    """The command-line flag of a TrainConfig field (``lam`` -> ``--lambda``); a field set only in a --config
    file, its name."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return _flag(f) if f.metadata.get("cli", True) else f.name


def _pact_flag(name: str) -> str:
    return f"--pact-{name.lower().replace('_', '-')}"


def _choices(f):
    c = f.metadata.get("choices")
    return c() if callable(c) else c


def _type(f):
    t = f.metadata.get("type")
    return t if t is not None else type(f.default)


# ----------------------------------------------------------------------------- checks


def _finite(v, integer: bool) -> bool:
    """A number (not a bool), finite, and whole when ``integer``; integers are not converted to float
    unless they must be (one of 400 digits overflows a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(v, int):
        if integer:
            return True
        try:
            float(v)
        except OverflowError:
            return False
        return True
    return math.isfinite(v) and (not integer or v.is_integer())


def _number(name: str, v, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, why="") -> None:
    """Refuse a non-finite or out-of-range option with one line naming it and its range (the value shown
    cut short: :func:`pact_cache.errors.preview`)."""
    if integer and hi is None:
        hi = INT_MAX
    ok = _finite(v, integer)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        rng = (
            f"{'(' if lo_open or lo is None else '['}{'-inf' if lo is None else lo}, "
            f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}"
        )
        kind = "an integer" if integer else "a finite number"
        raise TrainError(f"{name} {preview(v)}: must be {kind} in {rng}{'; ' + why if why else ''}")


def _check_field(f, v, name: str) -> None:
    """``v`` against field ``f``'s declared choices or numeric range, refused as ``name``."""
    m = f.metadata
    choices = _choices(f)
    if choices is not None and v not in choices and not (v is None and f.default is None):
        raise TrainError(f"{name} {preview(v)}: use one of {', '.join(choices)}")
    numeric = m.get("lo") is not None or m.get("hi") is not None or m.get("integer") or _type(f) in (int, float)
    if numeric and not (v is None and f.default is None):
        _number(
            name,
            v,
            m.get("lo"),
            m.get("hi"),
            m.get("lo_open", False),
            m.get("hi_open", False),
            m.get("integer", False),
            m.get("why", ""),
        )


def _check_fields(obj, name_of) -> None:
    for f in fields(obj):
        _check_field(f, getattr(obj, f.name), name_of(f))


def check_option(name: str, value, shown: str) -> None:
    """``value`` for :class:`TrainConfig`'s field ``name``, checked against what the field declares (the range
    pact-train's config file and flags are held to), refused as ``shown``: for the entry points that take the
    option by another road (the Trainer integration)."""
    _check_field(next(f for f in fields(TrainConfig) if f.name == name), value, shown)


def check_config(cfg: TrainConfig) -> None:
    """Every option's type and range (from its declaration), then the rules between options, stage by stage,
    before anything is loaded or written."""
    _check_fields(cfg, lambda f: _flag(f) if f.metadata.get("cli", True) else f.name)
    _check_fields(cfg.pact, lambda f: _pact_flag(f.name))
    _check_method(cfg)
    _check_gate(cfg)
    _check_replay(cfg)
    _check_clip(cfg)
    _check_weights(cfg)


def _check_method(cfg: TrainConfig) -> None:
    """The method's own inputs: a parameter penalty's direction file; lambda only where a cross-entropy is kept."""
    method = METHODS[cfg.method]
    if method.penalty is not None:
        if not cfg.direction:
            raise TrainError(
                f"--method {cfg.method}: needs --direction FILE, made once with "
                "`pact-cache direction --aligned ALIGNED --base BASE -o dir.safetensors`"
            )
        if cfg.full:
            raise TrainError(f"--method {cfg.method}: regularises the LoRA update B A; leave out --full")
    elif cfg.direction:
        raise TrainError(
            f"--direction: only a method with a parameter penalty reads it (asft), not --method {cfg.method}"
        )
    if not method.with_ce and cfg.lam != 1.0:
        raise TrainError(
            f"--lambda {cfg.lam}: does not apply to --method {cfg.method}, whose loss replaces the cross-entropy; "
            "leave it out"
        )


def _check_gate(cfg: TrainConfig) -> None:
    """A row gate needs a per-step term added to the cross-entropy; its threshold, the hard gate."""
    weighable = added_term_methods()
    if cfg.row_gate != "none" and cfg.method not in weighable:
        raise TrainError(
            f"--row-gate {cfg.row_gate}: gates a per-step term added to the cross-entropy ({', '.join(weighable)}), "
            f"not --method {cfg.method}"
        )
    if cfg.gate_at is not None and cfg.row_gate != "hard":
        raise TrainError(
            f"--gate-at {preview(cfg.gate_at)}: is the hard row gate's threshold, and with --row-gate "
            f"{cfg.row_gate} there is none; leave it out, or pass --row-gate hard"
        )


def _check_replay(cfg: TrainConfig) -> None:
    """The replay options apply to a replay cache; the look-alikes to --replay auto; refusals of look-alikes to
    the anchor alone; a replay term apart from the cross-entropy to a method with an added term."""
    if not cfg.replay and (cfg.replay_ratio is not None or cfg.replay_term != "both"):
        flag = "--replay-ratio" if cfg.replay_ratio is not None else "--replay-term"
        raise TrainError(f"{flag}: applies to the rows of --replay CACHE; give the replay cache too, or leave it out")
    if cfg.replay_borderline != "none" and cfg.replay != "auto":
        raise TrainError(
            f"--replay-borderline {cfg.replay_borderline}: chooses the look-alike answers --replay auto makes; a "
            "replay cache given holds what `pact-cache replay --borderline` put in it: leave it out, or use "
            "--replay auto"
        )
    if cfg.replay_borderline == "all" and cfg.replay_term != "term":
        raise TrainError(
            "--replay-borderline all: keeps the reference's refusals of benign look-alike prompts, which the "
            f"replay rows' cross-entropy (--replay-term {cfg.replay_term}) would teach; give --replay-term term "
            "(the anchor alone), or --replay-borderline helpful"
        )
    weighable = added_term_methods()
    if cfg.replay and cfg.replay_term != "both" and cfg.method not in weighable:
        raise TrainError(
            f"--replay-term {cfg.replay_term}: splits the cross-entropy from a per-step term added to it "
            f"({', '.join(weighable)}); with --method {cfg.method} the replay rows get what every row gets: "
            "leave it out (both)"
        )


def _check_clip(cfg: TrainConfig) -> None:
    """--clip split needs anchored rows apart from the others; the anchored rows' own cap needs --clip split."""
    weighable = added_term_methods()
    if cfg.clip == "split" and (cfg.method not in weighable or cfg.row_gate == "none"):
        why = f"--method {cfg.method} has no such term" if cfg.method not in weighable else "no --row-gate given"
        raise TrainError(
            "--clip split: clips the rows a row gate anchors apart from the others, which needs a per-step term "
            f"added to the cross-entropy ({', '.join(weighable)}) and --row-gate; {why}: leave it out (joint)"
        )
    if cfg.anchored_max_grad_norm is not None and cfg.clip != "split":
        raise TrainError(
            f"anchored_max_grad_norm {cfg.anchored_max_grad_norm}: sets the anchored rows' own clip, which only "
            f"--clip split has (this run clips {cfg.clip}ly); give --clip split or leave it out"
        )


def _check_weights(cfg: TrainConfig) -> None:
    """What is trained and how it is stored: a quantized base takes LoRA only; 8-bit states need bitsandbytes."""
    if cfg.quantize != "none" and cfg.full:
        raise TrainError(
            f"--quantize {cfg.quantize}: the quantized base stays frozen and LoRA adapters are trained on it; "
            "leave out --full"
        )
    if cfg.quantize != "none" or cfg.optim != "adamw":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            flag = f"--quantize {cfg.quantize}" if cfg.quantize != "none" else f"--optim {cfg.optim}"
            raise TrainError(f"{flag}: needs bitsandbytes, the qlora extra: {QLORA_EXTRA}") from None
    if not cfg.full and not [t for t in cfg.lora_targets.split(",") if t.strip()]:
        raise TrainError("--lora-targets is empty; name the modules to adapt, e.g. q_proj,v_proj")


@dataclass(frozen=True)
class Schedule:
    """The learning rate over a run: linear warmup (``warmup_steps``; -1: 3% of the steps), then ``kind``."""

    lr: float
    warmup_steps: int
    kind: str  # cosine, linear, constant or step (x step_gamma each epoch)
    step_gamma: float

    def at(self, step: int, total: int, steps_per_epoch: int) -> float:
        """The rate for optimizer step ``step`` (0-based) of ``total``."""
        warmup = self.warmup_steps if self.warmup_steps >= 0 else max(1, round(0.03 * total))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.step_gamma ** (step // max(steps_per_epoch, 1))
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if self.kind == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class LoopSettings:
    """The options the window loop reads (:meth:`TrainConfig.loop_settings`), and nothing else of the run."""

    batch_size: int  # rows per micro-batch per process
    grad_accum: int  # micro-batches per optimizer step
    epochs: int
    seed: int
    shuffle: bool
    shuffle_buffer: int
    group_by_length: int
    lam: float
    max_grad_norm: float
    clip: str
    anchored_max_grad_norm: float | None
    replay_term: str
    report_to: str
    progress: bool
    save_every: int
    schedule: Schedule


@dataclass(frozen=True)
class PolicySettings:
    """The options loading the policy reads (:meth:`TrainConfig.policy_settings`)."""

    model: str
    cache: str  # as the user named it, for messages
    seed: int
    full: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: str
    quantize: str
    grad_checkpointing: bool
    padding_free: bool
    reference: str  # cache or online
    ref_model: str | None
    direction: str | None
    loss: LossParams

    @property
    def targets(self) -> list[str]:
        """--lora-targets as a list of module names."""
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


@dataclass(frozen=True)
class StartSettings:
    """The options starting or resuming a run reads (:meth:`TrainConfig.start_settings`): the optimizer and the
    schedule's length."""

    optim: str
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    grad_accum: int
    max_steps: int | None
    full: bool


@dataclass(frozen=True)
class Outputs:
    """The options finishing a run reads (:meth:`TrainConfig.outputs`): what it writes beside the checkpoint."""

    model: str
    full: bool
    merge: bool
    quantize: str
    plot: bool


def config_record(cfg: TrainConfig, cache_id: str, world: int = 1, replay_cache_id: str | None = None) -> dict:
    """What a run folder's config.json holds: every field but the storage options (they may hold
    credentials), plus the cache id (and the replay cache's) and the process count."""
    rec = asdict(cfg)
    rec["processes"] = world  # the global batch is batch_size x processes: a run resumes with as many
    rec.pop("storage_options")
    rec.pop("dry_run")  # a dry run writes nothing
    rec["cache_id"] = cache_id
    if replay_cache_id is not None:
        rec["replay_cache_id"] = replay_cache_id
    rec["defaults"] = cfg.defaults_record()
    # --replay none is written as "none": a null, read back with --config, would be left to the recipe (--replay auto)
    rec["replay"] = cfg.replay or "none"
    for key in ("model", "ref_model"):  # a local folder is recorded absolute, so another working directory resumes
        if rec[key] and Path(rec[key]).expanduser().exists():
            rec[key] = str(Path(rec[key]).expanduser().resolve())
    return rec


def record_as_now(old: dict) -> dict:
    """A run folder's config.json (:func:`config_record`) as today's pact-train would record the same run: the
    settings added since, with the value every run had before they existed."""
    old = dict(old)
    old.setdefault("processes", 1)  # runs recorded before data-parallel training were single-process
    old.setdefault("quantize", "none")  # runs recorded before --quantize and --optim
    old.setdefault("optim", "adamw")
    old.setdefault("clip", "joint")  # runs recorded before --clip
    old.setdefault("anchored_max_grad_norm", None)  # runs recorded before it: each group clipped to max_grad_norm
    if old.get("row_gate") != "hard":
        old["gate_at"] = None  # recorded as 0.9 before --gate-at went with the hard gate only
    return old


# ----------------------------------------------------------------------------- the command line


def add_options(p: argparse.ArgumentParser, cls, required: tuple, config_help: str) -> None:
    """``--version``, ``--config FILE`` and one flag per field of the options dataclass ``cls`` (declared with
    :func:`opt`); every dest is the field's name. ``required`` fields may come from the file instead."""
    from pact_cache.cliutil import add_version
    from pact_cache.storage import STORAGE_HELP

    add_version(p)
    p.add_argument("--config", metavar="FILE", help=config_help)
    for f in fields(cls):
        m = f.metadata
        if not m.get("cli", True):
            if f.name == "storage_options":
                p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=STORAGE_HELP)
            continue
        names = [m["short"], _flag(f)] if m.get("short") else [_flag(f)]
        # declared as plain prose (config.json and the docs read it too): a % is argparse's, escaped here once
        help_ = (m["help"] or (_method_help() if f.name == "method" else "")).replace("%", "%%")
        if f.name in required:
            p.add_argument(
                *names, dest=f.name, metavar=m.get("metavar"), help=help_ + " (required, here or in --config)"
            )
        elif isinstance(f.default, bool):
            if m.get("negate"):
                p.add_argument(m["negate"], dest=f.name, action="store_false", help=help_)
            else:
                p.add_argument(*names, dest=f.name, action="store_true", help=help_)
        else:
            shown = f" (default {f.default})" if f.default is not None and m.get("show_default", True) else ""
            extra = {"nargs": m["nargs"], "const": m["const"]} if m.get("nargs") else {}
            p.add_argument(
                *names,
                dest=f.name,
                type=_type(f),
                default=f.default,
                choices=_choices(f),
                metavar=m.get("metavar"),
                help=help_ + shown,
                **extra,
            )


def build_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """pact-train's parser, generated from :class:`TrainConfig`; every dest is the field's name."""
    p = parser_class(
        prog="pact-train",
        description="Fine-tune an aligned model without losing its refusals, one model in memory, the reference's "
        "targets streamed from a pact-cache. With no method flags: the safe recipe (--recipe), the row the study "
        "chose (docs/study.md); --method pact is the paper's PACT.",
    )
    add_options(
        p,
        TrainConfig,
        REQUIRED,
        "YAML or JSON file of these options by field name (batch_size: 8, lam: 1.0, "
        "pact: {T: 2.0}, ...); flags given as well override it. A run folder's config.json is one",
    )
    g = p.add_argument_group("PACT gate and distillation (defaults: the paper's)")
    for f in fields(PactParams):
        g.add_argument(
            _pact_flag(f.name),
            dest=f"pact_{f.name}",
            type=type(f.default),
            default=f.default,
            help=f"{f.metadata.get('help', f.name)} (default {f.default})",
        )
    return p


def read_config_file(path: str, cls=None) -> dict:
    """The options of a ``--config`` file as ``{field: value}``: a YAML or JSON mapping by field name
    (``pact`` a mapping of PactParams fields). Unknown keys, wrong types and unreadable files are one
    line each; the keys config.json records beside the fields (``processes``, ``cache_id``) are ignored."""
    import yaml

    from pact_cache.storage import decode_text, read_limited
    from pact_cache.typedjson import count_values

    src = Path(path).expanduser()
    where = f"--config {path if len(path) <= 200 else path[:197] + '...'}"
    text = decode_text(
        read_limited(src, CONFIG_MAX_BYTES, where, TrainError, "YAML or JSON config file"),
        where,
        TrainError,
        "config file",
    )
    is_json = src.suffix.lower() == ".json"
    try:
        obj = json.loads(text) if is_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, RecursionError) as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else (f" line {err.lineno}" if hasattr(err, "lineno") else "")
        why = (
            "nested too deeply"
            if isinstance(err, RecursionError)
            else str(getattr(err, "problem", None) or getattr(err, "msg", err))
        )
        raise TrainError(f"{where}:{at}: not valid {'JSON' if is_json else 'YAML'} ({why[:100]})") from None
    if count_values(obj, CONFIG_MAX_VALUES) > CONFIG_MAX_VALUES:
        raise TrainError(
            f"{where}: holds more than {CONFIG_MAX_VALUES:,} values once its YAML aliases are expanded; a "
            f"config "
            "file is a mapping of option names to single values"
        )
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise TrainError(f"{where}: must be a mapping of option names to values, not a {type(obj).__name__}")
    cls = cls or TrainConfig
    if cls is TrainConfig and obj.get("gate_at") == GATE_AT and obj.get("row_gate") in ("none", "soft"):
        # what config.json recorded before --gate-at went with the hard gate only
        obj = {k: v for k, v in obj.items() if k != "gate_at"}
    if cls is TrainConfig and "cache_id" in obj and "clip" not in obj:
        # a run folder's config.json from before --clip: that run clipped jointly, whatever the recipe does now
        obj = {**obj, "clip": "joint"}
    if cls is TrainConfig and "cache_id" in obj and "replay" in obj and obj["replay"] is None:
        # a run folder's config.json from before "none" was written out: that run had no replay rows
        obj = {**obj, "replay": "none"}
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in obj.items():
        if key in getattr(cls, "RECORD_ONLY", ()):
            continue
        if key not in known:
            raise TrainError(f"{where}: unknown option {preview(key)}; options are field names: {', '.join(known)}")
        f = known[key]
        if key == "pact":
            out[key] = _pact_from(value, where)
        elif value is True and f.metadata.get("nargs") == "?":  # a flag whose value may be left out, given alone
            out[key] = f.metadata["const"]
        elif key == "storage_options":
            if not isinstance(value, dict):
                raise TrainError(
                    f"{where}: storage_options must be a mapping, e.g. {{endpoint_url: "
                    f"http://localhost:9000}}, "
                    f"not {preview(value)}"
                )
            out[key] = dict(value)
        else:
            out[key] = _coerce(f.name, value, _type(f), f.default is None, where)
    return out


def _coerce(name: str, value, typ, nullable: bool, where: str):
    """A config file's value as the field's type; one line naming the key when it is not one. Numbers
    are range-checked later (:func:`check_config`); integers are never converted through a float, so
    one of 400 digits is refused there by its range, not by an overflow."""
    if value is None and nullable:
        return None
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ in (int, float) and not isinstance(value, bool):
        if isinstance(value, int):
            return value if typ is int else _as_float(value)
        if isinstance(value, float) and (typ is float or value.is_integer()):
            return typ(value)
        if isinstance(value, str) and len(value) <= 100:  # YAML reads 3e-5 (no dot) as a string
            try:
                v = float(value)
                return typ(v) if typ is float or v.is_integer() else v
            except (ValueError, OverflowError):
                pass
    elif isinstance(value, str):
        return value
    kind = (
        "an integer" if typ is int else "a number" if typ is float else "true or false" if typ is bool else "a string"
    )
    raise TrainError(f"{where}: {name}: {preview(value)} is not {kind}")


def _as_float(v: int):
    """An integer as a float, or itself when it is too large for one (then the range check refuses it)."""
    try:
        return float(v)
    except OverflowError:
        return v


def _pact_from(value, where: str) -> PactParams:
    if not isinstance(value, dict):
        raise TrainError(
            f"{where}: pact must be a mapping of PACT parameters, e.g. {{T: 2.0, N: 8}}, not {preview(value)}"
        )
    known = {f.name: f for f in fields(PactParams)}
    bad = [k for k in value if k not in known]
    if bad:
        raise TrainError(f"{where}: pact: unknown parameter {preview(bad[0])}; they are {', '.join(known)}")
    return PactParams(**{k: _coerce(f"pact.{k}", v, type(known[k].default), False, where) for k, v in value.items()})


def parse_config(argv: list[str] | None, parser_class=argparse.ArgumentParser) -> TrainConfig:
    """pact-train's arguments -> a checked-later TrainConfig (:func:`parse_options`)."""
    return parse_options(TrainConfig, build_parser(parser_class), argv, REQUIRED)


def parse_options(cls, parser: argparse.ArgumentParser, argv: list[str] | None, required: tuple, error=None):
    """A command's arguments -> an instance of its options dataclass ``cls``, checked later: the ``--config``
    file's values become the parser's defaults, so a flag given on the command line always wins (TRL's
    TrlParser does the same); ``pact`` (TrainConfig) and ``storage_options`` are merged, not replaced."""
    from pact_cache.storage import parse_storage_options

    error = error or TrainError
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    filed = read_config_file(known.config, cls) if known.config else {}
    defaults = {k: v for k, v in filed.items() if k not in ("pact", "storage_options")}
    if "pact" in filed:
        defaults.update({f"pact_{k}": v for k, v in asdict(filed["pact"]).items()})
    parser.set_defaults(**defaults)
    ns = parser.parse_args(argv)
    names = {f.name for f in fields(cls)}
    values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    if "pact" in names:
        values["pact"] = PactParams(**{f.name: getattr(ns, f"pact_{f.name}") for f in fields(PactParams)})
    if "storage_options" in names:
        values["storage_options"] = {**filed.get("storage_options", {}), **parse_storage_options(ns.storage_option)}
    values.update({k: v for k, v in filed.items() if k not in values})  # fields with no flag (step_gamma, plot, ...)
    missing = [_flag(f) for f in fields(cls) if f.name in required and values.get(f.name) is None]
    if missing:
        raise error(
            f"missing {', '.join(missing)}: give {'it' if len(missing) == 1 else 'them'} as flags or in --config"
        )
    return cls(**values)


def check_options(obj) -> None:
    """Every option's type and range, from its declaration (:func:`opt`), in one line naming its flag."""
    _check_fields(obj, lambda f: _flag(f) if f.metadata.get("cli", True) else f.name)
