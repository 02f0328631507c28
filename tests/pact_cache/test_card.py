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
    for needle in (cache.cache_id, cache.manifest.reference.name, f"K={cache.K}", cache.manifest.tokens.describe(),
                   f"{cache.num_rows:,} / {cache.num_steps:,}", "`full_q`", "`target_q`", f"pact-cache verify THIS_FOLDER --cache-id {cache.cache_id[:12]}"):
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
        assert (out / CARD).read_text() == card_text(open_cache(out).manifest) and m["cache_id"] in (out / CARD).read_text(), name


def test_a_scored_cache_card_lists_its_scores(scored):
    from pathlib import Path

    out = Path(scored[1])
    text = (out / CARD).read_text()
    assert text == card_text(open_cache(out).manifest) and "TOSS token scores (toss/1)" in text
