"""Typed ``manifest.json`` and ``tokens.json``: parsed and validated once, at the edge.

Everything a cache or a tokens file says arrives here as untrusted JSON. :func:`load_json` reads it
(strict UTF-8, no NaN/Infinity, bounded size and depth), and the ``parse`` methods turn it into
frozen dataclasses, checking every field's type, range and length, with one message per violation
that names the field. The rest of the code reads attributes, never dicts.

The cache id is derived from content (:meth:`Manifest.content_id`), so a manifest edited by hand,
or a part swapped for another, no longer matches the id it carries.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from .errors import CacheError, TokensError, preview
from .typedjson import _Fields, hash_identity

FORMAT = "pact-cache/2"
LEGACY_FORMATS = ("pact-cache/1",)
TOKENS_FORMAT = "pact-tokens/1"
# Version of the code that computes the stored values (projection.compute_rows through projection.response_logprobs, and
# the encoders). Bump it whenever a change could alter a stored byte: it is part of the cache id.
ALGORITHM = "pact-ref/1"
# pact-ref/1 projected with the bare head (plus Gemma's softcapping); for a model that scales its
# logits (Cohere, Granite, ...) its values were not the model's. Those models' caches now say
# this, so that no build resumes, and no --reuse copies, parts of the old values.
ALGORITHM_SCALED_HEAD = "pact-ref/2"
MANIFEST_MAX_BYTES = 64 << 20  # a manifest is a few KiB per 1,000 parts; anything larger is refused
_QUANTIZATION = re.compile(r"nf4|int8")  # BuildParams.quantization (pact_cache.models.QUANTIZE less none)
_HEX64 = re.compile(r"[0-9a-f]{64}")
PART_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.parquet$")


# ----------------------------------------------------------------------------- tokens.json


def describe_by_weight(pairs) -> str:
    """S by weight, for people: ``"'t" 0.48, "'m" 0.43, ...`` from ``(token, weight)`` pairs."""
    return ", ".join(f"{s!r} {w:.2f}" for s, w in pairs)


@dataclass(frozen=True)
class SafetyTokens:
    """The safety-token set S (``tokens.json``, format ``pact-tokens/1``)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    strings: tuple[str, ...] | None = None
    method: str = "unknown"
    params: dict = field(default_factory=dict)  # provenance only (how S was selected); never read
    aligned: dict | None = None  # provenance: fingerprint of the aligned model
    base: dict | None = None  # provenance: fingerprint of the base model
    mean_aligned_prob: tuple[float, ...] | None = None

    @property
    def K(self) -> int:
        return len(self.ids)

    def by_weight(self) -> list[tuple[str, float]]:
        """``(token, weight)`` heaviest first (the token's string when the file has them, else its id)."""
        names = self.strings if self.strings is not None else tuple(str(i) for i in self.ids)
        return sorted(zip(names, self.weights), key=lambda x: -x[1])

    def describe(self) -> str:
        return describe_by_weight(self.by_weight())

    @classmethod
    def parse(cls, obj, where: str, error=TokensError, vocab_size: int | None = None) -> "SafetyTokens":
        f = _Fields(obj, where, "", error)
        fmt = obj.get("format")
        if fmt != TOKENS_FORMAT:
            f.fail(f"is not a {TOKENS_FORMAT} file (format={preview(fmt)}); make one with `pact-cache tokens`")
        ids = f.list("ids", min_len=1)
        for j, i in enumerate(ids):
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                f.fail(f"ids[{j}] must be a non-negative integer, not {preview(i)}")
            if vocab_size is not None and i >= vocab_size:
                f.fail(f"ids[{j}] = {i} is outside the vocabulary (size {vocab_size})")
        if len(set(ids)) != len(ids):
            f.fail("ids has duplicates; each safety token must appear once")
        weights = f.list("weights")
        if len(weights) != len(ids):
            f.fail(f"weights must hold {len(ids)} numbers, one per id (it holds {len(weights)})")
        for j, w in enumerate(weights):
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                f.fail(f"weights[{j}] must be a finite number, not {preview(w)}")
        if max(weights) <= 0:
            f.fail(
                "every weight is <= 0; the loss clamps weights at 0, so no token would be constrained (PACT would "
                "be plain SFT)"
            )
        strings = f.list("strings", optional=True)
        if strings is not None and (len(strings) != len(ids) or not all(isinstance(s, str) for s in strings)):
            f.fail(f"strings must hold {len(ids)} strings, one per id")
        mean_p = f.list("mean_aligned_prob", optional=True)
        if mean_p is not None and (
            len(mean_p) != len(ids)
            or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) for p in mean_p)
        ):
            f.fail(f"mean_aligned_prob must hold {len(ids)} finite numbers")
        method = f.str("method", optional=True) or "unknown"
        params = f.obj_("params", optional=True) or {}
        aligned = f.obj_("aligned", optional=True)
        base = f.obj_("base", optional=True)
        return cls(
            tuple(ids),
            tuple(float(w) for w in weights),
            tuple(strings) if strings is not None else None,
            method,
            params,
            aligned,
            base,
            tuple(float(p) for p in mean_p) if mean_p is not None else None,
        )

    def content(self) -> dict:
        """What the cache id covers: the set, its weights and how it was chosen, not where (paths)."""
        return {
            "ids": list(self.ids),
            "weights": list(self.weights),
            "strings": list(self.strings) if self.strings else None,
            "method": self.method,
        }

    def to_json(self) -> dict:
        out = {
            "format": TOKENS_FORMAT,
            "ids": list(self.ids),
            "weights": list(self.weights),
            "method": self.method,
            "params": self.params,
            "aligned": self.aligned,
            "base": self.base,
        }
        if self.strings is not None:
            out["strings"] = list(self.strings)
        if self.mean_aligned_prob is not None:
            out["mean_aligned_prob"] = list(self.mean_aligned_prob)
        return out


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoding:
    """How the reference columns are stored (see the format spec in ``format.py``)."""

    name: str  # q8 | f32
    scale: float = 0.0  # q8: log1p companding scale of the per-token distance below the step maximum
    floor: float = 0.0  # q8: distances beyond this many nats are stored at the floor
    top_scale: float = 0.0  # q8: fixed-point scale of the per-step maximum (uint16)
    target_scale: float = 0.0  # q8: fixed-point scale of the target log-prob (uint16)

    @property
    def max_code(self) -> int:
        """Largest byte the q8 encoder can write; a larger one in a part is refused."""
        return int(round(self.scale * math.log1p(self.floor)))

    @classmethod
    def parse(cls, obj, where: str, error=CacheError) -> "Encoding":
        f = _Fields(obj, where, "encoding", error)
        name = f.str("name")
        if name == "f32":
            return cls("f32")
        if name != "q8":
            f.fail(f"name {preview(name)} is unknown; known: f32, q8")
        # ranges keep every decoded value finite and every code inside one byte / uint16
        scale = f.float("scale", 1.0, 255.0)
        floor = f.float("floor", 0.0, 1000.0, lo_open=True)
        if round(scale * math.log1p(floor)) > 255:
            f.fail(f"scale {scale} with floor {floor} needs codes above 255; they do not fit one byte")
        top = f.float("top_scale", 1.0, 65535.0)
        target = f.float("target_scale", 1.0, 65535.0)
        return cls("q8", scale, floor, top, target)

    def to_json(self) -> dict:
        if self.name == "f32":
            return {"name": "f32"}
        return {
            "name": "q8",
            "scale": self.scale,
            "floor": self.floor,
            "top_scale": self.top_scale,
            "target_scale": self.target_scale,
        }


ENCODINGS = {"q8": Encoding("q8", 28.0, 40.0, 512.0, 256.0), "f32": Encoding("f32")}


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class PartEntry:
    name: str
    rows: int
    steps: int
    bytes: int
    sha256: str  # of the whole file
    rows_sha256: str  # of the rows' example_id, response_start and input_ids (format.rows_digest)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "rows": self.rows,
            "steps": self.steps,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "rows_sha256": self.rows_sha256,
        }


@dataclass(frozen=True)
class ScoreFile:
    """The token scores of one part: a sidecar Parquet file in the cache folder."""

    part: str  # the part whose rows it scores, in the same order
    name: str
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"part": self.part, "name": self.name, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class Scores:
    """Per-token scores added by ``pact-cache score`` (TOSS): ``log p_degraded(y_t) - log p_utility(y_t)``
    at every response step, one sidecar file per part. Part of the cache id."""

    algorithm: str
    degraded: dict  # model fingerprint: name, path, revision, weights_sha256
    utility: dict
    files: tuple[ScoreFile, ...]

    def content(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "degraded": self.degraded.get("weights_sha256"),
            "utility": self.utility.get("weights_sha256"),
            "files": [f.to_json() for f in self.files],
        }

    def to_json(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "degraded": self.degraded,
            "utility": self.utility,
            "files": [f.to_json() for f in self.files],
        }

    @classmethod
    def parse(cls, obj, where: str, parts: tuple[PartEntry, ...]) -> "Scores":
        f = _Fields(obj, where, "scores", CacheError)
        algorithm = f.str("algorithm")
        models = {}
        for key in ("degraded", "utility"):
            m = f.obj_(key)
            w = m.get("weights_sha256")
            if (
                not isinstance(w, dict)
                or not w
                or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in w.values())
            ):
                f.fail(f"{key}.weights_sha256 must map weight files to 64 lowercase hex characters")
            models[key] = dict(m)
        raw = f.list("files")
        if len(raw) != len(parts):
            f.fail(
                f"files lists {len(raw)} score files for {len(parts)} parts; there must be one per part, in part order"
            )
        part_names = {p.name for p in parts}
        files, seen = [], set()
        for j, (x, part) in enumerate(zip(raw, parts)):
            sf = _Fields(x, where, f"scores.files[{j}]", CacheError)
            name = sf.str("name", pattern=PART_NAME, what="a plain .parquet file name (no folders, no leading dot)")
            if name in seen or name in part_names:
                sf.fail(f"name {preview(name)} is listed twice or is a part's name")
            seen.add(name)
            if sf.str("part") != part.name:
                sf.fail(
                    f"scores part {preview(x.get('part'))}, but parts[{j}] is {preview(part.name)}; score files "
                    f"follow the parts' order"
                )
            files.append(
                ScoreFile(
                    part.name,
                    name,
                    sf.int("bytes", 1),
                    sf.str("sha256", pattern=_HEX64, what="64 lowercase hex characters"),
                )
            )
        return cls(algorithm, models["degraded"], models["utility"], tuple(files))


@dataclass(frozen=True)
class Reference:
    """The reference model: where it came from (provenance) and its weights' digests (identity)."""

    name: str
    weights_sha256: dict  # file name -> sha256 of that weight file
    path: str | None = None
    revision: str | None = None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "revision": self.revision,
            "weights_sha256": dict(self.weights_sha256),
        }


@dataclass(frozen=True)
class Tokenizer:
    sha256: str  # models.tokenizer_fingerprint: vocabulary, special tokens, chat template
    vocab_size: int
    chat_template_sha256: str | None = None

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "chat_template_sha256": self.chat_template_sha256}


@dataclass(frozen=True)
class DatasetInfo:
    sha256: str  # data.dataset_fingerprint over the files read
    source: str | None = None
    files: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "source": self.source, "files": list(self.files)}


@dataclass(frozen=True)
class BuildParams:
    """Everything about the computation that can change a stored value."""

    max_length: int | None
    batch_size: int  # batch composition changes float results in the last bits
    rows_per_part: int
    dtype: str
    device: str
    assistant_header_ids: tuple[int, ...]
    vocab_size: int  # rows of the reference's output layer; input ids and token ids are below it
    algorithm: str = ALGORITHM
    reused: tuple[str, ...] = ()  # ids of caches whose rows were copied (--reuse): their batches, not this build's
    # the reference's linear layers as loaded (pact-cache build --quantize): nf4 or int8; None = as stored, in dtype.
    # Written only when set, so that caches of unquantized references keep their ids.
    quantization: str | None = None

    def to_json(self) -> dict:
        out = {
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "rows_per_part": self.rows_per_part,
            "dtype": self.dtype,
            "device": self.device,
            "assistant_header_ids": list(self.assistant_header_ids),
            "vocab_size": self.vocab_size,
            "algorithm": self.algorithm,
        }
        if self.reused:
            out["reused"] = list(self.reused)
        if self.quantization:
            out["quantization"] = self.quantization
        return out

    def reuse_key(self) -> dict:
        """What must match for a row computed by another build to be copied into this one: everything
        that decides a row's values except batch composition (batch size, part size) and device."""
        return {
            "max_length": self.max_length,
            "dtype": self.dtype,
            "assistant_header_ids": list(self.assistant_header_ids),
            "vocab_size": self.vocab_size,
            "algorithm": self.algorithm,
            **({"quantization": self.quantization} if self.quantization else {}),
        }


@dataclass(frozen=True)
class Counts:
    rows: int
    response_steps: int
    input_tokens: int
    truncated_rows: int
    skipped: dict  # reason -> rows skipped
    skipped_rows: dict  # reason -> first locations (for people)

    def to_json(self) -> dict:
        return {
            "rows": self.rows,
            "response_steps": self.response_steps,
            "input_tokens": self.input_tokens,
            "truncated_rows": self.truncated_rows,
            "skipped": dict(self.skipped),
            "skipped_rows": {k: list(v) for k, v in self.skipped_rows.items()},
        }


@dataclass(frozen=True)
class Identity:
    """What determines the stored values, before any part exists; its hash is the build key that
    a resumed build and every part it writes carry."""

    reference_weights: dict
    tokenizer: Tokenizer
    tokens: SafetyTokens
    dataset_sha256: str
    build: BuildParams
    encoding: Encoding

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "reference_weights": dict(self.reference_weights),
            "tokenizer": self.tokenizer.to_json(),
            "tokens": self.tokens.content(),
            "dataset": self.dataset_sha256,
            "build": self.build.to_json(),
            "encoding": self.encoding.to_json(),
        }

    def key(self) -> str:
        return hash_identity("pact-cache/build-key", self.to_json())

    def reuse_key(self) -> str:
        """Equal for two builds whose rows are interchangeable (see :meth:`BuildParams.reuse_key`)."""
        return hash_identity(
            "pact-cache/reuse-key",
            {
                "reference_weights": dict(self.reference_weights),
                "tokenizer": self.tokenizer.to_json(),
                "tokens": self.tokens.content(),
                "build": self.build.reuse_key(),
                "encoding": self.encoding.to_json(),
            },
        )


@dataclass(frozen=True)
class Manifest:
    format: str
    cache_id: str
    tool_version: str
    reference: Reference
    tokenizer: Tokenizer
    tokens: SafetyTokens
    dataset: DatasetInfo
    build: BuildParams
    encoding: Encoding
    counts: Counts
    parts: tuple[PartEntry, ...]
    scores: Scores | None = None

    @property
    def identity(self) -> Identity:
        return Identity(
            self.reference.weights_sha256, self.tokenizer, self.tokens, self.dataset.sha256, self.build, self.encoding
        )

    def content_id(self) -> str:
        """The cache id: identity (weights, tokenizer, tokens, dataset, build parameters, algorithm,
        encoding) plus counts and every part's name, sizes, sha256 and rows digest. Provenance
        (model name and path, dataset path, the locations of skipped rows, tool version) is not part of it."""
        counts = {k: v for k, v in self.counts.to_json().items() if k != "skipped_rows"}  # those name source paths
        content = {"identity": self.identity.to_json(), "counts": counts, "parts": [p.to_json() for p in self.parts]}
        if self.scores is not None:  # a cache with token scores is another cache
            content["scores"] = self.scores.content()
        return hash_identity("pact-cache/cache-id", content)

    def with_content_id(self) -> "Manifest":
        return replace(self, cache_id=self.content_id())

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "cache_id": self.cache_id,
            "tool": {"name": "pact-cache", "version": self.tool_version},
            "reference": self.reference.to_json(),
            "tokenizer": self.tokenizer.to_json(),
            "tokens": self.tokens.to_json(),
            "dataset": self.dataset.to_json(),
            "build": self.build.to_json(),
            "encoding": self.encoding.to_json(),
            "counts": self.counts.to_json(),
            "parts": [p.to_json() for p in self.parts],
            **({"scores": self.scores.to_json()} if self.scores is not None else {}),
        }

    @classmethod
    def parse(cls, obj, where: str, check_id: bool = True) -> "Manifest":
        """Check every rule of the format spec that a manifest alone can break; see ``format.py``.
        ``check_id=False`` skips only the content-id rule (for tools that re-identify a manifest)."""
        if isinstance(obj, dict) and obj.get("format") in LEGACY_FORMATS:
            raise CacheError(
                f"{where}: format {obj['format']} has no content-checked id or row digests, which this "
                f"pact-cache requires ({FORMAT}); rebuild the cache, or run `pact-cache upgrade CACHE -o "
                f"NEW` "
                "on a copy you trust"
            )
        f = _Fields(obj, where, "", CacheError)
        fmt = obj.get("format")
        if fmt != FORMAT:
            f.fail(
                f"format is {preview(fmt)}; this pact-cache reads {FORMAT!r}: upgrade pact-cache or rebuild the cache"
            )
        cache_id = f.str("cache_id", pattern=_HEX64, what="64 lowercase hex characters")
        tool = f.sub("tool")
        tool_version = tool.str("version")

        r = f.sub("reference")
        weights = r.obj_("weights_sha256")
        if not weights:
            r.fail("weights_sha256 must name at least one weight file")
        for k, v in weights.items():
            if not isinstance(v, str) or _HEX64.fullmatch(v) is None:
                r.fail(f"weights_sha256[{preview(k)}] must be 64 lowercase hex characters")
        reference = Reference(
            r.str("name"), dict(weights), r.str("path", optional=True), r.str("revision", optional=True)
        )

        t = f.sub("tokenizer")
        tokenizer = Tokenizer(
            t.str("sha256", pattern=_HEX64, what="64 lowercase hex characters"),
            t.int("vocab_size", 1),
            t.str("chat_template_sha256", optional=True),
        )

        b = f.sub("build")
        header = b.list("assistant_header_ids", min_len=1)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in header):
            b.fail("assistant_header_ids must be non-negative integers")
        vocab = b.int("vocab_size", 1)
        if any(i >= vocab for i in header):
            b.fail(f"assistant_header_ids reach beyond vocab_size {vocab}")
        reused = b.list("reused", optional=True) or []
        if not all(isinstance(x, str) and _HEX64.fullmatch(x) for x in reused):
            b.fail("reused must list cache ids (64 lowercase hex characters)")
        build = BuildParams(
            b.int("max_length", 2, optional=True),
            b.int("batch_size", 1),
            b.int("rows_per_part", 1),
            b.str("dtype"),
            b.str("device"),
            tuple(header),
            vocab,
            b.str("algorithm"),
            tuple(reused),
            b.str("quantization", optional=True, pattern=_QUANTIZATION, what="nf4 or int8"),
        )

        tokens = SafetyTokens.parse(f.obj_("tokens"), f"{where}: tokens", CacheError, vocab_size=vocab)
        encoding = Encoding.parse(f.obj_("encoding"), where)
        d = f.sub("dataset")
        files = d.list("files", optional=True) or []
        if not all(isinstance(x, str) for x in files):
            d.fail("files must be strings")
        dataset = DatasetInfo(
            d.str("sha256", pattern=_HEX64, what="64 lowercase hex characters"),
            d.str("source", optional=True),
            tuple(files),
        )

        parts = []
        seen = set()
        for j, p in enumerate(f.list("parts")):
            pf = _Fields(p, where, f"parts[{j}]", CacheError)
            name = pf.str(
                "name",
                pattern=PART_NAME,
                what="a plain .parquet file name (no folders, no leading dot); "
                "the manifest may point outside the cache, refusing it",
            )
            if name in seen:
                pf.fail(f"name {preview(name)} is listed twice")
            seen.add(name)
            parts.append(
                PartEntry(
                    name,
                    pf.int("rows", 0),
                    pf.int("steps", 0),
                    pf.int("bytes", 1),
                    pf.str("sha256", pattern=_HEX64, what="64 lowercase hex characters"),
                    pf.str("rows_sha256", pattern=_HEX64, what="64 lowercase hex characters"),
                )
            )
            if parts[-1].steps < parts[-1].rows:
                pf.fail(f"has {parts[-1].steps} steps for {parts[-1].rows} rows; every row has at least one step")

        c = f.sub("counts")
        skipped = c.obj_("skipped", optional=True) or {}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in skipped.values()):
            c.fail("skipped must map reasons to non-negative integers")
        skipped_rows = c.obj_("skipped_rows", optional=True) or {}
        if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in skipped_rows.values()):
            c.fail("skipped_rows must map reasons to lists of strings")
        counts = Counts(
            c.int("rows", 0),
            c.int("response_steps", 0),
            c.int("input_tokens", 0),
            c.int("truncated_rows", 0),
            dict(skipped),
            {k: list(v) for k, v in skipped_rows.items()},
        )
        if counts.rows != sum(p.rows for p in parts):
            c.fail(f"rows is {counts.rows} but the parts hold {sum(p.rows for p in parts)}")
        if counts.response_steps != sum(p.steps for p in parts):
            c.fail(f"response_steps is {counts.response_steps} but the parts hold {sum(p.steps for p in parts)}")
        if any(p.rows == 0 for p in parts) and counts.rows:
            f.fail("a part holds zero rows in a cache that is not empty")

        scores = Scores.parse(obj["scores"], where, tuple(parts)) if obj.get("scores") is not None else None
        m = cls(
            fmt,
            cache_id,
            tool_version,
            reference,
            tokenizer,
            tokens,
            dataset,
            build,
            encoding,
            counts,
            tuple(parts),
            scores,
        )
        want = m.content_id()
        if check_id and want != cache_id:
            raise CacheError(
                f"{where}: cache_id {cache_id[:12]} does not match the manifest's content (it hashes to "
                f"{want[:12]}); "
                "the manifest was edited or damaged: re-download or rebuild the cache"
            )
        return m


def check_pin(cache_id: str, pin: str | None, where: str) -> None:
    """``--cache-id``: the full id or a prefix of at least 8 hex characters, the way one pins a commit."""
    if pin is None:
        return
    p = pin.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", p):
        raise CacheError(
            f"--cache-id {preview(pin)}: give the cache id (or at least its first 8 hex characters), as "
            f"`pact-cache info` prints it"
        )
    if not cache_id.startswith(p):
        raise CacheError(
            f"{where}: cache id is {cache_id[:12]}, not the pinned {p[:12]}; this is not the cache you "
            f"pinned "
            "(someone changed or replaced it): get the pinned cache, or pin the new id if you trust it"
        )
