"""The cache card (pact_cache/card.py): README.md beside the manifest, a Hugging Face dataset card
that every command writing a cache writes from the manifest, and that datasets.load_dataset reads."""

import json
import shutil

import pytest

from pact_cache.card import CARD, card_text
from pact_cache.cli import main
from pact_cache.format import MANIFEST, open_cache


def front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_card_says_what_the_manifest_says_and_load_dataset_reads_the_rows(made, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    datasets = pytest.importorskip("datasets")
    src = made["q8"]
    cache = open_cache(src)
    text = (src / CARD).read_text()
    assert text == card_text(cache.manifest)  # from the manifest alone
    meta = front_matter(text)
    assert meta["configs"][0]["data_files"][0]["path"] == "part-*.parquet" and "pact-cache" in meta["tags"]
    assert meta["license"] and meta["source_datasets"]
    for needle in (
        cache.cache_id,
        cache.manifest.reference.name,
        f"K={cache.K}",
        cache.manifest.tokens.describe(),
        f"{cache.num_rows:,} / {cache.num_steps:,}",
        "`full_q`",
        "`target_q`",
        f"pact-cache verify THIS_FOLDER --cache-id {cache.cache_id[:12]}",
    ):
        assert needle in text, needle
    copy = tmp_path / "c"
    shutil.copytree(src, copy)
    ds = datasets.load_dataset(str(copy))  # no arguments: the card's configs find the parts
    rows = list(cache.iter_rows())
    assert ds["train"].num_rows == len(rows)
    assert ds["train"]["example_id"] == [r.example_id for r in rows]
    assert ds["train"][0]["input_ids"] == rows[0].input_ids.tolist()
    assert main(["verify", str(copy)]) == 0  # the card (and datasets' nothing) is no part of the cache


def test_every_command_that_writes_a_cache_writes_its_card(made, tmp_path, capsys):
    outs = {"cp": tmp_path / "cp", "merge": tmp_path / "merge", "filter": tmp_path / "filter"}
    assert main(["cp", str(made["q8"]), str(outs["cp"]), "--no-progress"]) == 0
    assert main(["merge", str(made["q8"]), str(made["theirs"]), "-o", str(outs["merge"]), "--no-progress"]) == 0
    assert main(["filter", str(made["q8"]), "--above", "1.0", "-o", str(outs["filter"]), "--no-progress"]) == 0
    for name, out in outs.items():
        m = json.loads((out / MANIFEST).read_text())
        assert (out / CARD).read_text() == card_text(open_cache(out).manifest) and m["cache_id"] in (
            out / CARD
        ).read_text(), name


def test_a_scored_cache_card_lists_its_scores(scored):
    from pathlib import Path

    out = Path(scored[1])
    text = (out / CARD).read_text()
    assert text == card_text(open_cache(out).manifest) and "TOSS token scores (toss/1)" in text


HOSTILE_NAMES = [
    "".join(chr(c) for c in range(0x20)),
    "del\x7fhere",
    "c1\x80\x85\x9fend",
    'quo"te \\ back',
    "line\nbreak\r",
    "---\nlicense: mit",
    "| pipe: [a, b] #x &y *z !t %p @q `r",
    "sep\u2028\u2029x",
    "nbsp\u00a0zw\u200b",
    "bad byte \udcff.jsonl",
    "emoji \U0001f600 e\u0301",
    "tab\there",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_any_source_name_gives_a_card_whose_front_matter_parses_back(made, name):
    """Every byte a path or name can hold: control characters, DEL, C1, quotes, newlines, ---, YAML's
    indicators, separators, a file name that is not UTF-8 (a lone surrogate): valid YAML that reads back
    as the name, and a body that is printable UTF-8."""
    from dataclasses import replace

    m = open_cache(made["q8"]).manifest
    m = replace(m, dataset=replace(m.dataset, source=name), reference=replace(m.reference, name=name))
    text = card_text(m)
    text.encode("utf-8")  # no lone surrogate left
    meta = front_matter(text)
    assert meta["source_datasets"] == [name] and meta["pretty_name"] == "pact-cache of " + name
    assert meta["configs"][0]["data_files"][0]["path"] == "part-*.parquet"
    body = text.split("---\n", 2)[2]
    assert all(c.isprintable() or c == "\n" for c in body)


def test_load_dataset_reads_a_folder_whose_card_holds_hostile_names(made, tmp_path, monkeypatch):
    from dataclasses import replace

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    datasets = pytest.importorskip("datasets")
    copy = tmp_path / "c"
    shutil.copytree(made["q8"], copy)
    m = open_cache(copy).manifest
    (copy / CARD).write_text(
        card_text(replace(m, dataset=replace(m.dataset, source="".join(HOSTILE_NAMES)))), encoding="utf-8"
    )
    assert datasets.load_dataset(str(copy))["train"].num_rows == m.counts.rows


def test_a_dataset_path_that_is_not_utf8_is_refused_in_one_line(made, tmp_path, capsys):
    import os

    from conftest import CHAT_ROWS, write_jsonl
    from hostile import one_line

    folder = tmp_path / "ds"
    write_jsonl(folder / "rows.jsonl", CHAT_ROWS[:4])
    os.rename(folder / "rows.jsonl", os.path.join(os.fsencode(folder), b"r\xffows.jsonl"))
    line = one_line(capsys, main, "build", folder, "--ref", made["model"], "-o", tmp_path / "out", "--no-progress")
    assert "r\\xffows.jsonl: the path is not valid UTF-8 (the \\x escapes); rename the file or folder" in line
    assert not (tmp_path / "out").exists()
