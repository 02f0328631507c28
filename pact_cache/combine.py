"""``pact-cache merge``, ``filter`` and ``diff``: caches as sets of rows.

merge: caches built with the same reference, tokenizer, safety tokens, encoding, max length and
dtype (the same reuse key as ``build --reuse``) are concatenated, in the order given, into a new
cache. Rows are renumbered (``{index:08d}-{content hash}``, the content hash kept), so the result is
exactly the cache of the concatenated datasets: ``verify --dataset`` on a folder holding the source
files in that order passes. Values are copied as stored (decoding and re-encoding q8 is exact).

filter: the rows whose step-0 refusal mass (the reference's mass on the safety tokens before the
first response token) is at most a threshold, as a new cache with its own id.

diff: rows are matched by their tokenised input (input ids and response start). Rows only in A
are removed, only in B added; matched rows whose values differ are changed, with the largest and
mean absolute difference per column. Identity fields that differ are listed first: values are
compared only when both caches use the same safety tokens.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import numpy as np

from . import __version__
from .card import publish
from .columns import REF_COLUMNS
from .errors import OutputExistsError, PactError, preview
from .format import RowResult, open_cache, write_part
from .manifest import FORMAT, Counts, DatasetInfo, Manifest
from .rows import Reuse, row_key, step0_refusal_mass
from .storage import Location
from .typedjson import hash_identity


def merge_caches(
    sources: list, out, rows_per_part: int | None = None, storage_options: dict | None = None, progress: bool = True
) -> Manifest:
    if len(sources) < 2:
        raise PactError("merge needs at least two caches")
    caches = [open_cache(Location.of(s, storage_options)) for s in sources]
    sources = [c.url for c in caches]
    first = caches[0].manifest
    for src, c in zip(sources[1:], caches[1:]):
        if c.manifest.identity.reuse_key() != first.identity.reuse_key():
            raise PactError(
                f"{src}: built with another reference, tokenizer, safety tokens, encoding, max length or "
                f"dtype than "
                f"{sources[0]}; only caches built alike can be merged"
            )
    scored = [src for src, c in zip(sources, caches) if c.manifest.scores is not None]
    if scored:  # the parts are re-cut, so the scores would be too: they are computed again instead
        print(
            f"pact-cache merge: {scored[0]}{' and others' if len(scored) > 1 else ''} carry token scores, which the "
            f"merged "
            "cache will not; run `pact-cache score` on it for --token-mask",
            file=sys.stderr,
        )
    loc = Location.of(out, storage_options)
    _check_new(loc, "merge")
    if not any(c.num_rows for c in caches):
        raise PactError(
            f"merge: {', '.join(sources)} hold no rows, so the merged cache would be empty; nothing written"
        )
    per = rows_per_part or first.build.rows_per_part
    build = replace(first.build, rows_per_part=per, reused=tuple(c.cache_id for c in caches))
    dataset = DatasetInfo(
        hash_identity("pact-cache/merged-dataset", [c.manifest.dataset.sha256 for c in caches]),
        "merge of " + ", ".join(sources),
        (),
    )
    identity = replace(first.identity, dataset_sha256=dataset.sha256, build=build)
    rows = (row for c in caches for row in c.iter_rows())
    skipped: dict = {}
    for c in caches:
        for k, v in c.manifest.counts.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    counts = Counts(
        sum(c.num_rows for c in caches),
        sum(c.num_steps for c in caches),
        sum(c.manifest.counts.input_tokens for c in caches),
        sum(c.manifest.counts.truncated_rows for c in caches),
        skipped,
        {},
    )
    with loc.filling():  # a merge that fails (a damaged input part) leaves nothing behind: a retry works
        parts = _write_rows(
            loc, rows, first.encoding, identity.key(), per, sum(c.num_rows for c in caches), "merging", progress
        )
        m = Manifest(
            FORMAT,
            "",
            __version__,
            first.reference,
            first.tokenizer,
            first.tokens,
            dataset,
            build,
            first.encoding,
            counts,
            tuple(parts),
        ).with_content_id()
        publish(loc, m)
    return m


def _check_new(loc: Location, what: str) -> None:
    if loc.exists() and (not loc.is_dir() or loc.names() or (loc.is_local and any(loc.local_path().iterdir()))):
        raise OutputExistsError(
            f"{loc.display}: exists and is not empty; {what} writes a new cache (nothing is overwritten)"
        )


def _write_rows(loc: Location, rows, encoding, key: str, per: int, total: int, desc: str, progress: bool) -> list:
    """Write ``rows`` (CacheRows, in order) as the parts of a new cache at ``loc``, renumbered
    (``{index:08d}-{content hash}``), ``per`` rows a part; returns the part entries. Each part is
    published whole; the caller writes the manifest last."""
    from tqdm.auto import tqdm

    loc.makedirs()
    scratch = loc.scratch()
    parts, buf = [], []
    bar = tqdm(total=total, unit="row", desc=desc, disable=not progress, dynamic_ncols=True, file=sys.stderr)

    def flush():
        name = f"part-{len(parts):05d}.parquet"
        parts.append(write_part(scratch / name, buf, encoding, key))
        loc.put_file(scratch / name, name)
        buf.clear()

    try:
        for index, row in enumerate(rows):
            buf.append(
                RowResult(
                    f"{index:08d}-{row.example_id.split('-', 1)[-1]}",
                    row.input_ids.tolist(),
                    row.response_start,
                    row.ref,
                )
            )
            bar.update(1)
            if len(buf) == per:
                flush()
        if buf:
            flush()
    finally:
        bar.close()
        Location.drop_scratch(scratch)
    return parts


def filter_cache(
    src, out, above: float, rows_per_part: int | None = None, storage_options: dict | None = None, progress: bool = True
) -> tuple[Manifest, int]:
    """Write the rows of ``src`` whose step-0 refusal mass is at most ``above`` as a new cache at
    ``out`` (renumbered, values copied as stored); returns its manifest and the rows left out.

    What a practitioner tries first against harmful rows: drop the rows the reference would refuse.
    The result is the cache of the filtered dataset: its dataset fingerprint is derived from the
    source's and the threshold, its ``build.reused`` names the source, so its id is its own."""
    if isinstance(above, bool) or not (isinstance(above, (int, float)) and 0.0 <= above <= 1.0):
        raise PactError(f"--above {preview(above)}: must be a probability mass in [0, 1]")
    cache = open_cache(Location.of(src, storage_options))
    loc = Location.of(out, storage_options)
    _check_new(loc, "filter")
    if cache.num_rows == 0:
        raise PactError(f"{cache.url}: the cache holds no rows, so a filter of it would be empty; nothing written")
    if cache.manifest.scores is not None:
        print(
            f"pact-cache filter: {cache.url} carries token scores, which the filtered cache will not; run "
            f"`pact-cache score` "
            "on it for --token-mask",
            file=sys.stderr,
        )
    keep = np.array([w > 0 for w in cache.tokens.weights])
    m0 = cache.manifest
    dataset = DatasetInfo(
        hash_identity(
            "pact-cache/filtered-dataset", {"source": m0.dataset.sha256, "step0_refusal_mass_at_most": float(above)}
        ),
        f"rows of {cache.url} with step-0 refusal mass <= {above:g}",
        (),
    )
    build = replace(m0.build, rows_per_part=rows_per_part or m0.build.rows_per_part, reused=(cache.cache_id,))
    identity = replace(m0.identity, dataset_sha256=dataset.sha256, build=build)
    kept = {"rows": 0, "steps": 0, "tokens": 0, "truncated": 0}
    masses = [math.inf, -math.inf]  # the range of the input's step-0 refusal masses, for the message of an empty result

    def rows():
        for row in cache.iter_rows():
            mass = step0_refusal_mass(row, keep)
            masses[:] = min(masses[0], mass), max(masses[1], mass)
            if mass <= above:
                kept["rows"] += 1
                kept["steps"] += row.steps
                kept["tokens"] += len(row.input_ids)
                kept["truncated"] += int(bool(m0.build.max_length) and len(row.input_ids) == m0.build.max_length)
                yield row

    with loc.filling():  # a filter that fails leaves nothing behind: a retry works
        parts = _write_rows(
            loc, rows(), m0.encoding, identity.key(), build.rows_per_part, cache.num_rows, "filtering", progress
        )
        if (
            kept["rows"] == 0
        ):  # an empty cache is no use to pact-train, stats or --replay: refused, as build refuses one
            raise PactError(
                f"--above {above:g}: keeps none of the {cache.num_rows:,} rows of {cache.url}, whose "
                f"step-0 refusal "
                f"masses run from {masses[0]:.4g} to {masses[1]:.4g}; nothing written: raise --above (to "
                f"at "
                f"least {masses[0]:.4g} to keep a row)"
            )
        dropped = cache.num_rows - kept["rows"]
        skipped = dict(m0.counts.skipped)
        skipped["step0_refusal_mass_above"] = skipped.get("step0_refusal_mass_above", 0) + dropped
        counts = Counts(kept["rows"], kept["steps"], kept["tokens"], kept["truncated"], skipped, {})
        m = Manifest(
            FORMAT,
            "",
            __version__,
            m0.reference,
            m0.tokenizer,
            m0.tokens,
            dataset,
            build,
            m0.encoding,
            counts,
            tuple(parts),
        ).with_content_id()
        publish(loc, m)
    return m, dropped


def diff_caches(a, b, storage_options: dict | None = None, examples: int = 5) -> dict:
    """Rows added, removed and changed from cache ``a`` to cache ``b`` (paths, URLs or Locations)."""
    ca, cb = open_cache(Location.of(a, storage_options)), open_cache(Location.of(b, storage_options))
    a, b = ca.url, cb.url
    ma, mb = ca.manifest, cb.manifest
    ida, idb = ma.identity, mb.identity
    fields = {
        "reference weights": ida.reference_weights != idb.reference_weights,
        "tokenizer": ida.tokenizer != idb.tokenizer,
        "safety tokens": ida.tokens.content() != idb.tokens.content(),
        "dataset": ida.dataset_sha256 != idb.dataset_sha256,
        "encoding": ida.encoding != idb.encoding,
        "build parameters": ida.build.to_json() != idb.build.to_json(),
    }
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
        "rows": {
            "common": common,
            "added": len(added),
            "removed": len(removed),
            "changed": len(changed) if comparable else None,
        },
        "values_comparable": comparable,
        "max_abs_diff": worst if comparable else None,
        "mean_abs_diff": {k: sums[k] / n_values[k] if n_values[k] else 0.0 for k in sums} if comparable else None,
        "examples": {"added": added[:examples], "removed": removed[:examples], "changed": changed[:examples]},
    }


def format_diff(d: dict) -> str:
    r = d["rows"]
    lines = [
        f"A {d['a']['path']}: {d['a']['cache_id'][:12]}, {d['a']['rows']:,} rows",
        f"B {d['b']['path']}: {d['b']['cache_id'][:12]}, {d['b']['rows']:,} rows",
    ]
    if d["a"]["cache_id"] == d["b"]["cache_id"]:
        return "\n".join(lines + ["the same cache (equal ids)"])
    lines.append("identity differs in: " + (", ".join(d["identity_differs"]) or "nothing (only the rows' bytes)"))
    lines.append(
        f"rows: {r['common']:,} in both, {r['added']:,} added in B, {r['removed']:,} removed from A"
        + (f", {r['changed']:,} with other values" if r["changed"] is not None else "")
    )
    if d["values_comparable"]:
        for col in (c.decoded for c in REF_COLUMNS):
            lines.append(
                f"  {col:<15} max |diff| {d['max_abs_diff'][col]:.4g} nats, mean {d['mean_abs_diff'][col]:.4g}"
            )
    else:
        lines.append("values not compared: the caches use different safety tokens")
    for kind in ("added", "removed", "changed"):
        if d["examples"][kind]:
            lines.append(
                f"{kind}: "
                + ", ".join(d["examples"][kind])
                + (" ..." if r[kind] and r[kind] > len(d["examples"][kind]) else "")
            )
    return "\n".join(lines)


def diff_json(d: dict) -> str:
    return json.dumps(d, indent=2)
