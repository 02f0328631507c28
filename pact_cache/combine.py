"""``pact-cache merge`` and ``pact-cache diff``: caches as sets of rows.

merge: caches built with the same reference, tokenizer, safety tokens, encoding, max length and
dtype (the same reuse key as ``build --reuse``) are concatenated, in the order given, into a new
cache. Rows are renumbered (``{index:08d}-{content hash}``, the content hash kept), so the result is
exactly the cache of the concatenated datasets: ``verify --dataset`` on a folder holding the source
files in that order passes. Values are copied as stored (decoding and re-encoding q8 is exact).

diff: rows are matched by their tokenised input (input ids and response start). Rows only in A
are removed, only in B added; matched rows whose values differ are changed, with the largest and
mean absolute difference per column. Identity fields that differ are listed first: values are
compared only when both caches use the same safety tokens.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np

from . import __version__
from .build import Reuse, row_key
from .errors import OutputExistsError, PactError
from .columns import REF_COLUMNS
from .format import MANIFEST, RowResult, open_cache, write_part
from .storage import json_bytes
from .manifest import FORMAT, Counts, DatasetInfo, Manifest
from .typedjson import hash_identity
from .storage import Location


def merge_caches(sources: list, out, rows_per_part: int | None = None, storage_options: dict | None = None,
                 progress: bool = True) -> Manifest:
    from tqdm.auto import tqdm

    if len(sources) < 2:
        raise PactError("merge needs at least two caches")
    caches = [open_cache(Location.of(s, storage_options)) for s in sources]
    sources = [c.url for c in caches]
    first = caches[0].manifest
    for src, c in zip(sources[1:], caches[1:]):
        if c.manifest.identity.reuse_key() != first.identity.reuse_key():
            raise PactError(f"{src}: built with another reference, tokenizer, safety tokens, encoding, max length or dtype than "
                            f"{sources[0]}; only caches built alike can be merged")
    scored = [src for src, c in zip(sources, caches) if c.manifest.scores is not None]
    if scored:  # the parts are re-cut, so the scores would be too: they are computed again instead
        print(f"pact-cache merge: {scored[0]}{' and others' if len(scored) > 1 else ''} carry token scores, which the merged "
              "cache will not; run `pact-cache score` on it for --token-mask", file=sys.stderr)
    loc = Location.of(out, storage_options)
    if loc.exists() and (not loc.is_dir() or loc.names() or (loc.is_local and any(loc.local_path().iterdir()))):
        raise OutputExistsError(f"{loc.display}: exists and is not empty; merge writes a new cache (nothing is overwritten)")
    per = rows_per_part or first.build.rows_per_part
    build = replace(first.build, rows_per_part=per, reused=tuple(c.cache_id for c in caches))
    dataset = DatasetInfo(hash_identity("pact-cache/merged-dataset", [c.manifest.dataset.sha256 for c in caches]),
                          "merge of " + ", ".join(sources), ())
    identity = replace(first.identity, dataset_sha256=dataset.sha256, build=build)
    key = identity.key()
    loc.makedirs()
    scratch = loc.scratch()
    parts, buf, index = [], [], 0
    bar = tqdm(total=sum(c.num_rows for c in caches), unit="row", desc="merging", disable=not progress, dynamic_ncols=True)

    def flush():
        name = f"part-{len(parts):05d}.parquet"
        parts.append(write_part(scratch / name, buf, first.encoding, key))
        loc.put_file(scratch / name, name)
        buf.clear()

    try:
        for c in caches:
            for row in c.iter_rows():
                eid = f"{index:08d}-{row.example_id.split('-', 1)[-1]}"
                buf.append(RowResult(eid, row.input_ids.tolist(), row.response_start, row.ref))
                index += 1
                bar.update(1)
                if len(buf) == per:
                    flush()
        if buf:
            flush()
    finally:
        bar.close()
        Location.drop_scratch(scratch)
    skipped: dict = {}
    for c in caches:
        for k, v in c.manifest.counts.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    counts = Counts(sum(c.num_rows for c in caches), sum(c.num_steps for c in caches),
                    sum(c.manifest.counts.input_tokens for c in caches), sum(c.manifest.counts.truncated_rows for c in caches),
                    skipped, {})
    m = Manifest(FORMAT, "", __version__, first.reference, first.tokenizer, first.tokens, dataset, build, first.encoding,
                 counts, tuple(parts)).with_content_id()
    loc.put_bytes(MANIFEST, json_bytes(m.to_json()))
    return m


def diff_caches(a, b, storage_options: dict | None = None, examples: int = 5) -> dict:
    """Rows added, removed and changed from cache ``a`` to cache ``b`` (paths, URLs or Locations)."""
    ca, cb = open_cache(Location.of(a, storage_options)), open_cache(Location.of(b, storage_options))
    a, b = ca.url, cb.url
    ma, mb = ca.manifest, cb.manifest
    ida, idb = ma.identity, mb.identity
    fields = {"reference weights": ida.reference_weights != idb.reference_weights, "tokenizer": ida.tokenizer != idb.tokenizer,
              "safety tokens": ida.tokens.content() != idb.tokens.content(), "dataset": ida.dataset_sha256 != idb.dataset_sha256,
              "encoding": ida.encoding != idb.encoding,
              "build parameters": ida.build.to_json() != idb.build.to_json()}
    comparable = list(ca.ids) == list(cb.ids)
    index = Reuse([ca])  # A's rows by input; values read part by part when needed
    seen_a: set[tuple[int, int, int]] = set()
    added, changed = [], []
    worst = {c.decoded: 0.0 for c in REF_COLUMNS}
    sums = {k: 0.0 for k in worst}
    n_values = {k: 0 for k in worst}
    common = 0
    for part in cb.parts:
        rows = list(cb.iter_part_rows(part))
        found = {}
        for j, r in enumerate(rows):
            loc = index.index.get(row_key(r.input_ids, r.response_start))
            if loc is None:
                added.append(r.example_id)
            else:
                found[j] = loc
                seen_a.add(loc)
        common += len(found)
        if not comparable or not found:
            continue
        old = index.fetch(found)
        for j, o in old.items():
            r, diff_here = rows[j], False
            for c in REF_COLUMNS:
                col = c.decoded
                d = np.abs(o.ref[c.name].astype(np.float64) - r.ref[c.name].astype(np.float64))
                worst[col] = max(worst[col], float(d.max()))
                sums[col] += float(d.sum())
                n_values[col] += d.size
                diff_here |= bool(d.max() > 0)
            if diff_here:
                changed.append(r.example_id)
    removed = [ca.parts[p].name + f" row {r}" for (c, p, r) in sorted(set(index.index.values()) - seen_a)]
    return {
        "a": {"path": a, "cache_id": ca.cache_id, "rows": ca.num_rows},
        "b": {"path": b, "cache_id": cb.cache_id, "rows": cb.num_rows},
        "identity_differs": [k for k, v in fields.items() if v],
        "rows": {"common": common, "added": len(added), "removed": len(removed), "changed": len(changed) if comparable else None},
        "values_comparable": comparable,
        "max_abs_diff": worst if comparable else None,
        "mean_abs_diff": {k: sums[k] / n_values[k] if n_values[k] else 0.0 for k in sums} if comparable else None,
        "examples": {"added": added[:examples], "removed": removed[:examples], "changed": changed[:examples]},
    }


def format_diff(d: dict) -> str:
    r = d["rows"]
    lines = [f"A {d['a']['path']}: {d['a']['cache_id'][:12]}, {d['a']['rows']:,} rows",
             f"B {d['b']['path']}: {d['b']['cache_id'][:12]}, {d['b']['rows']:,} rows"]
    if d["a"]["cache_id"] == d["b"]["cache_id"]:
        return "\n".join(lines + ["the same cache (equal ids)"])
    lines.append("identity differs in: " + (", ".join(d["identity_differs"]) or "nothing (only the rows' bytes)"))
    lines.append(f"rows: {r['common']:,} in both, {r['added']:,} added in B, {r['removed']:,} removed from A"
                 + (f", {r['changed']:,} with other values" if r["changed"] is not None else ""))
    if d["values_comparable"]:
        for col in (c.decoded for c in REF_COLUMNS):
            lines.append(f"  {col:<15} max |diff| {d['max_abs_diff'][col]:.4g} nats, mean {d['mean_abs_diff'][col]:.4g}")
    else:
        lines.append("values not compared: the caches use different safety tokens")
    for kind in ("added", "removed", "changed"):
        if d["examples"][kind]:
            lines.append(f"{kind}: " + ", ".join(d["examples"][kind]) + (" ..." if r[kind] and r[kind] > len(d["examples"][kind]) else ""))
    return "\n".join(lines)


def diff_json(d: dict) -> str:
    return json.dumps(d, indent=2)
