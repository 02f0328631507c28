"""Safety-token selection (the set S and its weights), as the PACT paper's
``compute_safety_tokens_pact.py`` does it.

Each refusal (its first ``max_resp_len`` tokens, tokenised on its own) is teacher-forced after
the aligned model's chat-template prompt and after the base model's plain prompt
``"User: {prompt}\\n\\nAssistant: "``. Per sample we average the next-token probabilities over the
response steps, then average over samples: ``p_a`` (aligned) and ``delta = p_a - p_b``. The
``top_k`` tokens with the highest mean ``p_a`` are kept; their weights are ``delta`` z-scored over
the kept tokens (unbiased std, eps 1e-6), then L2-normalised over the whole vector.

Without a base model (the default of ``pact-cache tokens`` and ``build``), the reference is
contrasted with itself (``pact-self-contrast``): ``p_a`` is its mean next-token distribution over
the first ``steps`` tokens of the refusals teacher-forced after the harmful prompts they answer
(default 4: a refusal is decided in its opening words, "I'm sorry, I can't"; later words follow
the topic), ``p_b`` the same over the first ``steps`` tokens of its own greedy answers to benign
prompts (32 built in, written for this project; ``--benign`` replaces them), leaving out answers
that open as a refusal does (their first three tokens): the tokens it says when it refuses and not
when it answers. The candidates are the tokens the refusals say in those steps (not every token
predicted there: after a harmful prompt those include the reference's compliance openings), the
``top_k`` likeliest by ``p_a``; weights ``p_a - p_b`` z-scored and L2-normalised as the paper's
(negative weights count as 0 in the loss). On the study's aligned reference: " can" 0.64, "I"
0.55, "'t" 0.28; on SmolLM2-135M-Instruct "'m" 0.90, "'t" 0.23, " sorry". (The first self-contrast,
the same refusals after benign prompts, gave the negation no weight: after "I can" both contexts
predict it. It remains the fallback when the reference refuses every benign prompt.)
A caller that passes neither a base model nor benign prompts gets the ``top_k`` tokens by
``p_a`` with uniform weights (``pact-uniform``).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

from .data import RawRow, chat_ids, iter_rows, prompts_from, to_messages
from .errors import TokensError, preview
from .manifest import MANIFEST_MAX_BYTES, SafetyTokens
from .storage import read_limited
from .typedjson import load_json


def builtin_refusals_path() -> Path:
    return Path(str(resources.files("pact_cache") / "resources" / "refusals.jsonl"))


def builtin_benign_path() -> Path:
    return Path(str(resources.files("pact_cache") / "resources" / "benign.jsonl"))


def load_benign(path: str | Path | None = None) -> list[list[dict]]:
    """Benign prompts (as chat messages) from any dataset format, answers optional and unused, or
    the built-in set."""
    src = path if path is not None else builtin_benign_path()
    prompts = [msgs for msgs, _ in prompts_from(src)]
    if not prompts:
        raise TokensError(f"{src}: no benign prompts found")
    return prompts


def load_refusals(path: str | Path | None = None) -> list[tuple[list[dict], str]]:
    """(prompt messages, refusal text) pairs from any dataset format, or the built-in set."""
    src = path if path is not None else builtin_refusals_path()
    pairs = []
    for row in iter_rows(src):
        rec = row.record
        # the paper's safe_direction.json uses {"input", "output"}: read it as prompt/completion
        if (
            isinstance(rec, dict)
            and "input" in rec
            and "output" in rec
            and "instruction" not in rec
            and "prompt" not in rec
        ):
            row = RawRow(row.where, {"prompt": rec["input"], "completion": rec["output"]})
        msgs = to_messages(row)
        pairs.append((msgs[:-1], msgs[-1]["content"]))
    if not pairs:
        raise TokensError(f"{src}: no refusals found")
    return pairs


def _base_prompt(messages: list[dict]) -> str:
    text = "".join(f"User: {m['content']}\n\n" for m in messages if m["role"] == "user")
    return text + "Assistant: "


def _mean_step_probs(model, seqs: list[list[int]], starts: list[int], counts: list[int], device, batch_size: int):
    """Per sample, the mean over its response steps of softmax(logits) in float32: ``(N, V)``."""
    import torch

    out = []
    pad = 0
    for b0 in range(0, len(seqs), batch_size):
        chunk = list(range(b0, min(b0 + batch_size, len(seqs))))
        L = max(len(seqs[i]) for i in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, i in enumerate(chunk):
            pos = slice(starts[i] - 1, starts[i] - 1 + counts[i])
            out.append(torch.softmax(logits[r, pos].float(), dim=-1).mean(0).cpu())
    return torch.stack(out)


def _answer_seqs(tok, pairs, max_resp_len: int) -> tuple[list, list, list]:
    """Chat-template prompt + answer token ids for (prompt messages, answer) pairs; empty answers skipped."""
    seqs, starts, counts = [], [], []
    for prompt_msgs, answer in pairs:
        resp = tok(answer.strip(), add_special_tokens=False)["input_ids"][:max_resp_len]
        if resp:
            p = chat_ids(tok, prompt_msgs, add_generation_prompt=True)
            seqs.append(p + resp)
            starts.append(len(p))
            counts.append(len(resp))
    return seqs, starts, counts


def _paper_weights(delta):
    """The paper's weighting: z-score over the kept tokens (unbiased std, eps 1e-6), then L2-normalise."""
    import torch

    z = (delta - delta.mean()) / (delta.std() + 1e-6) if delta.numel() > 1 else torch.zeros_like(delta)
    return (z / (z.norm() + 1e-6)).tolist()


def select_tokens(
    aligned,
    aligned_tok,
    pairs,
    base=None,
    base_tok=None,
    top_k: int = 50,
    max_resp_len: int = 64,
    device="cpu",
    batch_size: int = 8,
    aligned_fp=None,
    base_fp=None,
    source: str = "builtin",
    benign=None,
    benign_source: str = "builtin",
    contrast_steps: int = 4,
) -> SafetyTokens:
    """Select S and its weights; ``.to_json()`` of the result is a ``tokens.json`` (``pact-tokens/1``).
    With ``base``: the paper's aligned-vs-base discrepancy over ``max_resp_len`` refusal tokens; else
    with ``benign`` (prompt messages): the refusals after their harmful prompts against the same
    refusals after benign prompts, over their first ``contrast_steps`` tokens; else uniform weights on
    the likeliest tokens."""
    import torch

    if top_k < 1:
        raise TokensError(f"--top-k {top_k}: must be at least 1")
    if contrast_steps < 1:
        raise TokensError(f"--contrast-steps {contrast_steps}: must be at least 1")
    self_contrast = base is None and benign is not None
    if self_contrast:
        if not benign:
            raise TokensError("no benign prompt given; the self-contrast needs at least one")
        max_resp_len = contrast_steps
    if base is not None and len(base_tok) != len(aligned_tok):
        raise TokensError(
            f"base tokenizer has {len(base_tok)} tokens, aligned has {len(aligned_tok)}; the paper's "
            f"method needs the same vocabulary"
        )
    seq_a, st_a, counts = _answer_seqs(aligned_tok, pairs, max_resp_len)
    seq_b, st_b = [], []
    for prompt_msgs, refusal in pairs if base is not None else []:
        resp = aligned_tok(refusal.strip(), add_special_tokens=False)["input_ids"][:max_resp_len]
        if resp:
            if base_tok(refusal.strip(), add_special_tokens=False)["input_ids"][:max_resp_len] != resp:
                raise TokensError(
                    "base and aligned tokenizers split a refusal differently; use models with the same tokenizer"
                )
            pb = base_tok(_base_prompt(prompt_msgs), add_special_tokens=False)["input_ids"]
            seq_b.append(pb + resp)
            st_b.append(len(pb))
    if not seq_a:
        raise TokensError("no refusal has a non-empty response; check the refusals file")
    vocab = len(aligned_tok)
    p_a = _mean_step_probs(aligned, seq_a, st_a, counts, device, batch_size).mean(0)[:vocab]
    k = min(top_k, p_a.numel())
    kept = torch.topk(p_a, k).indices.sort().values
    params = {"top_k": top_k, "max_resp_len": max_resp_len, "refusals": source, "samples": len(seq_a)}
    if base is not None:
        p_b = _mean_step_probs(base, seq_b, st_b, counts, device, batch_size).mean(0)[:vocab]
        delta = (p_a - p_b)[kept].double()
        nonzero = delta.abs() > 1e-9  # the paper keeps only nonzero entries of the masked direction
        kept, delta = kept[nonzero], delta[nonzero]
        weights = _paper_weights(delta)
        method = "pact-discrepancy"
    elif self_contrast:
        # candidates: the tokens the refusals say in their first steps, likeliest first (not every token the
        # reference would predict there: after a harmful prompt those include its compliance openings)
        said = {t for seq, st in zip(seq_a, st_a) for t in seq[st:]}
        ranked = [t for t in torch.argsort(p_a, descending=True).tolist() if t in said][:top_k]
        kept = torch.tensor(sorted(ranked), dtype=torch.long)
        # the contrast: the reference's own answers to the benign prompts, at the same steps: tokens it says when
        # it refuses and not when it answers. Answers that open as one of the refusals opens (its first three
        # tokens) are dropped: an over-cautious reference refuses some benign prompts too. (The same refusals
        # teacher-forced after benign prompts, the first default, gives the negation no weight: after "I can"
        # both contexts predict it; it stays the fallback when every benign prompt is refused.)
        from .answers import generate

        answers = generate(
            aligned,
            aligned_tok,
            benign,
            max_new_tokens=contrast_steps,
            batch_size=batch_size,
            device=device,
            progress=False,
        )
        openings = {tuple(seq[st : st + 3]) for seq, st in zip(seq_a, st_a)}
        answered = [
            (msgs, ans)
            for msgs, ans in zip(benign, answers)
            if tuple(aligned_tok(ans.strip(), add_special_tokens=False)["input_ids"][:3]) not in openings
        ]
        seq_n, st_n, counts_n = _answer_seqs(aligned_tok, answered, max_resp_len)
        contrast = (
            f"the reference's own answers to {len(seq_n)} of {len(benign)} benign prompts "
            "(those opening as a refusal dropped)"
        )
        if not seq_n:
            seq_n, st_n, counts_n = _answer_seqs(
                aligned_tok, [(benign[i % len(benign)], r) for i, (_, r) in enumerate(pairs)], max_resp_len
            )
            contrast = "the refusals after benign prompts (the reference refused every benign prompt)"
        p_n = _mean_step_probs(aligned, seq_n, st_n, counts_n, device, batch_size).mean(0)[:vocab]
        weights = _paper_weights((p_a - p_n)[kept].double())
        if not weights or max(weights) <= 0:
            raise TokensError(
                "the reference's next-token distributions after the harmful and the benign prompts do "
                "not differ; "
                "no safety token can be weighted (are the benign prompts the harmful ones?)"
            )
        method = "pact-self-contrast"
        params = {
            "top_k": top_k,
            "steps": contrast_steps,
            "refusals": source,
            "samples": len(seq_a),
            "benign": benign_source,
            "benign_prompts": len(benign),
            "candidates": "tokens of the refusals",
            "contrast": contrast,
        }
    else:
        weights = [1.0 / math.sqrt(len(kept))] * len(kept)
        method = "pact-uniform"
    ids = kept.tolist()
    if not ids:
        raise TokensError(
            "no candidate token separates the two distributions (aligned vs base, or refusals vs benign "
            "answers); no safety token can be weighted (is --base the same model as --aligned?)"
        )
    selected = SafetyTokens(
        ids=tuple(ids),
        weights=tuple(float(w) for w in weights),
        strings=tuple(aligned_tok.decode([i]) for i in ids),
        method=method,
        params=params,
        aligned=aligned_fp,
        base=base_fp,
        mean_aligned_prob=tuple(float(p) for p in p_a[kept].tolist()),
    )
    return SafetyTokens.parse(selected.to_json(), "the selected safety tokens", TokensError)  # the same rules as a file


def validate_tokens(tokens, tok, where: str) -> SafetyTokens:
    """Parse a tokens.json object (every field's type, range and length) and check it against ``tok``."""
    parsed = SafetyTokens.parse(tokens, where, TokensError)
    vocab = len(tok)
    bad = [i for i in parsed.ids if not 0 <= i < vocab]
    if bad:
        raise TokensError(
            f"{where}: ids {bad[:5]} are outside the tokenizer's vocabulary (size {vocab}); this file "
            f"was made for another model, rerun `pact-cache tokens` with it"
        )
    if parsed.strings is not None:
        for i, s in zip(parsed.ids, parsed.strings):
            if tok.decode([i]) != s:
                raise TokensError(
                    f"{where}: id {i} decodes to {preview(tok.decode([i]))} but the file says "
                    f"{preview(s)}; it was made with another tokenizer, rerun `pact-cache tokens`"
                )
    return parsed


def read_tokens(path: str | Path, tok) -> SafetyTokens:
    if not Path(path).expanduser().exists():
        raise TokensError(f"{path}: no such tokens file; make one with `pact-cache tokens` or leave out --tokens")
    data = read_limited(path, MANIFEST_MAX_BYTES, str(path), TokensError, "tokens file (from `pact-cache tokens`)")
    return validate_tokens(
        load_json(data, str(path), TokensError, "tokens file", fix="make it again with `pact-cache tokens`"),
        tok,
        str(path),
    )
