"""``pact-cache upgrade``: turn a ``pact-cache/1`` cache into ``pact-cache/2`` in a new folder.

Format 1 carried the same parts but neither a content-derived id nor row digests. Upgrading checks
every part against the old manifest (regular file, size, sha256, schema, values), copies it, adds
each part's rows digest, and writes a version-2 manifest whose id is derived from its content.
The stored values are not recomputed: upgrade a cache you trust, or rebuild it.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from .card import CARD, card_text
from .errors import CacheError, OutputExistsError, preview
from .format import MANIFEST, Cache
from .manifest import (
    ALGORITHM,
    FORMAT,
    LEGACY_FORMATS,
    MANIFEST_MAX_BYTES,
    PART_NAME,
    BuildParams,
    Counts,
    DatasetInfo,
    Encoding,
    Manifest,
    PartEntry,
    Reference,
    SafetyTokens,
    Tokenizer,
)
from .storage import Location, atomic_write_json, check_regular_file, staged_dir
from .typedjson import _Fields, load_json


def _legacy_manifest(src: str) -> Manifest:
    """Parse a version-1 manifest into a version-2 one whose parts still lack rows digests."""
    loc = Location(src)
    fs, root = loc.fs, loc.root
    where = loc.where(MANIFEST)
    if not fs.exists(f"{root}/{MANIFEST}"):
        raise CacheError(f"{src}: has no {MANIFEST}; pass the folder of a finished pact-cache/1 cache")
    check_regular_file(fs, root, f"{root}/{MANIFEST}", where, max_size=MANIFEST_MAX_BYTES)
    obj = load_json(
        loc.read_bytes(MANIFEST, MANIFEST_MAX_BYTES),
        where,
        CacheError,
        "manifest",
        fix="the manifest is damaged: rebuild the cache",
    )
    f = _Fields(obj, where, "", CacheError)
    if obj.get("format") not in LEGACY_FORMATS:
        f.fail(f"format is {preview(obj.get('format'))}; upgrade reads {', '.join(LEGACY_FORMATS)} caches only")
    r, t, b, d, c = f.sub("reference"), f.sub("tokenizer"), f.sub("build"), f.sub("dataset"), f.sub("counts")
    vocab = b.int("vocab_size", 1)
    build = BuildParams(
        b.int("max_length", 2, optional=True),
        b.int("batch_size", 1),
        b.int("rows_per_part", 1),
        b.str("dtype"),
        b.str("device"),
        tuple(b.list("assistant_header_ids", min_len=1)),
        vocab,
        ALGORITHM,
    )
    parts = []
    for j, p in enumerate(f.list("parts")):
        pf = _Fields(p, where, f"parts[{j}]", CacheError)
        parts.append(
            PartEntry(
                pf.str("name", pattern=PART_NAME, what="a plain .parquet file name"),
                pf.int("rows", 0),
                pf.int("steps", 0),
                pf.int("bytes", 1),
                pf.str("sha256"),
                "0" * 64,
            )
        )
    m = Manifest(
        FORMAT,
        "0" * 64,
        f.sub("tool").str("version"),
        Reference(
            r.str("name"),
            dict(r.obj_("weights_sha256")),
            r.str("path", optional=True),
            r.str("revision", optional=True),
        ),
        Tokenizer(t.str("sha256"), t.int("vocab_size", 1), t.str("chat_template_sha256", optional=True)),
        SafetyTokens.parse(f.obj_("tokens"), f"{where}: tokens", CacheError, vocab_size=vocab),
        DatasetInfo(d.str("sha256"), d.str("source", optional=True), tuple(d.list("files", optional=True) or ())),
        build,
        Encoding.parse(f.obj_("encoding"), where),
        Counts(
            c.int("rows", 0),
            c.int("response_steps", 0),
            c.int("input_tokens", 0),
            c.int("truncated_rows", 0),
            dict(c.obj_("skipped", optional=True) or {}),
            dict(c.obj_("skipped_rows", optional=True) or {}),
        ),
        tuple(parts),
    )
    return m


def upgrade(src: str, dst: str) -> Manifest:
    out = Path(dst).expanduser()
    if out.exists() or out.is_symlink():
        raise OutputExistsError(
            f"{out}: exists; upgrade writes a new folder (nothing is overwritten): choose another -o"
        )
    legacy = _legacy_manifest(str(src))
    # Read it with the version-2 reader's checks: type, size, sha256, schema, every value
    cache = Cache(str(src), legacy, verify_checksums=True)
    with staged_dir(out) as tmp:  # OUT appears whole, or not at all
        parts = []
        for part in legacy.parts:
            found: dict = {}
            for _ in cache.scan_part(part, found):  # checks type, size, sha256, schema and every value
                pass
            with cache.fs.open(cache.part_path(part), "rb") as fin, open(tmp / part.name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            parts.append(PartEntry(part.name, part.rows, part.steps, part.bytes, part.sha256, found["rows_sha256"]))
        m = replace(legacy, parts=tuple(parts)).with_content_id()
        Manifest.parse(m.to_json(), f"{out}/{MANIFEST}")  # the new manifest obeys every rule
        (tmp / CARD).write_text(card_text(m), encoding="utf-8")
        atomic_write_json(tmp / MANIFEST, m.to_json())
    return m
