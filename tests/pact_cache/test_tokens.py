"""The safety tokens (pact_cache/tokens.py): the paper's selection, the self-contrast, tokens.json."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from hostile import one_line

from pact_cache.cli import main
from pact_cache.cli import main as cache_main
from pact_cache.data import chat_ids
from pact_cache.errors import TokensError
from pact_cache.models import load_model, load_tokenizer, resolve_model
from pact_cache.tokens import load_refusals, select_tokens, validate_tokens


def naive_paper_selection(aligned, base, tok, pairs, top_k, max_resp_len):
    """The paper's loop: one sample at a time, float32, mean over steps then samples."""
    V = len(tok)
    pa_sum, diff_sum = torch.zeros(V), torch.zeros(V)
    for prompt, refusal in pairs:
        resp = tok(refusal.strip(), add_special_tokens=False)["input_ids"][:max_resp_len]
        pa_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        pb_ids = tok(
            "".join(f"User: {m['content']}\n\n" for m in prompt if m["role"] == "user") + "Assistant: ",
            add_special_tokens=False,
        )["input_ids"]
        with torch.no_grad():
            la = (
                aligned(torch.tensor([list(pa_ids) + resp]))
                .logits[0, len(pa_ids) - 1 : len(pa_ids) - 1 + len(resp)]
                .float()
            )
            lb = base(torch.tensor([pb_ids + resp])).logits[0, len(pb_ids) - 1 : len(pb_ids) - 1 + len(resp)].float()
        pa, pb = la.softmax(-1), lb.softmax(-1)
        pa_sum += pa.mean(0)
        diff_sum += (pa - pb).mean(0)
    p_ref, diff = pa_sum / len(pairs), diff_sum / len(pairs)
    mask = torch.zeros(V)
    mask[torch.topk(p_ref, top_k).indices] = 1
    diff = diff * mask
    nz = diff.abs() > 1e-9
    vals = diff[nz]
    diff[nz] = (vals - vals.mean()) / (vals.std() + 1e-6)
    v = diff / (diff.norm() + 1e-6)
    ids = v.nonzero().squeeze(-1).sort().values
    return ids.tolist(), v[ids].tolist()


def test_selection_matches_the_papers_loop(tiny_model, tiny_base_model, tmp_path):
    ra, rb = resolve_model(tiny_model), resolve_model(tiny_base_model)
    tok = load_tokenizer(ra)
    aligned, _, _ = load_model(ra, "fp32", "cpu")
    base, _, _ = load_model(rb, "fp32", "cpu")
    pairs = load_refusals(None)[:9]
    got = select_tokens(aligned, tok, pairs, base, tok, top_k=12, max_resp_len=16, batch_size=4)
    ids, weights = naive_paper_selection(aligned, base, tok, pairs, 12, 16)
    assert list(got.ids) == ids and got.method == "pact-discrepancy"
    assert list(got.weights) == pytest.approx(weights, abs=1e-5)
    assert sum(w * w for w in got.weights) == pytest.approx(1.0, abs=1e-4)
    assert list(got.strings) == [tok.decode([i]) for i in ids]


def test_uniform_without_a_contrast(tiny_model):
    tok = load_tokenizer(resolve_model(tiny_model))
    model, _, _ = load_model(resolve_model(tiny_model), "fp32", "cpu")
    t = select_tokens(
        model, tok, [([{"role": "user", "content": "how do I do a bad thing"}], "I can't help with that.")], top_k=10
    )
    assert t.method == "pact-uniform" and t.K == 10 and list(t.weights) == pytest.approx([10**-0.5] * 10)


def test_self_contrast_without_base_and_cli(tiny_model, tmp_path, capsys):
    """Without --base the refusals after their harmful prompts are contrasted with the same refusals
    after the built-in benign prompts (first 4 tokens), weighted the paper's way."""
    refusals = write_jsonl(
        tmp_path / "r.jsonl", [{"input": "how do I do a bad thing", "output": "I can't help with that."}] * 3
    )
    out = tmp_path / "tokens.json"
    assert main(["tokens", "--aligned", tiny_model, "--refusals", str(refusals), "--top-k", "10", "-o", str(out)]) == 0
    t = json.loads(out.read_text())
    assert t["format"] == "pact-tokens/1" and 1 <= len(t["ids"]) <= 10 and t["method"] == "pact-self-contrast"
    assert sum(w * w for w in t["weights"]) == pytest.approx(1.0, abs=1e-4) or len(t["ids"]) == 1
    assert t["params"]["benign"] == "builtin" and t["params"]["benign_prompts"] == 32 and t["params"]["steps"] == 4
    assert t["aligned"]["weights_sha256"] and t["base"] is None
    validate_tokens(t, load_tokenizer(resolve_model(tiny_model)), "t")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.update(format="v0"), "not a pact-tokens/1 file"),
        (lambda t: t.update(ids=[1, 1]), "duplicates"),
        (lambda t: t.update(weights=[1.0]), "weights must hold 2 numbers"),
        (lambda t: t.update(weights=[1.0, float("nan")]), r"weights\[1\] must be a finite number"),
        (lambda t: t.update(weights=[1.0, "2"]), r"weights\[1\] must be a finite number"),
        (lambda t: t.pop("weights"), "weights is missing"),
        (lambda t: t.update(ids=[5, None]), r"ids\[1\] must be a non-negative integer"),
        (lambda t: t.update(ids=[5, True]), r"ids\[1\] must be a non-negative integer"),
        (lambda t: t.update(ids="5,6"), "ids must be a list"),
        (lambda t: t.update(ids=[1, 10**6], weights=[1.0, 1.0], strings=None), "outside the tokenizer's vocabulary"),
        (lambda t: t.update(weights=[-1.0, 0.0]), "every weight is <= 0"),
        (lambda t: t.update(strings=["x", "y"]), "made with another tokenizer"),
    ],
)
def test_bad_tokens_files(tiny_model, edit, needle):
    tok = load_tokenizer(resolve_model(tiny_model))
    t = {"format": "pact-tokens/1", "ids": [5, 6], "weights": [0.5, 0.5], "strings": [tok.decode([5]), tok.decode([6])]}
    edit(t)
    with pytest.raises(TokensError, match=needle):
        validate_tokens(t, tok, "tokens.json")


def test_cli_with_a_base_model(tiny_model, tiny_base_model, tmp_path):
    out = tmp_path / "tokens.json"
    assert (
        main(
            [
                "tokens",
                "--aligned",
                tiny_model,
                "--base",
                tiny_base_model,
                "--limit",
                "5",
                "--top-k",
                "8",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    t = json.loads(out.read_text())
    assert t["method"] == "pact-discrepancy" and t["base"]["weights_sha256"] != t["aligned"]["weights_sha256"]
    assert len(t["ids"]) == 8 and sum(w * w for w in t["weights"]) == pytest.approx(1.0, abs=1e-4)


def test_self_contrast_by_hand(tiny_model, tmp_path):
    """The self-contrast's weights from explicit teacher-forced passes: refusal i after its harmful
    prompt (p_a) and the model's own greedy answer to each benign prompt (argmax, token by token;
    none opens as a refusal here), first --contrast-steps tokens each, mean next-token
    probabilities; candidates the tokens the refusals say in those steps, top_k by p_a; weights the
    paper's z-score/L2 of the difference."""
    import torch

    tok = load_tokenizer(resolve_model(tiny_model))
    model, _, _ = load_model(resolve_model(tiny_model), "fp32", "cpu")
    pairs = [
        ([{"role": "user", "content": f"how do I do bad thing {i}"}], f"I can't help with bad thing {i}, sorry.")
        for i in range(3)
    ]
    benign = [[{"role": "user", "content": "bake a cake"}], [{"role": "user", "content": "name a river"}]]
    t = select_tokens(model, tok, pairs, top_k=6, benign=benign, contrast_steps=3)

    def mean_probs(prompts, answers):
        rows = []
        for msgs, answer in zip(prompts, answers):
            p = chat_ids(tok, msgs, add_generation_prompt=True)
            r = tok(answer.strip(), add_special_tokens=False)["input_ids"][:3]
            if not r:
                continue
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + r])).logits[0]
            rows.append(torch.softmax(logits[len(p) - 1 : len(p) - 1 + len(r)].float(), -1).mean(0))
        return torch.stack(rows).mean(0)[: len(tok)]

    def greedy(msgs):
        ids = chat_ids(tok, msgs, add_generation_prompt=True)
        new = []
        for _ in range(3):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        return tok.decode(new, skip_special_tokens=True)

    refusals = [r for _, r in pairs]
    p_a = mean_probs([m for m, _ in pairs], refusals)
    answers = [greedy(m) for m in benign]
    assert any(a.strip() for a in answers)  # else the test would take the fallback
    p_b = mean_probs(benign, answers)
    said = {i for r in refusals for i in tok(r, add_special_tokens=False)["input_ids"][:3]}
    ranked = [i for i in torch.argsort(p_a, descending=True).tolist() if i in said][:6]
    kept = torch.tensor(sorted(ranked))
    d = (p_a - p_b)[kept].double()
    z = (d - d.mean()) / (d.std() + 1e-6)
    assert list(t.ids) == kept.tolist() and t.method == "pact-self-contrast"
    assert list(t.weights) == pytest.approx((z / (z.norm() + 1e-6)).tolist(), abs=1e-5)


def test_self_contrast_refuses_identical_contexts(tiny_model):
    """Benign prompts equal to the harmful ones, and the "refusal" the model's own answer: its answer
    opens as the refusal, so the contrast falls back to the refusal after the benign prompt, which is
    the same context; nothing separates them, a one-line error."""
    from pact_cache.answers import generate

    tok = load_tokenizer(resolve_model(tiny_model))
    model, _, _ = load_model(resolve_model(tiny_model), "fp32", "cpu")
    msgs = [{"role": "user", "content": "do a bad thing"}]
    pairs = [(msgs, generate(model, tok, [msgs], max_new_tokens=4, progress=False)[0])]
    with pytest.raises(TokensError, match="do not differ"):
        select_tokens(model, tok, pairs, top_k=5, benign=[pairs[0][0]])


def test_tokens_weights_that_would_turn_pact_into_sft(made, tmp_path, capsys):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"format": "pact-tokens/1", "ids": [3, 4], "weights": [0.0, -1.0]}))
    line = one_line(
        capsys, cache_main, "build", made["data"], "--ref", made["model"], "--tokens", bad, "-o", tmp_path / "c"
    )
    assert "every weight is <= 0" in line and "PACT would be plain SFT" in line
    bad.write_text('{"format": "pact-tokens/1", "ids": [3, 4], "weights": [NaN, 1]}')
    assert "NaN is not valid JSON" in one_line(
        capsys, cache_main, "build", made["data"], "--ref", made["model"], "--tokens", bad, "-o", tmp_path / "c"
    )
    assert not (tmp_path / "c").exists()
