"""Datasets: load rows, normalise them to chat messages, tokenise them into response spans.

DATASET is a file or a folder of ``.jsonl`` / ``.json`` / ``.parquet`` files (any case; read
recursively, sorted by relative path; hidden entries skipped, other files reported as ignored), or a
``datasets.save_to_disk`` folder. A row is chat (``messages``), prompt/completion
(``prompt`` + ``completion``/``response``/``output``) or Alpaca (``instruction`` [+ ``input``] +
``output``). The response of a row is ``full_ids[len(prompt_ids):]`` where both come from the
reference tokenizer's chat template; each response token is one response step.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import DatasetError
from .typedjson import load_json

SUFFIXES = (".jsonl", ".json", ".parquet")
ANSWER_KEYS = ("completion", "response", "output")


@dataclass(frozen=True)
class RawRow:
    where: str  # "file:line" or "file row N", for error messages
    record: object


@dataclass(frozen=True)
class Example:
    index: int  # position of the row in the dataset
    example_id: str
    input_ids: list[int]
    response_start: int

    @property
    def steps(self) -> int:
        return len(self.input_ids) - self.response_start


def _is_save_to_disk(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _is_regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:
        return False


def scan_dataset(path: str | Path) -> tuple[list[Path], list[Path]]:
    """``(files read, files ignored)`` for a DATASET argument, files in the order rows are read.

    A folder is read recursively: every regular file whose extension is ``.jsonl``, ``.json`` or
    ``.parquet`` (in any case) is read, sorted by its path relative to the folder. Hidden files and
    folders (names starting with ``.``) are skipped; other files are returned as ignored, for the
    caller to report. A ``datasets.save_to_disk`` folder is read with ``datasets``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{path}: no such file or folder; pass a .jsonl/.json/.parquet file or a folder of them")
    if not p.is_dir():
        if p.suffix.lower() not in SUFFIXES:
            raise DatasetError(f"{path}: unsupported file type {p.suffix!r}; use .jsonl, .json or .parquet")
        if not _is_regular(p):
            raise DatasetError(f"{path}: is not a regular file (a FIFO or device?); pass a dataset file")
        _check_text_path(p)
        return [p], []
    if _is_save_to_disk(p):
        files = sorted(f for f in p.rglob("*") if _is_regular(f))
        for f in files:
            _check_text_path(f)
        return files, []
    files, ignored = [], []
    for top, dirs, names in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            f = Path(top) / name
            if name.startswith("."):
                continue
            (files if f.suffix.lower() in SUFFIXES and _is_regular(f) else ignored).append(f)
    files.sort(key=lambda f: f.relative_to(p).as_posix())
    ignored.sort(key=lambda f: f.relative_to(p).as_posix())
    if not files:
        raise DatasetError(
            f"{path}: folder holds no .jsonl/.json/.parquet file (searched recursively) and is not a "
            f"save_to_disk folder"
        )
    for f in files:
        _check_text_path(f)
    return files, [Path(shown_path(f)) for f in ignored]


def shown_path(path: str | Path) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 (which Python keeps as lone
    surrogates) shown as ``\\xff`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_text_path(path: Path) -> None:
    """A dataset path must be UTF-8 text: the manifest, the card and the messages record it as text."""
    try:
        str(path.resolve()).encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(
            f"{shown_path(path.resolve())}: the path is not valid UTF-8 (the \\x escapes); rename the "
            f"file or "
            "folder: pact-cache records a dataset's paths as text"
        ) from None


def dataset_files(path: str | Path) -> list[Path]:
    """The files a DATASET argument stands for, in the order rows are read."""
    return scan_dataset(path)[0]


def iter_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of a dataset with a location string for error messages."""
    p = Path(path).expanduser()
    files = dataset_files(p)
    if p.is_dir() and _is_save_to_disk(p):
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as err:  # datasets raises many types for a damaged folder
            raise DatasetError(
                f"{path}: not a readable save_to_disk folder ({type(err).__name__}: {str(err)[:120]})"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DatasetError(
                    f"{path}: DatasetDict has no 'train' split (has {sorted(ds)}); save the split you want"
                )
            ds = ds["train"]
        for i, rec in enumerate(ds):
            yield RawRow(f"{p} row {i}", rec)
        return
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            with open(f, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if not raw.strip():
                        continue
                    yield RawRow(f"{f}:{lineno}", load_json(raw, str(f), DatasetError, "line", line=lineno))
        elif suffix == ".json":
            data = load_json(f.read_bytes(), str(f), DatasetError, "dataset file")
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))
            if not isinstance(data, list):
                raise DatasetError(
                    f"{f}: a .json dataset must hold a list of row objects (got {type(data).__name__}); "
                    f"use .jsonl for one row per line"
                )
            for i, rec in enumerate(data):
                yield RawRow(f"{f} row {i}", rec)
        else:
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(f).to_pylist()
            except Exception as err:  # pyarrow raises several types for a file that is not Parquet
                raise DatasetError(
                    f"{f}: not a readable Parquet file ({type(err).__name__}: {str(err)[:120]}); "
                    "convert it with pyarrow/pandas or use .jsonl"
                ) from None
            for i, rec in enumerate(rows):
                yield RawRow(f"{f} row {i}", rec)


def to_messages(row: RawRow) -> list[dict]:
    """Normalise one row to chat messages whose last message is the assistant's answer."""
    rec, where = row.record, row.where
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: row is a {type(rec).__name__}, not an object; each row must be a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DatasetError(f"{where}: messages[{j}] must be an object with string 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise DatasetError(
                f"{where}: the last message has role {out[-1]['role']!r}; it must be the assistant's answer"
            )
        if len(out) < 2:
            raise DatasetError(f"{where}: 'messages' holds only the answer; add the user turn before it")
    elif "instruction" in rec:
        ins, inp, ans = rec.get("instruction"), rec.get("input") or "", rec.get("output")
        if not isinstance(ins, str) or not isinstance(inp, str) or not isinstance(ans, str):
            raise DatasetError(
                f"{where}: Alpaca rows need string 'instruction' and 'output' (and optional string 'input')"
            )
        user = f"{ins} {inp}" if inp else ins  # as the paper's code joins them
        out = [{"role": "user", "content": user}, {"role": "assistant", "content": ans}]
    elif "prompt" in rec:
        key = next((k for k in ANSWER_KEYS if k in rec), None)
        if key is None:
            raise DatasetError(f"{where}: row has 'prompt' but no answer; add 'completion' (or 'response'/'output')")
        if not isinstance(rec["prompt"], str) or not isinstance(rec[key], str):
            raise DatasetError(f"{where}: 'prompt' and '{key}' must be strings")
        out = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec[key]}]
    else:
        keys = ", ".join(sorted(map(str, rec))) or "none"
        raise DatasetError(
            f"{where}: unknown row format (keys: {keys}); use 'messages', 'prompt'+'completion' or "
            f"'instruction'+'output'"
        )
    if not out[-1]["content"].strip():
        raise DatasetError(f"{where}: empty response; drop the row or give it an answer")
    return out


def prompts_from(path: str, limit: int | None = None) -> list[tuple[list[dict], str | None]]:
    """(prompt messages, reference answer or None) from any dataset format, or from rows holding
    only a prompt (``prompt``, ``input`` or ``instruction`` [+ ``input``])."""
    out = []
    for row in iter_rows(path):
        rec = row.record
        if (
            isinstance(rec, dict)
            and "instruction" not in rec
            and "prompt" not in rec
            and "messages" not in rec
            and "input" in rec
        ):
            rec = {"prompt": rec["input"], "completion": rec.get("output") or "-"}
        if (
            isinstance(rec, dict)
            and "messages" not in rec
            and not (rec.get("output") or rec.get("completion") or rec.get("response"))
        ):
            rec = dict(rec, **{"output" if "instruction" in rec else "completion": "-"})  # prompt-only rows
        msgs = to_messages(RawRow(row.where, rec))
        answer = msgs[-1]["content"]
        out.append((msgs[:-1], None if answer == "-" else answer))
        if limit and len(out) >= limit:
            break
    return out


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    enc = tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(enc["input_ids"])


def example_id(index: int, messages: list[dict]) -> str:
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]
    return f"{index:08d}-{digest}"


def tokenize_row(tok, index: int, row: RawRow, max_length: int | None) -> Example | str:
    """Return the tokenised example, or a skip reason (str) when the prompt does not fit."""
    messages = to_messages(row)
    try:
        prompt = chat_ids(tok, messages[:-1], add_generation_prompt=True)
        full = chat_ids(tok, messages, add_generation_prompt=False)
    except Exception as err:  # jinja and tokenizer errors on content the template does not expect
        raise DatasetError(
            f"{row.where}: the chat template cannot render this row ({type(err).__name__}: "
            f"{str(err)[:120]}); "
            "fix the row's roles or content"
        ) from None
    if full[: len(prompt)] != prompt:
        raise DatasetError(
            f"{row.where}: the chat template renders the prompt differently with and without the answer, "
            "so the response span is undefined; use a model whose chat template keeps the prompt as a prefix"
        )
    if len(full) == len(prompt):
        raise DatasetError(f"{row.where}: the response tokenises to nothing; drop the row or give it an answer")
    if max_length is not None:
        if len(prompt) >= max_length:
            return "prompt_too_long"
        full = full[:max_length]
    return Example(index, example_id(index, messages), full, len(prompt))


def tokenize_dataset(path: str | Path, tok, max_length: int | None = None, progress: bool = True):
    """Tokenise every row. Returns ``(examples, skipped)``; ``skipped`` maps reason -> list of row locations.

    Malformed rows raise ``DatasetError`` naming the row: a build never starts on bad input.
    """
    from tqdm.auto import tqdm

    examples: list[Example] = []
    skipped: dict[str, list[str]] = {}
    rows = iter_rows(path)
    for index, row in enumerate(tqdm(rows, desc="tokenising", unit="row", disable=not progress, leave=False)):
        ex = tokenize_row(tok, index, row, max_length)
        if isinstance(ex, str):
            skipped.setdefault(ex, []).append(row.where)
        else:
            examples.append(ex)
    if not examples and not skipped:
        raise DatasetError(f"{path}: dataset has no rows")
    return examples, skipped


def assistant_header_ids(tok) -> list[int]:
    """Token ids of the assistant header: the chat template's text for ``add_generation_prompt=True``
    minus ``False``, for a dummy user turn (the post view's context before the response)."""
    dummy = [{"role": "user", "content": "hello"}]
    s0 = tok.apply_chat_template(dummy, tokenize=False, add_generation_prompt=False)
    s1 = tok.apply_chat_template(dummy, tokenize=False, add_generation_prompt=True)
    header = s1[len(s0) :] if s1.startswith(s0) else ""
    ids = tok.encode(header if header.strip() else "Assistant:", add_special_tokens=False)
    if not ids:
        raise DatasetError("the tokenizer's chat template yields an empty assistant header; the post view is undefined")
    return ids


def dataset_fingerprint(path: str | Path) -> dict:
    """sha256 over the sorted (relative name, content) of every file the dataset reads."""
    p = Path(path).expanduser()
    files = dataset_files(p)
    root = p if p.is_dir() else p.parent
    h = hashlib.sha256(b"pact-dataset/1\0")
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    return {
        "source": str(p.resolve()),
        "files": [f.relative_to(root).as_posix() for f in files],
        "sha256": h.hexdigest(),
    }
