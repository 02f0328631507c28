#!/usr/bin/env python
"""Benchmarks, each measured side by side in one run and quoted as ratios (never asserted).

python tools/bench.py build   [--rows 256] [--batch-size 8] [--repeats 3]
    build throughput (reference log-probs, both views) vs a bare forward pass of the same model
    over the same batches (both views), interleaved, best of N.
python tools/bench.py train   --cache CACHE [--model M] [--batch-size 8] [--steps 12] [--warmup 2] [--repeats 1]
    peak memory and step time of pact-train with the cache (pact, and every other method of the
    registry, and TOSS's SFT with --token-mask 0.2 when the cache has scores) vs plain SFT (same
    loop and settings) vs the same PACT loss with a live reference model (the paper's way); each
    in its own process.
    With --model a folder from `random-model`, this measures a large configuration on a GPU.
python tools/bench.py stacks  --cache CACHE [--model M] [--batch-size 8] [--steps 12] [--warmup 2] [--repeats 1]
    the tool users would otherwise pick against pact-cache's paths, each in its own process, same
    model, LoRA, rows (cache order), batch and precision: TRL's SFTTrainer (plain SFT, its own
    collator, completion-only loss), pact-train --method sft, pact-train --method pact, and PACT
    through the Trainer integration (PactTrainer): peak memory and step time as ratios to TRL.
python tools/bench.py qlora   --cache CACHE --model M [--batch-size 8] [--steps 12] [--warmup 2] [--grad-checkpointing]
    LoRA vs QLoRA (NF4 base) vs QLoRA + paged 8-bit AdamW, PACT from the cache, each in its own process:
    peak memory and step time, and pact-train's memory estimate beside each measured peak (its error).
python tools/bench.py reference-quant [--model M] [--rows 200]
    the same rows cached by the reference as stored, in NF4 and in int8 (build --quantize, same safety tokens):
    mean and largest |difference| of the cached log-probs, rows the hard row gate picks before and after.
python tools/bench.py random-model --preset llama-3.2-1b -o DIR [--tokenizer MODEL]
    writes a model folder with random bf16 weights of a public architecture and the tokenizer
    of MODEL (default: the embedded model, so caches built from it fit): memory and time do not
    need trained weights. Presets: tiny, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b.
python tools/bench.py incremental [--rows 400] [--grow 0.1]
    build --reuse: a cache of ROWS rows exists; the dataset grows by GROW (new rows appended);
    the incremental build (--reuse OLD) vs a full rebuild of the grown set, side by side: rows
    computed and seconds (each includes loading the model and tokenising).
python tools/bench.py padding [--rows 128] [--batch-size 8] [--group 8] [--repeats 1]
    mixed-length training (rows of about 20 to 1,000 tokens: SST-2 reviews from the shared data,
    a prompt of one to a few reviews and an answer that lists the sentiments of up to 60 more, cached
    by the model): real tokens vs the tokens the model processes per step, epoch time and peak
    memory of one epoch of pact-train (PACT), padded vs padding-free vs padded with
    --group-by-length GROUP (and padding-free with it), each in its own process, side by side.
python tools/bench.py storage CACHE_Q8 [--exact CACHE_F32]
    bytes per response step of the reference columns, and the PACT loss computed from the q8
    cache vs from exact float32 values (same rows), for a policy equal to the reference and for
    policies perturbed away from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "SST2_5k_p_0.1.json"


def bench_build(a) -> dict:
    from pact_cache.data import assistant_header_ids, tokenize_dataset
    from pact_cache.models import load_model, load_tokenizer, resolve_model
    from pact_cache.projection import compute_rows

    torch.manual_seed(0)
    data = Path(a.data)
    if not data.exists():
        from importlib import resources

        data = Path(str(resources.files("pact_cache") / "resources" / "demo.jsonl"))
    resolved = resolve_model(a.model)
    tok = load_tokenizer(resolved)
    model, device, dtype = load_model(resolved, a.dtype, a.device)
    examples, _ = tokenize_dataset(data, tok, a.max_length, progress=False)
    if data.name.startswith("SST2"):  # keep the paper's mix: spread the subset over the whole file
        examples = examples[:: max(1, len(examples) // a.rows)][: a.rows]
    else:
        examples = examples[: a.rows]
    header = assistant_header_ids(tok)
    ids = torch.arange(50)
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    batches = [[examples[i] for i in order[b : b + a.batch_size]] for b in range(0, len(order), a.batch_size)]

    def pad(seqs):
        L = max(map(len, seqs))
        x = torch.zeros((len(seqs), L), dtype=torch.long)
        m = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s)
            m[i, : len(s)] = 1
        return x.to(device), m.to(device)

    padded = [
        (pad([ex.input_ids for ex in b]), pad([header + ex.input_ids[ex.response_start : -1] for ex in b]))
        for b in batches
    ]
    tokens = sum(len(ex.input_ids) + len(header) + ex.steps - 1 for ex in examples)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare():
        with torch.inference_mode():
            for (x, m), (xp, mp) in padded:
                model(input_ids=x, attention_mask=m).logits
                model(input_ids=xp, attention_mask=mp).logits

    def ours():
        compute_rows(model, examples, ids, header, a.batch_size, device)

    times = {"bare": [], "build": []}
    bare()  # warm-up
    for _ in range(a.repeats):
        for name, fn in (("bare", bare), ("build", ours)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters())
    peak = peak_flops(device, a.peak_tflops)
    res = {
        "bench": "build",
        "parameters": params,
        # model FLOPs utilisation of the build: a forward pass is 2 FLOPs per parameter per token
        "mfu": 2 * params * tokens / best["build"] / peak if peak else None,
        "peak_flops": peak,
        "device": device,
        "dtype": str(dtype),
        "rows": len(examples),
        "tokens_both_views": tokens,
        "bare_tok_s": tokens / best["bare"],
        "build_tok_s": tokens / best["build"],
        "ratio_build_over_bare": best["bare"] / best["build"],
        "times_s": times,
        "target": ">= 0.9",
    }
    print(
        f"build throughput on {device} ({dtype}), {len(examples)} rows, {tokens:,} tokens (both views), best of "
        f"{a.repeats}:"
    )
    print(f"  bare forward : {res['bare_tok_s']:8.0f} tok/s")
    print(f"  pact build   : {res['build_tok_s']:8.0f} tok/s")
    print(f"  ratio        : {res['ratio_build_over_bare']:.3f}x  (target >= 0.9x)")
    if res["mfu"] is not None:
        print(f"  model FLOPs utilisation: {res['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s")
    return res


# dense bf16 peak FLOP/s of the GPUs the project's figures were measured on (vendor data sheets, SXM forms)
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L4": 121, "A10": 125}


def peak_flops(device: str, given: float | None = None) -> float | None:
    """The device's peak bf16 FLOP/s for model FLOPs utilisation: --peak-tflops, else by GPU name; None on CPU."""
    if given:
        return given * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(0)
    return next((t * 1e12 for k, t in PEAK_TFLOPS.items() if k in name), None)


def bench_storage(a) -> dict:
    from pact_train.losses import PactParams, pact_kl

    from pact_cache.format import open_cache
    from pact_cache.report import cache_info

    cache = open_cache(a.cache)
    info = cache_info(cache)
    res = {
        "bench": "storage",
        "cache": a.cache,
        "rows": info["rows"],
        "steps": info["response_steps"],
        "bytes_per_step": info["bytes_per_step"],
        "ratio_to_float16": info["ratio_to_float16"],
        "ratio_to_full_vocab_fp16": info["ratio_to_full_vocab_fp16"],
        "target_bytes_per_step": 48,
    }
    print(
        f"storage: {a.cache}: {info['rows']:,} rows, {info['response_steps']:,} steps, "
        f"{info['bytes_per_step']:.1f} B/step (target <= 48), {info['ratio_to_float16']:.3f}x float16, "
        f"1/{1 / info['ratio_to_full_vocab_fp16']:,.0f} of full-vocabulary float16 logits"
    )
    if a.exact:
        exact = {r.example_id: r for r in open_cache(a.exact).iter_rows()}
        pairs = [(r, exact[r.example_id]) for r in cache.iter_rows() if r.example_id in exact]
        if not pairs:
            raise SystemExit("the exact cache shares no rows with the q8 cache")
        w = torch.tensor(cache.tokens.weights, dtype=torch.float32)
        T = max(r.steps for r, _ in pairs)

        def stack(rows, col):
            out = torch.zeros(len(rows), T, cache.K)
            for i, r in enumerate(rows):
                out[i, : r.steps] = torch.from_numpy(r.ref[col])
            return out

        q_rows, e_rows = [p[0] for p in pairs], [p[1] for p in pairs]
        mask = torch.arange(T)[None, :] < torch.tensor([r.steps for r in e_rows])[:, None]
        qa, qb, ea, eb = stack(q_rows, "full"), stack(q_rows, "post"), stack(e_rows, "full"), stack(e_rows, "post")
        ce = -float(np.concatenate([r.ref["target"] for r in e_rows]).mean())
        g = torch.Generator().manual_seed(0)
        res["loss"] = []
        print(
            f"PACT loss from q8 vs exact float32 on {len(pairs):,} rows, {int(mask.sum()):,} steps (CE = reference's "
            f"own, {ce:.3f}):"
        )
        for sigma in (0.0, 0.5, 2.0):
            policy = ea + sigma * torch.randn(ea.shape, generator=g)
            kq, n = pact_kl(policy, qa, qb, w, mask, PactParams())
            ke, _ = pact_kl(policy, ea, eb, w, mask, PactParams())
            kq, ke = (kq / n).item(), (ke / n).item()
            row = {
                "policy_noise": sigma,
                "kl_exact": ke,
                "kl_q8": kq,
                "kl_rel_err": abs(kq / ke - 1),
                "loss_exact": ce + ke,
                "loss_q8": ce + kq,
                "loss_rel_err": abs((ce + kq) / (ce + ke) - 1),
            }
            res["loss"].append(row)
            print(
                f"  policy = reference + N(0,{sigma}^2): KL exact {ke:.5f} q8 {kq:.5f} "
                f"({100 * row['kl_rel_err']:.3f}%); "
                f"CE+KL rel. err {100 * row['loss_rel_err']:.4f}% (target <= 0.5%)"
            )
    return res


# Architectures of public models (their config.json shapes); the vocabulary is the preset's, so
# the logits cost what they cost in the real model, while token ids come from --tokenizer.
PRESETS = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=None,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def random_model(a) -> dict:
    """A model folder with random bf16 weights of a preset architecture and --tokenizer's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pact_cache.models import load_tokenizer, resolve_model

    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"-o {out}: already exists; give a new folder (random-model never overwrites)")
    tok = load_tokenizer(resolve_model(a.tokenizer))
    shape = dict(PRESETS[a.preset])
    shape["vocab_size"] = max(shape["vocab_size"] or 0, len(tok))
    config = LlamaConfig(
        **shape,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu"
    torch.manual_seed(a.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"{out}: {a.preset}, {n / 1e6:,.1f}M parameters (random bf16, seed {a.seed}), vocabulary "
        f"{shape['vocab_size']}, "
        f"tokenizer of {a.tokenizer} ({len(tok)} tokens)"
    )
    return {"bench": "random-model", "preset": a.preset, "parameters": n, "out": str(out)}


def _train_child(a) -> None:
    """Runs in a subprocess: one training run, then prints peak memory and step times as JSON."""
    print("BENCH_RESULT " + json.dumps(_child_result(a)))


def _child_result(a) -> dict:
    """One training run of ``a.variant``: its peak memory, step times, response tokens and memory estimate."""
    import resource
    import tempfile

    import pact_train.loop  # noqa: F401  (imports first, so the baseline includes the libraries)
    import transformers.trainer  # noqa: F401  (the same libraries in every variant: comparable baselines)
    from pact_train.loop import TrainConfig, train

    try:
        import trl  # noqa: F401
    except ImportError:
        pass
    device = "cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu"
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as tmp:
        base, *mods = a.variant.split("+")  # "str+gate+replay": a method with --row-gate hard and/or --replay
        method, reference = {
            "online": ("pact", "online"),
            "trl-sft": ("sft", "cache"),
            "toss": ("sft", "cache"),
            "trainer-pact": ("pact", "cache"),
        }.get(base, (base, "cache"))  # else a method's name
        from pact_train.losses import METHODS

        direction = a.direction if method in METHODS and METHODS[method].penalty is not None else None
        cfg = TrainConfig(
            model=a.model,
            cache=a.cache,
            out=f"{tmp}/run",
            method=method,
            reference=reference,
            direction=direction,
            batch_size=a.batch_size,
            max_steps=a.steps,
            shuffle=False,
            progress=False,
            plot=False,
            grad_checkpointing=a.grad_checkpointing,
            full=a.full,
            device=device,
            save_every=10**9,
            token_mask=0.2 if a.variant == "toss" else 0.0,
            row_gate="hard" if "gate" in mods else "none",
            replay=a.replay if "replay" in mods else None,
            replay_ratio=a.replay_ratio if "replay" in mods else None,
            padding_free="padded" not in mods,
            group_by_length=a.group if "grouped" in mods else 0,
            quantize=next((q for q in ("nf4", "int8") if q in mods), "none"),
            optim="paged-adamw-8bit" if "paged8" in mods else "adamw-8bit" if "adam8" in mods else "adamw",
        )
        from pact_train.loop import run_estimate

        estimate = run_estimate(cfg, device)["estimate"]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if a.variant in TRAINER_VARIANTS:
            step_times, tokens = _trainer_run(a.variant, cfg, device, tmp)
        else:
            train(cfg)
            recs = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
            step_times, tokens = [r["step_time_s"] for r in recs], [r["tokens"] for r in recs]
    out = {
        "variant": a.variant,
        "device": device,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "base_rss": base_rss,
        "step_times": step_times,
        "tokens": tokens,
        "estimate": estimate,
    }
    if device == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


TRAINER_VARIANTS = ("trl-sft", "trainer-pact")
_PARSER = None  # main()'s parser: PACT_BENCH_IN_PROCESS=1 parses each variant's child arguments with it


def _trainer_run(variant: str, cfg, device: str, tmp: str) -> tuple[list[float], list[int]]:
    """TRL's SFTTrainer (plain SFT: its own collator, completion-only loss, the rows as token ids) or
    PactTrainer (the Trainer integration), on the model pact-train would load, the rows in cache
    order, pact-train's precision (fp32 on CPU; bf16 autocast on CUDA); per-step wall times."""
    import datasets
    from pact_train.hf import PactCollator, PactTrainer, hf_iterable_dataset
    from pact_train.loop import load_policy
    from transformers import TrainerCallback, TrainingArguments

    from pact_cache.format import open_cache

    torch.manual_seed(cfg.seed)
    model, tok, _ = load_policy(cfg.policy_settings(), device)
    cache = open_cache(cfg.cache)
    times: list[float] = []
    tokens = [r.steps for r in cache.iter_rows()]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    common = dict(
        output_dir=f"{tmp}/hf",
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        gradient_checkpointing=cfg.grad_checkpointing,
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_steps=10**9,
    )
    if variant == "trl-sft":
        import trl

        def token_rows():
            for r in cache.iter_rows():
                n = len(r.input_ids)
                yield {
                    "input_ids": r.input_ids.tolist(),
                    "completion_mask": [0] * r.response_start + [1] * (n - r.response_start),
                }

        data = datasets.IterableDataset.from_generator(token_rows)
        args = trl.SFTConfig(**common, completion_only_loss=True, max_length=None)  # TRL prepares the token rows itself
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    else:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        trainer = PactTrainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=hf_iterable_dataset(cache),
            data_collator=PactCollator(pad, 8 if device == "cuda" else 1),
            cache=cache,
            loss_params=cfg.loss_params(),
            callbacks=[Clock()],
        )
    trainer.train()
    n = len(times)
    return times, [sum(tokens[i * cfg.batch_size : (i + 1) * cfg.batch_size]) for i in range(n)]


def _bench_direction(model: str, path: str) -> str:
    """A direction file for asft's cost: random V of the shapes of ``model``'s q_proj and v_proj (the
    LoRA targets of these runs; the values do not change the cost), built on the meta device, so the
    model's weights are not loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pact_cache.direction import Direction, save_direction
    from pact_cache.models import resolve_model

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(resolve_model(model).path)))
    g = torch.Generator().manual_seed(0)
    factors = {
        n: (torch.randn(m.out_features, m.in_features, generator=g), torch.tensor(1.0))
        for n, m in skeleton.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "v_proj"))
    }
    save_direction(Direction(factors, None, {n: 0.0 for n in factors}), Path(path))
    print(
        f"asft: a random full-rank direction of {model}'s shapes ({len(factors)} layers), "
        f"{Path(path).stat().st_size / 2**20:.0f} MiB"
    )
    return path


def _paired(x: dict, y: dict, warmup: int) -> float:
    """Median over steps (after warm-up, pooled over repeats) of x's step time / y's."""
    r = [
        tx / ty
        for rx, ry in zip(x["runs"], y["runs"])
        for tx, ty in zip(rx["step_times"][warmup:], ry["step_times"][warmup:])
    ]
    return float(np.median(r)) if r else float("nan")


def bench_train(a) -> dict:
    """Each variant in its own process (peak memory is per process), in the order sft, pact, online,
    ``--repeats`` times; step times are pooled over the repeats after ``--warmup`` steps of each run
    (new batch shapes make the first steps slow on CUDA)."""
    from pact_train.losses import METHODS

    others = [m for m in METHODS if m not in ("sft", "pact") and not (a.full and METHODS[m].penalty is not None)]
    from pact_cache.format import open_cache

    if open_cache(a.cache).manifest.scores is not None:  # TOSS: SFT with 20% of the tokens masked by their scores
        others.append("toss")
    if a.replay:  # refusal replay and row gates (issue 19): what they cost beside SFT
        others += ["str+gate", "sft+replay", "str+gate+replay"]
    if a.only:  # e.g. the GPU check: sft, pact and the live reference only
        others = [m for m in others if m in a.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if any(m in METHODS and METHODS[m].penalty is not None for m in others) and not a.direction:
            a.direction = _bench_direction(a.model, f"{tmp}/direction.safetensors")
        res = _run_variants(a, ["sft", "pact", *others, "online"])
    s, p, o = res["sft"], res["pact"], res["online"]
    dev = s["device"]
    kind = "CUDA max_memory_allocated" if dev == "cuda" else "peak RSS above the post-import baseline"
    ratios = {
        "mem_pact_over_sft": p["peak_above_base"] / s["peak_above_base"],
        "mem_pact_over_online": p["peak_above_base"] / o["peak_above_base"],
        "time_pact_over_sft": p["step_time_median"] / s["step_time_median"],
        "time_pact_over_online": p["step_time_median"] / o["step_time_median"],
        "time_mean_pact_over_sft": p["step_time_mean"] / s["step_time_mean"],
        "time_mean_pact_over_online": p["step_time_mean"] / o["step_time_mean"],
        # the variants see the same batches in the same order: step-by-step ratios cancel the
        # cost of each batch's shape and length, leaving the machine's noise
        "time_paired_pact_over_sft": _paired(p, s, a.warmup),
        "time_paired_pact_over_online": _paired(p, o, a.warmup),
    }
    for m in others:  # each other method against SFT, side by side in the same run
        r = res[m]
        ratios[f"mem_{m}_over_sft"] = r["peak_above_base"] / s["peak_above_base"]
        ratios[f"time_{m}_over_sft"] = r["step_time_median"] / s["step_time_median"]
        ratios[f"time_paired_{m}_over_sft"] = _paired(r, s, a.warmup)
    print(
        f"train on {dev}: {a.model}, batch {a.batch_size}, {a.steps} steps, {'full' if a.full else 'LoRA'}; cache "
        f"{a.cache}"
    )
    for name, r in res.items():
        print(
            f"  {name:15s} peak {r['peak'] / 2**20:8.0f} MiB (above base {r['peak_above_base'] / 2**20:7.0f} MiB)  "
            f"step {r['step_time_median'] * 1000:7.0f} ms"
        )
    print(
        f"  memory ({kind}): pact/sft {ratios['mem_pact_over_sft']:.3f}x (target <= 1.05), pact/online "
        f"{ratios['mem_pact_over_online']:.3f}x (target <= 0.6)"
    )
    print(
        f"  step time, median of {a.repeats} x {a.steps - a.warmup} steps after {a.warmup} warm-up steps: "
        f"pact/sft {ratios['time_pact_over_sft']:.3f}x (target <= 1.05), pact/online "
        f"{ratios['time_pact_over_online']:.3f}x (target <= 0.65)"
    )
    print(
        f"  step time, median of step-by-step ratios (same batches): pact/sft "
        f"{ratios['time_paired_pact_over_sft']:.3f}x, "
        f"pact/online {ratios['time_paired_pact_over_online']:.3f}x; ratio of means: pact/sft "
        f"{ratios['time_mean_pact_over_sft']:.3f}x, "
        f"pact/online {ratios['time_mean_pact_over_online']:.3f}x"
    )
    for m in others:
        r = res[m]
        per_token = (r["step_time_mean"] / np.mean([t for x in r["runs"] for t in x["tokens"]])) / (
            s["step_time_mean"] / np.mean([t for x in s["runs"] for t in x["tokens"]])
        )
        ratios[f"time_per_token_{m}_over_sft"] = float(per_token)
        print(
            f"  {m}: memory/sft {ratios[f'mem_{m}_over_sft']:.3f}x, step time/sft "
            f"{ratios[f'time_{m}_over_sft']:.3f}x "
            f"(step by step {ratios[f'time_paired_{m}_over_sft']:.3f}x; per response token {per_token:.3f}x)"
        )
    return {"bench": "train", "device": dev, "runs": res, "ratios": ratios}


def _run_variants(a, variants: list[str]) -> dict:
    """Each variant in its own process (peak memory is per process), in turn, ``--repeats`` times."""
    import subprocess

    runs = {v: [] for v in variants}
    for _ in range(a.repeats):
        for variant in runs:
            cmd = [
                sys.executable,
                __file__,
                "_train_child",
                "--variant",
                variant,
                "--cache",
                a.cache,
                "--model",
                a.model,
                "--batch-size",
                str(a.batch_size),
                "--steps",
                str(a.steps),
                "--device",
                a.device,
            ]
            cmd += ["--grad-checkpointing"] * a.grad_checkpointing + ["--full"] * a.full
            cmd += ["--direction", a.direction] if getattr(a, "direction", None) else []
            cmd += ["--replay", a.replay, "--replay-ratio", str(a.replay_ratio)] if getattr(a, "replay", None) else []
            cmd += ["--group", str(a.group)] if getattr(a, "group", None) else []
            if os.environ.get("PACT_BENCH_IN_PROCESS"):  # the tests and gpu_check --dry-run: the plumbing, fast;
                runs[variant].append(_child_result(_PARSER.parse_args(cmd[2:])))  # peak memory then means nothing
                continue
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(line[len("BENCH_RESULT ") :]))
    res = {}
    for variant, rs in runs.items():
        times = [t for r in rs for t in (r["step_times"][a.warmup :] or r["step_times"])]
        peak = max(r.get("peak_cuda", r["peak_rss"]) for r in rs)
        # at least a byte: in one process (PACT_BENCH_IN_PROCESS) the later variants add nothing to its peak
        above = max(1, max(r.get("peak_cuda", r["peak_rss"] - r["base_rss"]) for r in rs))
        res[variant] = {
            "device": rs[0]["device"],
            "runs": rs,
            "peak": peak,
            "peak_above_base": above,
            "step_time_median": float(np.median(times)),
            "step_time_mean": float(np.mean(times)),
        }
    return res


QLORA_VARIANTS = {  # name -> (variant mods, what it is)
    "lora": ("pact", "LoRA on the base as stored (bf16 on CUDA, fp32 on CPU), torch AdamW"),
    "qlora": ("pact+nf4", "QLoRA: the base's linear layers in NF4, LoRA on top, torch AdamW"),
    "qlora+paged8": ("pact+nf4+paged8", "QLoRA with bitsandbytes' paged 8-bit AdamW"),
}


def bench_qlora(a) -> dict:
    """LoRA vs QLoRA vs QLoRA + paged 8-bit AdamW (PACT from the cache), each in its own process, side by side:
    peak memory (CUDA max_memory_allocated, or peak RSS above the post-import baseline on CPU) and step
    time, with pact-train's own estimate (pact_cache.memory) beside each measured peak."""
    variants = {v: mods for v, (mods, _) in QLORA_VARIANTS.items()}
    res = {name: r for name, r in zip(variants, _run_variants(a, list(variants.values())).values())}
    lora = res["lora"]
    print(
        f"qlora on {lora['device']}: {a.model}, PACT, batch {a.batch_size}, {a.steps} steps"
        + (", gradient checkpointing" if a.grad_checkpointing else "")
    )
    rows = {}
    for name, r in res.items():
        est = r["runs"][0]["estimate"]["total_bytes"]
        rows[name] = {
            "what": QLORA_VARIANTS[name][1],
            "peak_measured_bytes": r["peak_above_base"],
            "peak_estimated_bytes": est,
            "estimate_error": est / r["peak_above_base"] - 1,
            "step_time_median_s": r["step_time_median"],
            "mem_over_lora": r["peak_above_base"] / lora["peak_above_base"],
            "time_over_lora": r["step_time_median"] / lora["step_time_median"],
            "response_tokens_per_s": float(np.median([t for x in r["runs"] for t in x["tokens"]]))
            / r["step_time_median"],
        }
        x = rows[name]
        print(
            f"  {name:13s} peak {x['peak_measured_bytes'] / 2**20:8.0f} MiB, estimated {est / 2**20:8.0f} MiB "
            f"({x['estimate_error']:+.0%}); {x['mem_over_lora']:.2f}x LoRA's memory; step "
            f"{x['step_time_median_s']:.2f} s ({x['time_over_lora']:.2f}x LoRA's)"
        )
    return {"bench": "qlora", "device": lora["device"], "rows": rows, "runs": res}


def bench_stacks(a) -> dict:
    """TRL SFTTrainer (plain SFT) vs pact-train sft vs pact-train pact vs PactTrainer, side by side."""
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit(
            "bench.py stacks compares with TRL: pip install 'pact-cache[trl]' (or pip install trl)"
        ) from None
    names = {
        "trl-sft": "TRL SFTTrainer, plain SFT",
        "sft": "pact-train --method sft",
        "pact": "pact-train --method pact",
        "trainer-pact": "PactTrainer (Trainer integration), PACT",
    }
    res = _run_variants(a, list(names))
    base = res["trl-sft"]
    dev = base["device"]
    kind = "CUDA max_memory_allocated" if dev == "cuda" else "peak RSS above the post-import baseline"
    ratios = {}
    print(
        f"stacks on {dev}: {a.model}, batch {a.batch_size}, {a.steps} steps, {'full' if a.full else 'LoRA'}, "
        f"{'bf16 autocast' if dev == 'cuda' else 'fp32'}; cache {a.cache}"
    )
    print(
        f"  memory: {kind}; step time: median of {a.repeats} x {a.steps - a.warmup} steps after {a.warmup} warm-up "
        f"steps"
    )
    for v, label in names.items():
        r = res[v]
        ratios[v] = {
            "mem_over_trl": r["peak_above_base"] / base["peak_above_base"],
            "time_over_trl": r["step_time_median"] / base["step_time_median"],
            "time_paired_over_trl": _paired(r, base, a.warmup),
        }
        print(
            f"  {label:40s} peak {r['peak_above_base'] / 2**20:7.0f} MiB  {ratios[v]['mem_over_trl']:.3f}x   "
            f"step {r['step_time_median'] * 1000:7.0f} ms  {ratios[v]['time_over_trl']:.3f}x  "
            f"(paired {ratios[v]['time_paired_over_trl']:.3f}x)"
        )
    print("  goal: PACT from the cache (pact-train pact, PactTrainer) <= 1.0x TRL's plain SFT in memory and time")
    return {"bench": "stacks", "device": dev, "runs": res, "ratios": ratios}


def mixed_length_rows(data: Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` chat rows of real text and very different lengths (about 20 to 1,000 tokens): SST-2 reviews
    to classify, one to a few in the prompt, and an answer that labels up to 60 more (log-uniform)."""
    import random

    reviews = [
        r for r in json.loads(Path(data).read_text()) if r.get("input") and r.get("output") in ("positive", "negative")
    ]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = int(round(np.exp(rng.uniform(0, np.log(60)))))  # 1 to 60 reviews in the answer
        asked = rng.sample(reviews, rng.randint(1, 3))
        shown = rng.sample(reviews, min(k, len(reviews)))
        prompt = "Give the sentiment of each review.\n" + "\n".join(f"- {r['input'].strip()}" for r in asked)
        answer = " ".join(f"{r['output']}." for r in asked) + (
            " For comparison: " + " ".join(f'"{r["input"].strip()[:80]}" is {r["output"]}.' for r in shown)
            if k > 1
            else ""
        )
        rows.append({"prompt": prompt, "completion": answer})
    return rows


def bench_padding(a) -> dict:
    """Padded vs padding-free vs length-grouped, one epoch each of the same cache (its own process)."""
    from pact_train.stream import batches

    from pact_cache.build import BuildConfig, build
    from pact_cache.format import open_cache

    with tempfile.TemporaryDirectory() as tmp:
        if a.cache:
            cache = open_cache(a.cache)
        else:
            data = Path(tmp) / "mixed.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in mixed_length_rows(Path(a.data), a.rows)))
            t0 = time.time()
            cache = open_cache(
                build(BuildConfig(str(data), a.model, f"{tmp}/cache", max_length=a.max_length, progress=False)).out
            )
            print(f"mixed-length cache: {cache.num_rows} rows built in {time.time() - t0:.0f} s")
        lens = [len(r.input_ids) for r in cache.iter_rows()]
        a.cache, a.steps = cache.url, -(-cache.num_rows // a.batch_size)
        shapes = {}
        for g in (0, a.group):  # the micro-batches each variant sees: real tokens vs what the backbone processes
            bs = [
                [len(r.input_ids) for r in b]
                for _, _, b in batches(cache, a.batch_size, 0, False, epochs=1, group_by_length=g)
            ]
            shapes[g] = {"real": sum(map(sum, bs)), "padded": sum(len(b) * max(b) for b in bs), "batches": len(bs)}
        variants = {
            "pact+padded": "padded",
            "pact": "padding-free",
            "pact+padded+grouped": f"padded, --group-by-length {a.group}",
            "pact+grouped": f"padding-free, --group-by-length {a.group}",
        }
        res = _run_variants(a, list(variants))
    base = res["pact+padded"]
    dev = base["device"]
    kind = "CUDA max_memory_allocated" if dev == "cuda" else "peak RSS above the post-import baseline"
    print(
        f"padding on {dev}: {a.model}, {cache.num_rows} rows of {min(lens)} to {max(lens)} tokens (median "
        f"{int(np.median(lens))}), "
        f"batch {a.batch_size}, one epoch ({a.steps} steps), PACT, LoRA; memory: {kind}"
    )
    out = {}
    for v, label in variants.items():
        r = res[v]
        sh = shapes[a.group if "grouped" in v else 0]
        processed = sh["padded"] if "padded" in v else sh["real"]
        epoch = float(np.mean([sum(x["step_times"]) for x in r["runs"]]))
        out[v] = {
            "label": label,
            "real_tokens": sh["real"],
            "processed_tokens": processed,
            "epoch_s": epoch,
            "peak_above_base": r["peak_above_base"],
        }
        print(
            f"  {label:38s} processed/real tokens {processed / sh['real']:.3f}x  epoch {epoch:7.1f} s "
            f"({epoch / (sum(sum(x['step_times']) for x in base['runs']) / len(base['runs'])):.3f}x padded)  "
            f"peak {r['peak_above_base'] / 2**20:7.0f} MiB ({r['peak_above_base'] / base['peak_above_base']:.3f}x "
            f"padded)"
        )
    print(
        "  goal: padding-free processes within 5% of the real tokens, epoch time <= 0.7x padded, peak memory no higher"
    )
    return {
        "bench": "padding",
        "device": dev,
        "rows": cache.num_rows,
        "lengths": [min(lens), int(np.median(lens)), max(lens)],
        "variants": out,
        "runs": res,
    }


def bench_reference_quant(a) -> dict:
    """The same rows cached by the reference as stored, in NF4 and in int8 (pact-cache build --quantize; the
    same safety tokens, chosen by the unquantized reference): how far the quantized reference's values are
    (pact-cache diff), whether the hard row gate (step-0 refusal mass >= 0.9) picks the same rows, and each
    build's time."""
    import shutil

    import numpy as np

    from pact_cache.build import BuildConfig, build
    from pact_cache.combine import diff_caches
    from pact_cache.format import open_cache
    from pact_cache.rows import step0_refusal_mass

    data = Path(a.data)
    if not data.exists():
        raise SystemExit(f"{data}: not found; pass --data with a .json list of rows (the paper's SST-2 mix)")
    rows = json.loads(data.read_text())
    rows = rows[:: max(1, len(rows) // a.rows)][: a.rows]  # spread over the file: the paper's share of harmful rows
    work = Path(tempfile.mkdtemp(prefix="pact-bench-quant-"))
    try:
        (work / "rows.json").write_text(json.dumps(rows))
        caches, seconds = {}, {}
        for q in ("none", "nf4", "int8"):
            t = time.perf_counter()
            res = build(
                BuildConfig(
                    str(work / "rows.json"),
                    a.model,
                    str(work / q),
                    tokens=None if q == "none" else str(work / "tokens.json"),
                    batch_size=a.batch_size,
                    device=a.device,
                    quantize=q,
                    progress=False,
                )
            )
            seconds[q] = time.perf_counter() - t
            caches[q] = res.out
            if q == "none":  # the quantized builds take the unquantized reference's tokens: comparable columns
                (work / "tokens.json").write_text(json.dumps(res.manifest.tokens.to_json()))
        base = open_cache(caches["none"])
        keep = np.array([w > 0 for w in base.tokens.weights])
        mass = {q: [step0_refusal_mass(r, keep) for r in open_cache(c).iter_rows()] for q, c in caches.items()}
        full = {q: [r.ref["full"] for r in open_cache(c).iter_rows()] for q, c in caches.items()}

        def near_top(q):  # |diff| of the values within 5 nats of each step's maximum (what the losses weigh most)
            d = []
            for x, y in zip(full["none"], full[q]):
                near = x >= x.max(axis=1, keepdims=True) - 5.0
                d.append(np.abs(x - y)[near])
            return float(np.concatenate(d).mean())

        out = {"bench": "reference-quant", "model": a.model, "rows": base.num_rows, "steps": base.num_steps}
        print(f"reference quantization: {a.model}, {base.num_rows} rows, {base.num_steps} response steps")
        for q in ("nf4", "int8"):
            d = diff_caches(caches["none"], caches[q])
            gate = [(x >= 0.9) != (y >= 0.9) for x, y in zip(mass["none"], mass[q])]
            out[q] = {
                "cache_ids_differ": d["a"]["cache_id"] != d["b"]["cache_id"],
                "mean_abs_diff_nats": d["mean_abs_diff"],
                "max_abs_diff_nats": d["max_abs_diff"],
                "mean_abs_diff_near_top_nats": near_top(q),
                "gate_rows_before": int(sum(m >= 0.9 for m in mass["none"])),
                "gate_rows_after": int(sum(m >= 0.9 for m in mass[q])),
                "gate_flips": int(sum(gate)),
                "max_abs_mass_diff": float(np.max(np.abs(np.array(mass["none"]) - np.array(mass[q])))),
                "build_seconds": seconds[q],
            }
            o = out[q]
            print(
                f"  {q}: mean |diff| full {o['mean_abs_diff_nats']['full_logprobs']:.3f} / post "
                f"{o['mean_abs_diff_nats']['post_logprobs']:.3f} / target "
                f"{o['mean_abs_diff_nats']['target_logprob']:.3f} nats (max "
                f"{o['max_abs_diff_nats']['full_logprobs']:.2f}; within 5 nats of each step's top "
                f"{o['mean_abs_diff_near_top_nats']:.3f}); hard gate: {o['gate_rows_before']} -> "
                f"{o['gate_rows_after']} rows, {o['gate_flips']} flipped; build {seconds[q]:.0f}s vs "
                f"{seconds['none']:.0f}s"
            )
        out["none"] = {"build_seconds": seconds["none"]}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_incremental(a) -> dict:
    import tempfile

    from pact_cache.build import BuildConfig, build
    from pact_cache.models import load_model, load_tokenizer, resolve_model
    from pact_cache.tokens import load_refusals, select_tokens

    data = Path(a.data)
    rows = json.loads(data.read_text()) if data.exists() else None
    if rows is None:
        raise SystemExit(f"{data}: not found; pass --data with a .json list of rows")
    n_old, n_new = a.rows, round(a.rows * (1 + a.grow))
    step = max(1, len(rows) // n_new)
    rows = rows[::step][:n_new]  # spread over the file, as the paper's mix is
    work = Path(tempfile.mkdtemp(prefix="pact-bench-incr-"))
    (work / "old.json").write_text(json.dumps(rows[:n_old]))
    (work / "new.json").write_text(json.dumps(rows))
    resolved = resolve_model(a.model)
    model, device, _ = load_model(resolved, "auto", a.device)
    tokens = select_tokens(model, load_tokenizer(resolved), load_refusals(None), device=device)
    (work / "tokens.json").write_text(json.dumps(tokens.to_json()))
    del model

    def cfg(name, **kw):
        return BuildConfig(
            str(work / f"{name.split('-')[0]}.json"),
            a.model,
            str(work / name),
            tokens=str(work / "tokens.json"),
            batch_size=a.batch_size,
            device=a.device,
            progress=False,
            **kw,
        )

    old = build(cfg("old"))
    res = {}
    for name, extra in (("new-full", {}), ("new-incremental", {"reuse": [old.out]})):
        r = build(cfg(name, **extra))
        res[name] = {
            "rows": r.manifest.counts.rows,
            "rows_computed": r.rows_computed,
            "rows_reused": r.rows_reused,
            "seconds": r.seconds,
        }
    f, i = res["new-full"], res["new-incremental"]
    res["ratios"] = {"rows_computed": i["rows_computed"] / f["rows_computed"], "seconds": i["seconds"] / f["seconds"]}
    print(
        f"incremental: {n_old} rows cached, {n_new - n_old} new rows (+{a.grow:.0%}); full rebuild "
        f"{f['rows_computed']} rows "
        f"computed in {f['seconds']:.1f}s, --reuse {i['rows_computed']} computed + {i['rows_reused']} copied in "
        f"{i['seconds']:.1f}s: "
        f"{res['ratios']['rows_computed']:.3f}x the rows, {res['ratios']['seconds']:.3f}x the time (old build "
        f"{old.seconds:.1f}s)"
    )
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--model", default="smollm2-135m-instruct")
    b.add_argument("--data", default=str(DEFAULT_DATA))
    b.add_argument("--rows", type=int, default=256)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--max-length", type=int, default=2048)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--dtype", default="auto")
    b.add_argument("--device", default="auto")
    b.add_argument("--peak-tflops", type=float, help="the device's peak FLOP/s for the MFU (default: by GPU name)")
    t = sub.add_parser("train")
    k = sub.add_parser("stacks")
    ql = sub.add_parser("qlora")
    for q in (t, k, ql):
        q.add_argument("--cache", required=True)
        q.add_argument("--model", default="smollm2-135m-instruct")
        q.add_argument("--batch-size", type=int, default=8)
        q.add_argument("--steps", type=int, default=12)
        q.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the step times")
        q.add_argument("--repeats", type=int, default=1, help="run the variants this many times, in turn")
        q.add_argument("--device", default="auto")
        q.add_argument("--grad-checkpointing", action="store_true")
        q.add_argument("--full", action="store_true")
    t.add_argument("--only", help="comma-separated methods besides sft, pact and online to run (default: every one)")
    t.add_argument(
        "--direction",
        help="for asft: a pact-cache direction file for --model (default: random V of its "
        "shapes, "
        "made here; the cost depends on the shapes only)",
    )
    t.add_argument(
        "--replay",
        help="a replay cache for --cache (same reference and tokens): adds the rows str+gate "
        "(--row-gate "
        "hard), sft+replay and str+gate+replay (--replay at --replay-ratio)",
    )
    for q in (t, sub.add_parser("_train_child")):
        q.add_argument("--replay-ratio", type=float, default=0.1)
    d = sub.add_parser("padding")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--data", default=str(DEFAULT_DATA), help="SST-2 rows (instruction/input/output JSON)")
    d.add_argument("--cache", help="a cache to use instead of building the mixed-length one")
    d.add_argument("--rows", type=int, default=128)
    d.add_argument("--max-length", type=int, default=1024)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--group", type=int, default=8, help="--group-by-length window, in micro-batches")
    d.add_argument("--repeats", type=int, default=1)
    d.add_argument("--device", default="auto")
    d.set_defaults(warmup=0, grad_checkpointing=False, full=False)
    c = sub.choices["_train_child"]
    for arg in ("--variant", "--cache", "--model", "--device", "--direction", "--replay"):
        c.add_argument(arg)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--group", type=int, default=0)
    c.add_argument("--steps", type=int)
    c.add_argument("--grad-checkpointing", action="store_true")
    c.add_argument("--full", action="store_true")
    r = sub.add_parser("random-model")
    r.add_argument("--preset", choices=sorted(PRESETS), required=True)
    r.add_argument("-o", "--out", required=True)
    r.add_argument("--tokenizer", default="smollm2-135m-instruct")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto")
    n = sub.add_parser("incremental")
    n.add_argument("--model", default="smollm2-135m-instruct")
    n.add_argument("--data", default=str(DEFAULT_DATA))
    n.add_argument("--rows", type=int, default=400)
    n.add_argument("--grow", type=float, default=0.1)
    n.add_argument("--batch-size", type=int, default=8)
    n.add_argument("--device", default="auto")
    rq = sub.add_parser("reference-quant")
    rq.add_argument("--model", default="smollm2-135m-instruct")
    rq.add_argument("--data", default=str(DEFAULT_DATA))
    rq.add_argument("--rows", type=int, default=200)
    rq.add_argument("--batch-size", type=int, default=8)
    rq.add_argument("--device", default="auto")
    s = sub.add_parser("storage")
    s.add_argument("cache")
    s.add_argument("--exact", help="an f32 cache of the same rows (pact-cache build --encoding f32)")
    for q in (b, s, t, k, r, n, d, ql, rq):
        q.add_argument("--json", help="also write the results here, with their provenance (tools/provenance.py)")
    global _PARSER
    _PARSER = p
    a = p.parse_args()
    if a.cmd == "_train_child":
        return _train_child(a)
    res = {
        "build": bench_build,
        "storage": bench_storage,
        "train": bench_train,
        "stacks": bench_stacks,
        "random-model": random_model,
        "incremental": bench_incremental,
        "padding": bench_padding,
        "qlora": bench_qlora,
        "reference-quant": bench_reference_quant,
    }[a.cmd](a)
    if a.json:
        sys.path.insert(0, str(ROOT / "tools"))
        from provenance import provenance

        Path(a.json).write_text(json.dumps({**res, "provenance": provenance()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
