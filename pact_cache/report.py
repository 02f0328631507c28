"""``info`` and ``verify``: what a cache holds, and whether it is intact and matches its sources."""

from __future__ import annotations

from .columns import REF_COLUMNS
from .errors import CacheError, ModelError
from .format import Cache, open_cache, rows_digest
from .manifest import describe_by_weight
from .storage import Location


def cache_info(cache: Cache) -> dict:
    """Counts and sizes of a cache. Bytes per step count the reference columns only (both views,
    per-step maxima, target), compressed, as stored in the Parquet parts."""
    m = cache.manifest
    steps = max(cache.num_steps, 1)
    ref_bytes = cache.reference_bytes()
    vocab = m.build.vocab_size
    fp16_bytes = 2 * (2 * cache.K + 1)  # both views + target, uncompressed float16
    per_step = ref_bytes / steps
    return {
        "path": cache.url,
        "cache_id": cache.cache_id,
        "format": m.format,
        "tool_version": m.tool_version,
        "reference": m.reference.name,
        "reference_quantization": m.build.quantization,  # None: as stored, in the build's dtype
        "dataset": m.dataset.source,
        "rows": cache.num_rows,
        "response_steps": cache.num_steps,
        "input_tokens": m.counts.input_tokens,
        "skipped": dict(m.counts.skipped),
        "parts": len(cache.parts),
        "total_bytes": sum(p.bytes for p in cache.parts),
        "reference_bytes": ref_bytes,
        "bytes_per_step": per_step,
        "ratio_to_float16": per_step / fp16_bytes,
        "ratio_to_full_vocab_fp16": per_step / (2 * vocab) if vocab else None,
        "encoding": m.encoding.to_json(),
        "K": cache.K,
        "token_method": m.tokens.method,
        "token_strings": list(m.tokens.strings or ()),
        "tokens_by_weight": [[t, w] for t, w in m.tokens.by_weight()],
        "scores": None
        if m.scores is None
        else {
            "algorithm": m.scores.algorithm,
            "degraded": m.scores.degraded.get("name"),
            "utility": m.scores.utility.get("name"),
            "bytes": sum(f.bytes for f in m.scores.files),
            "bytes_per_step": sum(f.bytes for f in m.scores.files) / steps,
        },
    }


def format_info(info: dict) -> str:
    skipped = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in info["skipped"].items()) or "none"
    enc = info["encoding"]
    enc_s = enc["name"] + (
        f" (log1p scale {enc['scale']:g}, floor {enc['floor']:g} nats)" if enc["name"] == "q8" else ""
    )
    lines = [
        f"cache          {info['path']}",
        f"id             {info['cache_id']}",
        f"reference      {info['reference']}"
        + (f" (loaded in {info['reference_quantization']})" if info["reference_quantization"] else ""),
        f"dataset        {info['dataset']}",
        f"rows           {info['rows']:,} (skipped: {skipped})",
        f"response steps {info['response_steps']:,}",
        f"parts          {info['parts']} ({info['total_bytes']:,} bytes in all)",
        f"encoding       {enc_s}",
        f"bytes/step     {info['bytes_per_step']:.1f} for the reference columns (both views + target, K={info['K']})",
        f"vs float16     {info['ratio_to_float16']:.3f}x of {2 * (2 * info['K'] + 1)} B/step uncompressed",
    ]
    if info["ratio_to_full_vocab_fp16"]:
        lines.append(
            f"vs full logits {info['ratio_to_full_vocab_fp16']:.5f}x of full-vocabulary float16 logits "
            f"(1/{1 / info['ratio_to_full_vocab_fp16']:,.0f})"
        )
    lines.append(
        f"safety tokens  {info['token_method']}, K={info['K']}, by weight: "
        f"{describe_by_weight(info['tokens_by_weight'])}"
    )
    if info["scores"]:
        sc = info["scores"]
        lines.append(
            f"token scores   {sc['algorithm']} (degraded {sc['degraded']}, utility {sc['utility']}): "
            f"{sc['bytes']:,} bytes, {sc['bytes_per_step']:.1f} B/step, in sidecar files"
        )
    return "\n".join(lines)


def _dataset_tokenizer(cache: Cache, model: str | None):
    """The tokenizer to re-tokenise a dataset with: --model's, else the recorded reference's when
    it can be found here; either way its fingerprint must be the cache's."""
    from .models import check_tokenizer, load_tokenizer, resolve_model

    name = model or cache.manifest.reference.name
    try:
        tok = load_tokenizer(resolve_model(name))
    except ModelError as err:
        if model:
            raise
        raise CacheError(
            f"{cache.url}: to check the rows against a dataset, its tokenizer is needed and the recorded "
            f"reference "
            f"{name!r} cannot be loaded here ({err}); pass --model (the reference, or a model with its "
            f"tokenizer)"
        ) from None
    check_tokenizer(
        tok,
        cache.manifest.tokenizer.sha256,
        f"{cache.url} ({name}'s tokenizer)",
        "pass the reference the cache was built with as --model",
        CacheError,
    )
    return tok


def check_rows_against_dataset(cache: Cache, dataset: str, tok) -> str:
    """Re-tokenise ``dataset`` as the build did and check that every row of the cache is that row:
    same order, example ids, input ids and response starts (through each part's rows digest, and
    row by row where a digest differs). Returns a note on the dataset's file fingerprint."""
    from .data import dataset_fingerprint, tokenize_dataset

    m = cache.manifest
    examples, skipped = tokenize_dataset(dataset, tok, m.build.max_length, progress=False)
    if len(examples) != m.counts.rows:
        raise CacheError(
            f"{cache.url}: holds {m.counts.rows} rows, but {dataset} gives {len(examples)} "
            f"(at --max-length {m.build.max_length}); it was not built from this dataset"
        )
    o = 0
    for part in cache.parts:
        mine = examples[o : o + part.rows]
        o += part.rows
        if rows_digest((e.example_id, e.input_ids, e.response_start) for e in mine) == part.rows_sha256:
            continue
        for j, (row, ex) in enumerate(zip(cache.iter_part_rows(part), mine)):
            what = (
                "example_id"
                if row.example_id != ex.example_id
                else "response_start"
                if row.response_start != ex.response_start
                else "input_ids"
                if row.input_ids.tolist() != ex.input_ids
                else None
            )
            if what:
                raise CacheError(
                    f"{cache.url}/{part.name} row {j}: {what} differs from {dataset} row {ex.index} "
                    f"(example {ex.example_id}); the cache does not hold this dataset's rows"
                )
        raise CacheError(
            f"{cache.url}/{part.name}: rows_sha256 does not match {dataset}'s rows; the manifest was changed"
        )
    same_files = dataset_fingerprint(dataset)["sha256"] == m.dataset.sha256
    return "dataset rows" + ("" if same_files else " (the files' bytes differ from the build's, every row matches)")


RECOMPUTE_WINDOW = 10.0  # nats below the step maximum: the values a loss weighs (and q8 stores finely)
RECOMPUTE_TOLERANCE = 0.5  # mean |stored - recomputed| in nats; q8 and bf16-vs-fp32 noise stay far below it


def recompute_sample(cache: Cache, resolved, n_rows: int, device: str = "auto", quantize: str = "none") -> dict:
    """Recompute ``n_rows`` rows spread over the cache with the reference and compare the stored
    values with them. Catches values that no checksum can: a consistent cache whose log-probs were
    not computed by this reference with these safety tokens (shifted ids, another model's values).
    Returns the mean and largest |difference| over values within RECOMPUTE_WINDOW nats of each
    step's maximum (the rest sit at or near the q8 floor)."""
    import numpy as np
    import torch

    from .data import Example
    from .models import load_model
    from .projection import compute_rows

    model, device, _ = load_model(resolved, "fp32", device, quantize=quantize)
    n_rows = min(n_rows, cache.num_rows)
    picks = set(np.linspace(0, cache.num_rows - 1, n_rows).round().astype(int).tolist()) if n_rows else set()
    rows = [r for i, r in enumerate(cache.iter_rows()) if i in picks]
    examples = [Example(i, r.example_id, r.input_ids.tolist(), r.response_start) for i, r in enumerate(rows)]
    got = compute_rows(
        model, examples, torch.tensor(cache.ids), list(cache.manifest.build.assistant_header_ids), 4, device
    )
    diffs = []
    for r, g in zip(rows, got):
        for col in REF_COLUMNS:
            stored, fresh = r.ref[col.name], g.ref[col.name]
            if col.per_step == "K":  # values far below the step's maximum sit at or near the q8 floor
                near = fresh >= fresh.max(axis=1, keepdims=True) - RECOMPUTE_WINDOW
                diffs.append(np.abs(stored - fresh)[near])
            else:
                diffs.append(np.abs(stored - fresh))
    d = np.concatenate(diffs) if diffs else np.zeros(1)
    return {"rows": len(rows), "mean": float(d.mean()), "max": float(d.max())}


def verify_cache(
    url,
    dataset: str | None = None,
    model: str | None = None,
    cache_id: str | None = None,
    progress: bool = False,
    recompute: int = 8,
    storage_options: dict | None = None,
    quantize: str | None = None,
) -> dict:
    """Check the manifest and its content id (and the pinned ``cache_id``), every part (type, size,
    sha256, schema, values, rows digest, decoding every row), and optionally that the cache holds
    the rows of ``dataset`` and was built with ``model`` (fingerprints, and ``recompute`` rows'
    values recomputed with it, loaded as the manifest's ``build.quantization`` says; ``quantize``, when
    given, must say the same: a cache of a 4-bit reference is not verified against its 16-bit load).
    ``url``: a path, URL or :class:`pact_cache.storage.Location`. Raises
    ``CacheError`` at the first mismatch."""
    cache = open_cache(Location.of(url, storage_options), cache_id=cache_id)
    url = cache.url
    rows = steps = 0
    for part in cache.parts:
        for row in cache.iter_part_rows(part):
            rows += 1
            steps += row.steps
    if rows != cache.num_rows:
        raise CacheError(f"{url}: holds {rows} rows, manifest says {cache.num_rows}")
    m = cache.manifest
    checked = [
        "manifest and content id" + (" (pinned)" if cache_id else ""),
        f"{len(cache.parts)} part checksums",
        f"{rows} rows decoded and finite",
    ]
    if model is not None:
        from .models import check_tokenizer, load_tokenizer, model_fingerprint, resolve_model

        built = m.build.quantization or "none"
        if quantize is not None and quantize != built:
            raise CacheError(
                f"{url}: was built with the reference loaded {'as stored' if built == 'none' else 'in ' + built}, "
                f"not --quantize {quantize}; its values are that load's: verify with --quantize {built} (or leave "
                "--quantize out)"
            )
        resolved = resolve_model(model)
        want_w = m.reference.weights_sha256
        got_w = model_fingerprint(resolved)["weights_sha256"]
        if got_w != want_w:
            diff = sorted(set(got_w.items()) ^ set(want_w.items()))
            raise CacheError(
                f"{url}: reference weights differ from {model} (first difference: {diff[0][0]}); the "
                f"cache was built with {m.reference.name}"
            )
        check_tokenizer(
            load_tokenizer(resolved),
            m.tokenizer.sha256,
            f"{url} (--model {model})",
            "verify with the model the cache was built with",
            CacheError,
        )
        checked.append("model and tokenizer fingerprints")
        if recompute > 0 and cache.num_rows:
            res = recompute_sample(cache, resolved, recompute, quantize=built)
            if res["mean"] > RECOMPUTE_TOLERANCE:
                raise CacheError(
                    f"{url}: the stored log-probs differ from {model}'s by {res['mean']:.2f} nats on "
                    f"average over "
                    f"{res['rows']} recomputed rows (tolerance {RECOMPUTE_TOLERANCE}); the values were "
                    f"not computed by this "
                    "reference with these safety tokens: rebuild the cache"
                )
            checked.append(f"{res['rows']} rows recomputed (mean |diff| {res['mean']:.4f} nats, max {res['max']:.3f})")
    if dataset is not None:
        checked.append(check_rows_against_dataset(cache, dataset, _dataset_tokenizer(cache, model)))
    return {"cache_id": cache.cache_id, "rows": rows, "response_steps": steps, "checked": checked}
