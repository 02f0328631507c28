"""``info`` and ``verify``: what a cache holds, and whether it is intact and matches its sources."""

from __future__ import annotations

from .errors import CacheError
from .format import Cache, open_cache


def cache_info(cache: Cache) -> dict:
    """Counts and sizes of a cache. Bytes per step count the reference columns only (both views,
    per-step maxima, target), compressed, as stored in the Parquet parts."""
    m = cache.manifest
    steps = max(cache.num_steps, 1)
    ref_bytes = cache.reference_bytes()
    vocab = m.get("build", {}).get("vocab_size") or m.get("tokenizer", {}).get("vocab_size") or 0
    fp16_bytes = 2 * (2 * cache.K + 1)  # both views + target, uncompressed float16
    per_step = ref_bytes / steps
    return {
        "path": cache.url,
        "cache_id": cache.cache_id,
        "format": m["format"],
        "tool_version": m.get("tool", {}).get("version"),
        "reference": m.get("reference", {}).get("name"),
        "dataset": m.get("dataset", {}).get("source"),
        "rows": cache.num_rows,
        "response_steps": cache.num_steps,
        "input_tokens": m["counts"].get("input_tokens"),
        "skipped": m["counts"].get("skipped", {}),
        "parts": len(cache.parts),
        "total_bytes": sum(p["bytes"] for p in cache.parts),
        "reference_bytes": ref_bytes,
        "bytes_per_step": per_step,
        "ratio_to_float16": per_step / fp16_bytes,
        "ratio_to_full_vocab_fp16": per_step / (2 * vocab) if vocab else None,
        "encoding": m["encoding"],
        "K": cache.K,
        "token_method": m["tokens"].get("method"),
        "token_strings": m["tokens"].get("strings", []),
    }


def format_info(info: dict) -> str:
    skipped = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in info["skipped"].items()) or "none"
    enc = info["encoding"]
    enc_s = enc["name"] + (f" (log1p scale {enc['scale']:g}, floor {enc['floor']:g} nats)" if enc["name"] == "q8" else "")
    lines = [
        f"cache          {info['path']}",
        f"id             {info['cache_id']}",
        f"reference      {info['reference']}",
        f"dataset        {info['dataset']}",
        f"rows           {info['rows']:,} (skipped: {skipped})",
        f"response steps {info['response_steps']:,}",
        f"parts          {info['parts']} ({info['total_bytes']:,} bytes in all)",
        f"encoding       {enc_s}",
        f"bytes/step     {info['bytes_per_step']:.1f} for the reference columns (both views + target, K={info['K']})",
        f"vs float16     {info['ratio_to_float16']:.3f}x of {2 * (2 * info['K'] + 1)} B/step uncompressed",
    ]
    if info["ratio_to_full_vocab_fp16"]:
        lines.append(f"vs full logits {info['ratio_to_full_vocab_fp16']:.5f}x of full-vocabulary float16 logits (1/{1 / info['ratio_to_full_vocab_fp16']:,.0f})")
    lines.append(f"safety tokens  {info['token_method']}: " + " ".join(repr(s) for s in info["token_strings"]))
    return "\n".join(lines)


def verify_cache(url: str, dataset: str | None = None, model: str | None = None, progress: bool = False) -> dict:
    """Check schema and checksums of every part (decoding every row), and optionally that the
    cache was built from ``dataset`` and ``model``. Raises ``CacheError`` at the first mismatch."""
    cache = open_cache(url)
    rows = steps = 0
    for part in cache.parts:
        for row in cache.iter_part_rows(part):
            rows += 1
            steps += row.steps
    if rows != cache.num_rows:
        raise CacheError(f"{url}: holds {rows} rows, manifest says {cache.num_rows}")
    m = cache.manifest
    checked = ["manifest", f"{len(cache.parts)} part checksums", f"{rows} rows decoded"]
    if dataset is not None:
        from .data import dataset_fingerprint

        got = dataset_fingerprint(dataset)["sha256"]
        want = m.get("dataset", {}).get("sha256")
        if got != want:
            raise CacheError(f"{url}: dataset fingerprint differs: {dataset} hashes to {got[:12]}, the cache was built from {m.get('dataset', {}).get('source')} ({str(want)[:12]})")
        checked.append("dataset fingerprint")
    if model is not None:
        from .models import load_tokenizer, model_fingerprint, resolve_model, tokenizer_fingerprint

        resolved = resolve_model(model)
        want_w = m.get("reference", {}).get("weights_sha256", {})
        got_w = model_fingerprint(resolved)["weights_sha256"]
        if got_w != want_w:
            diff = sorted(set(got_w.items()) ^ set(want_w.items()))
            raise CacheError(f"{url}: reference weights differ from {model} (first difference: {diff[0][0]}); the cache was built with {m.get('reference', {}).get('name')}")
        got_t = tokenizer_fingerprint(load_tokenizer(resolved))["sha256"]
        if got_t != m.get("tokenizer", {}).get("sha256"):
            raise CacheError(f"{url}: tokenizer fingerprint differs from {model}'s tokenizer (vocabulary, special tokens or chat template changed)")
        checked.append("model and tokenizer fingerprints")
    return {"cache_id": cache.cache_id, "rows": rows, "response_steps": steps, "checked": checked}
