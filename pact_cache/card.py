"""The cache card: a ``README.md`` beside the manifest that describes the cache to a person who
opens the folder (or its page on the Hub) and lets ``datasets.load_dataset(folder)`` read the raw
rows with no arguments.

The card is documentation, derived from the manifest alone: it is not part of the cache id, a
reader never reads it, and every command that writes a cache (build, cp, merge, filter, score,
upgrade) writes it just before the manifest, so it always says what the manifest says. A Hugging
Face dataset card: YAML front matter (``configs``/``data_files`` for the parts, license, source,
tags), then a summary.
"""

from __future__ import annotations

import json

from .columns import REF_COLUMNS, stored
from .manifest import Manifest

CARD = "README.md"


def _printable(s: str) -> str:
    """``s`` with every character that is not printable (controls, DEL, C1 controls, line and paragraph
    separators, lone surrogates from file names that are not UTF-8) as a ``\\u``/``\\U`` escape."""

    def esc(c: str) -> str:
        o = ord(c)
        return c if c.isprintable() else (f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")

    return "".join(esc(c) for c in s)


def _yaml_str(s: str) -> str:
    """``s`` as a YAML double-quoted scalar that any parser reads back as ``s``: JSON's escapes (quotes,
    backslashes, C0 controls), then an escape for every other character that is not printable, which
    YAML does not allow raw (:func:`_printable`)."""
    return _printable(json.dumps(s, ensure_ascii=False))


def card_text(m: Manifest, rows: int | None = None) -> str:
    """The card of the cache whose manifest is ``m``."""
    c = m.counts
    ref_digest = next(iter(sorted(m.reference.weights_sha256.values())), "")[:12]
    source = m.dataset.source or "unknown"
    shown, ref_name = (
        _printable(source),
        _printable(m.reference.name),
    )  # the body: printable text whatever the names hold
    columns = [
        ("example_id", "string", "the row's id: its index in the source and a digest of its messages"),
        ("input_ids", "list<int32>", "prompt (chat template) and response token ids"),
        ("response_start", "int32", "index of the first response token in input_ids"),
    ]
    role = {
        "f32": "float32 values",
        "q": "q8 codes: the distance below the step's maximum, log1p-companded",
        "top": "the step's maximum, uint16 fixed point",
    }
    for col in REF_COLUMNS:
        for name, (dtype, width) in stored(col, m.encoding).items():
            shape = "[n, K]" if width == "K" else "[n]"
            what = (
                role["f32"]
                if name.endswith("_f32")
                else ("uint16 fixed point" if width == 1 and name.endswith("_q") else role[name.rsplit("_", 1)[1]])
            )
            columns.append((name, f"binary: {dtype} {shape}", f"{col.meaning} ({what})"))
    if m.scores is not None:
        columns.append(
            ("(scores-*.parquet)", "binary: <f4 [n]", f"TOSS token scores ({m.scores.algorithm}), sidecar files")
        )
    lines = [
        "---",
        "license: other",
        "license_name: the dataset's and the reference model's terms",
        f"pretty_name: {_yaml_str('pact-cache of ' + source)}",
        "tags: [pact-cache, safety, alignment, distillation]",
        f"source_datasets: [{_yaml_str(source)}]",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: part-*.parquet",
        "---",
        "",
        f"# pact-cache `{m.cache_id[:12]}`",
        "",
        "Reference log-probabilities of a few *safety tokens* at every response step of a fine-tuning "
        "dataset, cached once so that training with PACT (or STR, constrained SFT, ...) needs no second "
        "model: `pact-train --cache THIS_FOLDER`. Written by pact-cache from the manifest; the manifest "
        "(`manifest.json`) is the authority, this card is documentation and not part of the cache id.",
        "",
        "| | |",
        "| --- | --- |",
        f"| cache id | `{m.cache_id}` |",
        f"| format | {m.format}, encoding {m.encoding.name}, build algorithm {m.build.algorithm} |",
        f"| reference | {ref_name} (weights sha256 {ref_digest}...)"
        + (f", loaded in {m.build.quantization} (`build --quantize`)" if m.build.quantization else "")
        + " |",
        f"| tokenizer | sha256 {m.tokenizer.sha256[:12]}..., vocabulary {m.tokenizer.vocab_size:,} |",
        f"| dataset | {shown} (fingerprint {m.dataset.sha256[:12]}...) |",
        f"| rows / response steps | {c.rows:,} / {c.response_steps:,} ({c.truncated_rows:,} truncated; skipped: "
        + (", ".join(f"{k} {v}" for k, v in c.skipped.items()) or "none")
        + ") |",
        f"| parts | {len(m.parts)} (`part-*.parquet`, zstd Parquet) |",
        f"| safety tokens | K={m.tokens.K}, selected by {m.tokens.method} |",
        "",
        "Safety tokens by weight: " + m.tokens.describe(),
        "",
        "## Columns (one row per example; n = len(input_ids) - response_start, K safety tokens)",
        "",
        "| column | type | meaning |",
        "| --- | --- | --- |",
        *[f"| `{n}` | {t} | {d.replace('|', chr(92) + '|')} |" for n, t, d in columns],  # a bare | would end the cell
        "",
        "Decoded float32 views: `pact_cache.open_cache(folder).to_arrow()` / `.to_polars()`; the byte "
        "layout is specified in pact-cache's docs/format.md.",
        "",
        "## Check it",
        "",
        "```bash",
        "pip install pact-cache",
        f"pact-cache verify THIS_FOLDER --cache-id {m.cache_id[:12]}   # schema, sizes, sha256 of every part, values",
        "```",
        "",
    ]
    return "\n".join(lines)


def publish(loc, m: Manifest) -> None:
    """Write the card, then the manifest: the rule every command that writes a cache follows (the
    manifest last, so a reader sees the whole cache or none)."""
    from .format import MANIFEST
    from .storage import json_bytes

    loc.put_bytes(CARD, card_text(m).encode("utf-8"))
    loc.put_bytes(MANIFEST, json_bytes(m.to_json()))
