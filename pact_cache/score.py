"""TOSS token scores (``pact-cache score``) and the global token mask they define.

TOSS (arXiv 2603.01185, Polly-LYP/TOSS) scores every response token of the fine-tuning set with
two models made for the purpose, a safety-degraded one (fine-tuned on harmful data) and a
utility-oriented one (fine-tuned on utility data): ``score_t = log p_degraded(y_t) -
log p_utility(y_t)``, the difference of their losses. A token the degraded model predicts much
better than the utility model is one that teaches harm; the highest-scoring fraction of all the
set's tokens (chosen globally, default 0.2) is left out of training.

Both models run once, offline, here: the scores go into sidecar files beside the cache's parts
(one ``scores-<part>`` Parquet file per part: ``example_id`` string, ``score`` binary float32
``[n]``), listed with their sha256 in the manifest's ``scores`` entry, which is part of the cache
id. The scored cache is written to a new folder (parts copied and checked, nothing overwritten);
training reads the scores with the rows and never loads either model.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .card import publish
from .errors import OutputExistsError, PactError
from .format import Cache, open_cache
from .manifest import Manifest, ScoreFile, Scores
from .storage import Location, is_tmp_name

SCORE_ALGORITHM = "toss/1"  # log p_degraded(y_t) - log p_utility(y_t), float32, teacher-forced on the cached input_ids


def score_name(part: str) -> str:
    return f"scores-{part}"


def row_scores(degraded, utility, rows, device, batch_size: int = 8) -> list[np.ndarray]:
    """``log p_degraded(y_t) - log p_utility(y_t)`` at every response step of each row, float32 ``(n,)``."""
    import torch

    from .projection import reference_logprobs

    out = []
    none = torch.zeros(0, dtype=torch.long)
    for b0 in range(0, len(rows), batch_size):
        chunk = rows[b0 : b0 + batch_size]
        seqs = [r.input_ids.tolist() for r in chunk]
        starts = [r.response_start for r in chunk]
        counts = [r.steps for r in chunk]
        with torch.no_grad():
            d = reference_logprobs(degraded, seqs, starts, counts, none, device, want_target=True)
            u = reference_logprobs(utility, seqs, starts, counts, none, device, want_target=True)
        out.extend((a[1] - b[1]).astype(np.float32) for a, b in zip(d, u))
    return out


def _check_model_fits(cache: Cache, tok, model, what: str, name: str) -> None:
    from .models import check_tokenizer

    check_tokenizer(
        tok,
        cache.manifest.tokenizer.sha256,
        f"--{what} {name}: {cache.url}",
        "the scores are log-probs of the cached token ids, so the scoring models must share the reference's tokenizer",
        PactError,
    )
    from .projection import check_projection

    check_projection(model, what=f"--{what} {name}")
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < cache.vocab_size:
        raise PactError(
            f"--{what} {name}: its output layer has {rows} rows, fewer than the cache's vocabulary ({cache.vocab_size})"
        )


def score_cache(
    src: str | Path | Location,
    degraded: str,
    utility: str,
    dst: str | Path | Location,
    batch_size: int = 8,
    dtype="auto",
    device="auto",
    cache_id: str | None = None,
    progress: bool = True,
) -> Manifest:
    """Write a copy of the cache at ``src`` with TOSS scores to ``dst`` (new or empty; a folder, an
    fsspec URL or a :class:`Location`); returns its manifest."""
    from .models import load_model, load_tokenizer, model_fingerprint, resolve_model

    src, dst = Location.of(src), Location.of(dst)
    cache = open_cache(src, cache_id=cache_id)
    if cache.manifest.scores is not None:
        raise PactError(f"{src.display}: already carries token scores; score the cache they were added to instead")
    if dst.exists() and (not dst.is_dir() or [n for n in dst.names() if not is_tmp_name(n)]):
        raise OutputExistsError(
            f"{dst.display}: exists and is not an empty folder; choose another -o (nothing is overwritten)"
        )
    models = {}
    for what, name in (("degraded", degraded), ("utility", utility)):
        r = resolve_model(name)
        model, device, _ = load_model(r, dtype, device)
        _check_model_fits(cache, load_tokenizer(r), model, what, name)
        models[what] = (model, model_fingerprint(r))
    with dst.filling():  # a score that fails (a non-finite score, a damaged part) leaves nothing behind: a retry works
        return _write_scored(cache, dst, models, device, batch_size, progress)


def _write_scored(cache, dst: Location, models: dict, device, batch_size: int, progress: bool) -> Manifest:
    """The scored copy: per part its score sidecar and the part itself, then the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from .format import copy_part

    dst.makedirs()
    scratch = dst.scratch()
    files = []
    bar = tqdm(
        total=cache.num_steps, unit="step", desc="scoring", disable=not progress, dynamic_ncols=True, file=sys.stderr
    )
    try:
        for part in cache.parts:
            ids, blobs, buf = [], [], []

            def flush():
                for r, sc in zip(buf, row_scores(models["degraded"][0], models["utility"][0], buf, device, batch_size)):
                    if not np.isfinite(sc).all():
                        raise PactError(
                            f"{cache._where(part)} row {r.example_id}: a score is not finite (a model "
                            f"gives a token "
                            "probability 0); check the degraded and utility models"
                        )
                    ids.append(r.example_id)
                    blobs.append(sc.astype("<f4").tobytes())
                    bar.update(r.steps)
                buf.clear()

            for row in cache.iter_part_rows(part):
                buf.append(row)
                if len(buf) == batch_size:
                    flush()
            flush()
            name = score_name(part.name)
            local = scratch / name
            pq.write_table(
                pa.table({"example_id": pa.array(ids, pa.string()), "score": pa.array(blobs, pa.binary())}),
                str(local),
                compression="zstd",
            )
            data = local.read_bytes()
            files.append(ScoreFile(part.name, name, len(data), hashlib.sha256(data).hexdigest()))
            dst.put_file(local, name)
            copy_part(cache, part, dst, scratch)
        bar.close()
        m = replace(
            cache.manifest, scores=Scores(SCORE_ALGORITHM, models["degraded"][1], models["utility"][1], tuple(files))
        )
        m = m.with_content_id()
        publish(dst, m)  # card, then the manifest last: the folder is a cache only when whole
    finally:
        bar.close()
        Location.drop_scratch(scratch)
    return m
