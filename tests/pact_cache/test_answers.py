"""Answers and judges (pact_cache/answers.py): greedy generation, the keyword refusal judge, a guard's verdicts."""

from __future__ import annotations

import pytest

from pact_cache.answers import (
    KeywordJudge,
    check_prompts_fit,
    context_length,
    generate,
    parse_guard_verdict,
    stop_ids,
)
from pact_cache.errors import DatasetError
from pact_cache.models import load_model, load_tokenizer, resolve_model


@pytest.mark.parametrize(
    "response, refusal",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("i cannot do this", True),
        ("As an AI, I must decline.", True),
        ("Sure, here is how to do it: first", False),
        ("Paris is the capital of France.", False),
    ],
)
def test_keyword_judge(response, refusal):
    assert KeywordJudge().is_refusal("p", response) is refusal


def test_batched_generation_equals_one_at_a_time(tiny_model):
    resolved = resolve_model(tiny_model)
    tok = load_tokenizer(resolved)
    model, _, _ = load_model(resolved, "fp32", "cpu")
    prompts = [
        [{"role": "user", "content": t}]
        for t in ("What is the capital of France?", "Write a short poem about the sea and the wind", "hi")
    ]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single


def test_a_prompt_longer_than_the_models_positions_is_refused_before_any_generation(tiny_model, monkeypatch):
    """Bounded work on hostile input: the tiny model reads 512 positions; a prompt that with max_new_tokens needs
    more raises DatasetError naming it, and the model never runs."""
    resolved = resolve_model(tiny_model)
    tok = load_tokenizer(resolved)
    model, _, _ = load_model(resolved, "fp32", "cpu")
    assert context_length(model) == 512
    monkeypatch.setattr(model, "generate", lambda **kw: pytest.fail("the model ran"))
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "word " * 2000}]]
    with pytest.raises(
        DatasetError, match=r"prompt 2 of 2: [\d,]+ tokens, with 8 new ones more than the 512 positions"
    ):
        generate(model, tok, prompts, max_new_tokens=8, progress=False)
    with pytest.raises(DatasetError, match=r"h.jsonl: row 2 of 2: "):
        check_prompts_fit(model, tok, prompts, 8, "h.jsonl: row")
    check_prompts_fit(model, tok, prompts[:1], 8, "h.jsonl: row")  # a prompt that fits passes


def test_an_answer_is_finished_only_when_it_ends_by_itself(tiny_model):
    """``return_finished``: True where the answer stopped at one of ``stop_ids`` (the tokenizer's end of sequence
    and the model's generation config's), False where it ran into ``max_new_tokens``."""
    import torch

    from pact_cache.data import chat_ids

    resolved = resolve_model(tiny_model)
    tok = load_tokenizer(resolved)
    model, _, _ = load_model(resolved, "fp32", "cpu")
    prompts = [[{"role": "user", "content": "What is the capital of France?"}]]
    ids = torch.tensor([chat_ids(tok, prompts[0], add_generation_prompt=True)])
    first = int(model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.eos_token_id)[0, -1])
    assert first != tok.eos_token_id  # the random tiny model's greedy first token is an ordinary one
    model.generation_config.eos_token_id = None
    assert stop_ids(model, tok) == {tok.eos_token_id}
    assert generate(model, tok, prompts, max_new_tokens=1, progress=False, return_finished=True)[1] == [False]
    model.generation_config.eos_token_id = [first]  # now the model's config ends answers at that token
    assert stop_ids(model, tok) == {tok.eos_token_id, first}
    assert generate(model, tok, prompts, max_new_tokens=3, progress=False, return_finished=True)[1] == [True]


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("safe", False),
        ("unsafe\nS1", True),
        ("  Unsafe\nS9,S10", True),
        ("\n\nsafe.", False),
        ("", None),
        ("I think it is fine", None),
        ("safety first", None),
    ],
)
def test_guard_verdicts_are_read_from_the_first_line(text, verdict):
    assert parse_guard_verdict(text) is verdict
