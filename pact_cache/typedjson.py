"""Untrusted JSON at the edge: strict loading, canonical hashing, and typed field reading.

:func:`load_json` reads bytes that came from elsewhere (strict UTF-8, no NaN/Infinity, bounded
depth); :func:`canonical_json` and :func:`hash_identity` give the sorted, type-tagged form that
content ids are computed over; ``_Fields`` reads a JSON object field by field, checking each one's
type and range with one message naming the field. :mod:`pact_cache.manifest` builds the typed
manifest and tokens files from these.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from .errors import CacheError, preview

# ----------------------------------------------------------------------------- JSON at the edge


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON (non-finite numbers are not allowed)")


def load_json(
    data: bytes, where: str, error=CacheError, what: str = "file", line: int | None = None, fix: str | None = None
) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, nesting bounded by the interpreter (refused, not crashed).
    Errors name ``where:line`` (the line inside ``data``, or ``line`` when ``data`` is one JSONL
    line), what is wrong, and ``fix`` (default: fix or remove this ``what``)."""
    fix = fix or f"fix or remove this {what}"

    def at(lineno: int | None) -> str:
        n = line if line is not None else lineno
        return f"{where}:{n}" if n is not None else where

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad_line = data[: err.start].count(b"\n") + 1
        raise error(f"{at(bad_line)}: invalid UTF-8 (byte {err.start}) in this {what}; {fix}") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as err:
        raise error(f"{at(err.lineno)}: invalid JSON in this {what} ({err.msg} at column {err.colno}); {fix}") from None
    except ValueError as err:
        raise error(f"{at(None)}: {err}; {fix}") from None
    except RecursionError:
        raise error(f"{at(None)}: JSON nested too deeply in this {what}; {fix}") from None


def count_values(obj, limit: int) -> int:
    """How many values ``obj`` holds (every mapping, list, key and scalar), counted up to ``limit + 1``
    and no further. YAML aliases make a small file stand for a huge structure (a "billion laughs"
    bomb: every alias is the same object again); walking it stops here, before anything copies,
    prints or serialises it."""
    n, todo = 0, [obj]
    while todo and n <= limit:
        x = todo.pop()
        n += 1
        if isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return n


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def hash_identity(kind: str, obj) -> str:
    """sha256 of sorted, type-tagged JSON (like ``datasets`` fingerprints). ``None`` is hashed as
    an explicit null tag; callers refuse missing inputs before they get here."""

    def tag(x):
        if isinstance(x, dict):
            return {str(k): tag(v) for k, v in sorted(x.items())}
        if isinstance(x, (list, tuple)):
            return ["list", [tag(v) for v in x]]
        if x is None:
            return ["null"]
        if isinstance(x, bool):
            return ["bool", x]
        if isinstance(x, int):
            return ["int", x]
        if isinstance(x, float):
            return ["float", repr(x)]
        if isinstance(x, str):
            return ["str", x]
        raise TypeError(f"cannot hash a {type(x).__name__} into an identity")

    return hashlib.sha256(canonical_json({"kind": kind, "value": tag(obj)})).hexdigest()


# ----------------------------------------------------------------------------- field checks


class _Fields:
    """Reads fields of one JSON object, raising ``error`` with ``where`` and the field path."""

    def __init__(self, obj, where: str, path: str, error):
        self.where, self.path, self.error = where, path, error
        if not isinstance(obj, dict):
            self.fail(f"must be an object, not {_kind(obj)}")
        self.obj = obj

    def fail(self, msg: str):
        raise self.error(f"{self.where}: {self.path + ' ' if self.path else ''}{msg}")

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, optional: bool):
        if key not in self.obj or self.obj[key] is None:
            if optional:
                return None
            raise self.error(f"{self.where}: {self._name(key)} is missing")
        return self.obj[key]

    def _bad(self, key, msg):
        raise self.error(f"{self.where}: {self._name(key)} {msg}")

    def int(self, key, lo=None, hi=None, optional=False):
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            self._bad(key, f"must be an integer, not {_kind(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self._bad(key, f"is {v}, outside {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
        return v

    def float(self, key, lo=None, hi=None, optional=False, lo_open=False):
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            self._bad(key, f"must be a finite number, not {_kind(v)}")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            self._bad(key, f"is {preview(v)}, outside {'(' if lo_open else '['}{lo}, {hi}]")
        return float(v)

    def str(self, key, optional=False, pattern: re.Pattern | None = None, what="a string"):
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, str) or (pattern is not None and pattern.fullmatch(v) is None):
            self._bad(key, f"must be {what}")
        return v

    def obj_(self, key, optional=False):
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, dict):
            self._bad(key, f"must be an object, not {_kind(v)}")
        return v

    def list(self, key, optional=False, min_len=0):
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, list):
            self._bad(key, f"must be a list, not {_kind(v)}")
        if len(v) < min_len:
            self._bad(key, f"must hold at least {min_len} item(s)")
        return v

    def sub(self, key, optional=False) -> "_Fields | None":
        v = self._get(key, optional)
        return None if v is None else _Fields(v, self.where, self._name(key), self.error)


def _kind(v) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        type(v), type(v).__name__
    )
