"""``pact-cache cp SRC DST``: copy a cache between any two locations, checking it on the way.

The source is opened with every check of the format (content id, and ``--cache-id`` if pinned).
Each part is streamed (8 MiB at a time, never whole in memory) into a local scratch file, hashed
as it goes, and published (moved into a folder, or uploaded whole) only when its sha256 equals the
manifest's. The manifest is published last, so the destination holds the whole cache or no cache.
A copy that was stopped resumes: parts already at the destination with the manifest's size and
sha256 are kept. A destination that already holds this cache (its manifest) is checked the same
way, part by part: a damaged or missing part is copied again (published whole, over the damaged
one) and counted as replaced. A destination that holds a different cache, or anything that is not
this cache on its way, is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .card import CARD, publish
from .errors import CacheError, OutputExistsError
from .format import MANIFEST, copy_part, open_cache, read_manifest
from .manifest import PART_NAME
from .storage import Location, check_regular_file, is_tmp_name, sha256_stream

COPY_STATE = ".pact-copy.json"  # says which cache a destination is becoming; removed at the end


@dataclass
class CopyResult:
    cache_id: str
    parts_copied: int
    parts_kept: int
    bytes_copied: int
    parts_replaced: int = 0  # damaged or missing at a destination that already held this cache


def _sha256_of(loc: Location, name: str) -> str:
    with loc.open(name) as f:
        return sha256_stream(f)[0]


def _prepare(dst: Location, cache_id: str) -> None:
    """Refuse a destination that is not empty, this cache, or this copy under way."""
    if dst.exists() and not dst.is_dir():
        raise OutputExistsError(f"{dst.display}: exists and is not a folder; choose another destination")
    if dst.exists(MANIFEST):
        try:
            other = read_manifest(dst).cache_id
        except CacheError as err:
            raise OutputExistsError(
                f"{dst.display}: holds a cache that does not pass its checks ({err}); choose another destination"
            ) from None
        if other != cache_id:
            raise OutputExistsError(
                f"{dst.display}: holds a different cache (id {other[:12]}); nothing is "
                f"overwritten: choose another destination"
            )
        return
    names = [n for n in dst.names() if not is_tmp_name(n)]
    if names and COPY_STATE not in names:
        raise OutputExistsError(
            f"{dst.display}: is not empty and is not a copy of this cache under way; choose another destination"
        )
    if COPY_STATE in names:
        try:
            state = json.loads(dst.read_bytes(COPY_STATE, 1 << 16))
        except (ValueError, OSError):
            state = {}
        if not isinstance(state, dict) or state.get("cache_id") != cache_id:
            raise OutputExistsError(
                f"{dst.display}: holds an unfinished copy of another cache; choose another destination"
            )
        strays = [
            n for n in names if n not in (COPY_STATE, CARD) and not PART_NAME.fullmatch(n)
        ]  # the card goes up just before the manifest
        if strays:
            raise OutputExistsError(
                f"{dst.display}: holds {strays[0]}, which is not part of this cache; choose another destination"
            )


def copy_cache(src: Location, dst: Location, cache_id: str | None = None, progress: bool = True) -> CopyResult:
    """Copy the cache at ``src`` to ``dst`` (see the module docstring). Returns what was done."""
    from tqdm.auto import tqdm

    cache = open_cache(src, cache_id=cache_id)
    m = cache.manifest
    _prepare(dst, m.cache_id)
    there = dst.exists(MANIFEST)  # this cache, by its manifest: its parts are checked all the same
    if not there:
        dst.makedirs()
        dst.put_bytes(COPY_STATE, json.dumps({"cache_id": m.cache_id}).encode())
    copied = kept = nbytes = replaced = 0
    files = [*m.parts, *(m.scores.files if m.scores is not None else ())]  # parts, then any token-score sidecars
    bar = tqdm(
        total=sum(p.bytes for p in files),
        unit="B",
        unit_scale=True,
        desc="copying",
        disable=not progress,
        dynamic_ncols=True,
    )
    scratch = dst.scratch()
    try:
        for part in files:
            if dst.exists(part.name):
                size = check_regular_file(dst.fs, dst.root, dst.path(part.name), dst.where(part.name))
                if size == part.bytes and _sha256_of(dst, part.name) == part.sha256:
                    kept += 1
                    bar.update(part.bytes)
                    continue
                if not there:  # an object this copy wrote for another content, or a damaged one
                    dst.remove(part.name)
            replaced += there  # a published cache's part is replaced whole, never removed first
            copy_part(cache, part, dst, scratch, bar)
            copied += 1
            nbytes += part.bytes
        if not there:
            publish(dst, m)
            dst.remove(COPY_STATE)
    finally:
        bar.close()
        Location.drop_scratch(scratch)
    return CopyResult(m.cache_id, copied, kept, nbytes, replaced)
