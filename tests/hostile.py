"""Helpers for trying inputs as a careless or hostile sender would: run a command and keep the
lines our programs print, require exactly one, forge a consistent part, snapshot a folder."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import edit_manifest

from pact_cache.format import rows_digest
from pact_cache.storage import sha256_path


def snapshot(folder: Path):
    """Every path under ``folder`` with its bytes (files) or None (folders, links, FIFOs)."""
    if not folder.exists():
        return None
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def program_lines(err: str, programs=("pact-cache", "pact-train", "pact-eval")) -> list[str]:
    """The lines of ``err`` that come from our programs, less what a build or run says it is about to do before
    loading its model (the memory estimate; the share of rows the safe recipe measured): not lines a test is about."""
    about = (": memory estimate: ", ") anchored (step-0 refusal mass >= ")
    return [line for line in err.splitlines() if line.startswith(programs) and not any(a in line for a in about)]


def cli(capsys, main, *args):
    """(exit status, the lines on stderr that come from our programs) of one command-line call."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, program_lines(err)


def one_line(capsys, main, *args, code=1):
    got, lines = cli(capsys, main, *args)
    assert got == code, (got, lines)
    assert len(lines) == 1, lines
    if os.environ.get("PACT_TRUST_LOG"):  # the list of inputs tried and what each gets, for people
        with open(os.environ["PACT_TRUST_LOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\texit {got}\t{lines[0]}\n")
    return lines[0]


def rewrite_part(cache: Path, name: str, fn, resign=True):
    """Change a part's table with ``fn`` and make the manifest agree (bytes, sha256, rows digest,
    and, with ``resign``, the cache id): a consistent forgery, so that the value checks must fire."""
    p = cache / name
    t = fn(pq.read_table(p))
    pq.write_table(t, p)
    try:
        digest = rows_digest(
            zip(
                t.column("example_id").to_pylist(),
                t.column("input_ids").to_pylist(),
                t.column("response_start").to_pylist(),
            )
        )
    except TypeError:  # a null in the rows has no digest; the reader must refuse the row before it gets there
        digest = None

    def edit(m):
        for e in m["parts"]:
            if e["name"] == name:
                e.update(bytes=p.stat().st_size, sha256=sha256_path(p), rows_sha256=digest or e["rows_sha256"])

    edit_manifest(cache, edit, resign=resign)


def set_column(t, name, values, typ):
    return t.set_column(t.schema.get_field_index(name), name, pa.array(values, typ))


def run_with_deadline(fn, seconds=60):
    """Run fn in a thread; a hang fails the test instead of blocking the suite."""
    box = {}
    th = threading.Thread(target=lambda: box.update(r=fn()), daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), "hung"
    return box["r"]


def _ids_with(t, fn):
    ids = t.column("input_ids").to_pylist()
    fn(ids)
    return set_column(t, "input_ids", ids, pa.list_(pa.int32()))


def run_cli(*args):
    """pact-cache with these arguments (any type), its exit status."""
    from pact_cache.cli import main

    return main([str(a) for a in args])


def only_line(capsys):
    err = program_lines(capsys.readouterr().err, ("pact-cache",))
    assert len(err) == 1, err
    return err[0]


def yaml_alias_bomb(tail: str = "") -> str:
    """A YAML "billion laughs": 9 levels of 9 aliases (about 387 million strings once expanded, a few hundred
    bytes written), the last anchor ``*i``; ``tail`` puts it under a key, e.g. ``"lr: *i\\n"``."""
    text, prev = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n', "a"
    for name in "bcdefghi":
        text += f"{name}: &{name} [" + ", ".join(["*" + prev] * 9) + "]\n"
        prev = name
    return text + tail
