"""The storage layer (pact_cache/storage.py): the same checks through any fsspec filesystem."""

from __future__ import annotations

import json

from pact_cache.cli import main as cache_main
from pact_cache.format import MANIFEST, open_cache

from conftest import CHAT_ROWS
from hostile import cli, one_line


def test_the_same_checks_through_fsspec_on_an_in_memory_store(made, capsys):
    """memory:// stands in for an object store: plain objects are read, a pseudo-folder where a
    part should be is refused, and an edited manifest fails its id the same way."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "/trust-mem/cache"
    for p in made["q8"].iterdir():
        fs.pipe(f"{root}/{p.name}", p.read_bytes())
    url = f"memory://{root}"
    assert cli(capsys, cache_main, "verify", url, "--dataset", made["data"])[0] == 0
    cache = open_cache(url)
    assert sum(1 for _ in cache.iter_rows()) == len(CHAT_ROWS)
    fs.rm(f"{root}/part-00001.parquet")
    fs.pipe(f"{root}/part-00001.parquet/inner", b"x")  # now a "folder" of the store
    assert "part-00001.parquet: is a directory, not a plain object" in one_line(capsys, cache_main, "verify", url)
    m = json.loads(fs.cat(f"{root}/{MANIFEST}"))
    m["counts"]["input_tokens"] += 1
    fs.pipe(f"{root}/{MANIFEST}", json.dumps(m).encode())
    assert "does not match the manifest's content" in one_line(capsys, cache_main, "info", url)
    fs.rm(root, recursive=True)
