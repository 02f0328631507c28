"""Datasets (pact_cache/data.py): every row format, folders, and broken files as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_jsonl
from hostile import one_line

from pact_cache.cli import main as cache_main
from pact_cache.data import RawRow, assistant_header_ids, dataset_fingerprint, iter_rows, to_messages, tokenize_dataset
from pact_cache.errors import DatasetError
from pact_cache.models import load_tokenizer, resolve_model


def msgs(row):
    return to_messages(RawRow("x", row))


def test_row_formats_normalise_to_chat():
    assert msgs({"prompt": "p", "completion": "c"}) == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "c"},
    ]
    assert msgs({"prompt": "p", "response": "r"})[-1]["content"] == "r"
    assert msgs({"prompt": "p", "output": "o"})[-1]["content"] == "o"
    assert msgs({"instruction": "Do it", "input": "now", "output": "ok"})[0]["content"] == "Do it now"
    assert msgs({"instruction": "Do it", "input": "", "output": "ok"})[0]["content"] == "Do it"
    chat = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert msgs(chat) == chat["messages"]


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": "p"}, "no answer"),
        ({"instruction": "i"}, "Alpaca rows need"),
        ({"text": "t"}, "unknown row format"),
        ({"prompt": "p", "completion": "   "}, "empty response"),
        (
            {
                "messages": [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "again"},
                ]
            },
            "must be the assistant",
        ),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "only the answer"),
        ({"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
        (["not", "an", "object"], "not an object"),
    ],
)
def test_bad_rows_name_the_row_and_the_problem(row, needle):
    with pytest.raises(DatasetError, match=needle) as err:
        to_messages(RawRow("data.jsonl:7", row))
    assert str(err.value).startswith("data.jsonl:7: ")


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(DatasetError, match=r"d.jsonl:3: invalid JSON"):
        list(iter_rows(p))


def test_folder_reads_files_in_sorted_order_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "completion": "1"}])
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "a", "completion": "1"}]))
    pq.write_table(pa.table({"prompt": ["c"], "completion": ["1"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.record["prompt"] for r in iter_rows(tmp_path)] == ["a", "b", "c"]
    fp = dataset_fingerprint(tmp_path)
    assert fp["files"] == ["a.json", "b.jsonl", "c.parquet"]
    (tmp_path / "b.jsonl").write_text('{"prompt": "b", "completion": "2"}\n')
    assert dataset_fingerprint(tmp_path)["sha256"] != fp["sha256"]


def test_save_to_disk_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(
        [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    ).save_to_disk(str(tmp_path / "ds"))
    assert [r.record["prompt"] for r in iter_rows(tmp_path / "ds")] == ["p1", "p2"]


def test_missing_dataset_and_unsupported_type(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        list(iter_rows(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported file type"):
        list(iter_rows(tmp_path / "d.csv"))


def test_tokenise_spans_truncation_and_skips(tiny_model, tmp_path):
    tok = load_tokenizer(resolve_model(tiny_model))
    long_prompt = "word " * 300
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "What is the capital of France?", "completion": "Paris is the capital of France."},
            {"prompt": long_prompt, "completion": "ok"},
            {"prompt": "Write a poem", "completion": "the sea " * 40},
        ],
    )
    examples, skipped = tokenize_dataset(p, tok, max_length=64, progress=False)
    assert [e.index for e in examples] == [0, 2]
    assert skipped == {"prompt_too_long": [f"{p}:2"]}
    e0 = examples[0]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert e0.input_ids[: e0.response_start] == list(prompt)
    assert tok.decode(e0.input_ids[e0.response_start :]).startswith("Paris")
    assert len(examples[1].input_ids) == 64 and examples[1].steps == 64 - examples[1].response_start
    assert e0.example_id.startswith("00000000-")
    # the header is what the generation prompt adds
    assert tok.decode(assistant_header_ids(tok)) == "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "content, needle",
    [
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n',
            "train.jsonl:2: invalid UTF-8",
        ),
        (np.random.default_rng(1).bytes(3000), "train.jsonl:1:"),
        (b'{"prompt": ' * 100000 + b"\n", "train.jsonl:1: "),
        (b'{"prompt": "a", "completion": 5}\n', "train.jsonl:1: 'prompt' and 'completion' must be strings"),
        (
            b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}\n',
            "train.jsonl:1: messages[1] must be an object",
        ),
    ],
)
def test_broken_dataset_files(made, tmp_path, capsys, content, needle):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    out = tmp_path / "cache"
    assert needle in one_line(capsys, cache_main, "build", data, "--ref", made["model"], "-o", out, "--no-progress")
    assert not out.exists()


def test_json_and_parquet_files_that_are_not_what_they_say(made, tmp_path, capsys):
    (tmp_path / "d.json").write_bytes(b'[{"prompt": "\xc3\x28"}]')
    assert "d.json:1: invalid UTF-8" in one_line(
        capsys, cache_main, "build", tmp_path / "d.json", "--ref", made["model"], "-o", tmp_path / "c"
    )
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    assert "d.parquet: not a readable Parquet file" in one_line(
        capsys, cache_main, "build", tmp_path / "d.parquet", "--ref", made["model"], "-o", tmp_path / "c"
    )
    assert not (tmp_path / "c").exists()


def test_a_dataset_folder_is_read_recursively_whatever_the_case_of_extensions(tmp_path):
    from pact_cache.data import dataset_fingerprint, iter_rows, scan_dataset

    write_jsonl(tmp_path / "ds" / "B.JSONL", [{"prompt": "b", "completion": "1"}])
    write_jsonl(tmp_path / "ds" / "a.jsonl", [{"prompt": "a", "completion": "1"}])
    write_jsonl(tmp_path / "ds" / "sub" / "c.Json", [])
    (tmp_path / "ds" / "sub" / "c.Json").write_text(json.dumps([{"prompt": "c", "completion": "1"}]))
    write_jsonl(tmp_path / "ds" / ".hidden" / "x.jsonl", [{"prompt": "hidden", "completion": "1"}])
    (tmp_path / "ds" / "README.md").write_text("notes")
    files, ignored = scan_dataset(tmp_path / "ds")
    assert [f.relative_to(tmp_path / "ds").as_posix() for f in files] == ["B.JSONL", "a.jsonl", "sub/c.Json"]
    assert [f.name for f in ignored] == ["README.md"]
    assert [r.record["prompt"] for r in iter_rows(tmp_path / "ds")] == ["b", "a", "c"]
    assert dataset_fingerprint(tmp_path / "ds")["files"] == ["B.JSONL", "a.jsonl", "sub/c.Json"]
