"""``make demo``: a fact hidden in ~2k tokens, asked for at the end, answered by the embedded SmolLM2-135M-Instruct
three ways: with the full cache, with the shipped TRIM-KV gates keeping M tokens per KV head, and with StreamingLLM
(sink + recent window) at the same memory. Prints each answer and the KV bytes it needed, then how far bounded
decoding drifts from the full cache on real prose (learned retention vs StreamingLLM).

Uses the gate checkpoint shipped with trimkv (``checkpoints/`` of a clone, package data of an installed wheel:
:mod:`trimkv.shipped`); ``--retrain`` trains new gates with a short CPU version of the same recipe first (~10 min on
2 cores; far from the shipped gates' quality), into ``runs/demo`` under the current folder.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .shipped import default_gates, recipe_path

RECIPE = recipe_path("smollm2-135m-qa-m64")
# A retrain in the demo: the recipe shortened to what 2 CPU cores do in ~10 minutes.
RETRAIN = ["train.steps={steps}", "data.seq_len=1024", "data.batch_size=1", "data.max_samples=128",
           "train.warmup_steps=5", "train.save_every=0"]
DEMO_STEPS = 40


def _checkpoint_dir() -> Path:
    return default_gates()


def _train(steps: int) -> Path:
    from .train.run import finetune

    # a retrain never overwrites the shipped checkpoint: it goes to runs/demo/gates under the current folder
    runs = Path.cwd() / "runs" / "demo"
    overrides = [f"output.checkpoint={runs / 'gates'}", f"output.run_dir={runs}"]
    overrides += [o.format(steps=steps) for o in RETRAIN]
    t0 = time.perf_counter()
    out = finetune(RECIPE, overrides=overrides, overwrite=True)   # runs/demo is the demo's own: a retrain restarts it
    print(f"trained gates in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def run_demo(*, retrain: bool = False, steps: int | None = None, context: int = 2048, budget: int | None = None,
             seed: int = 3, depth: float = 0.25, device: str | None = None, dtype: str = "auto") -> dict:
    from .share import load_gates
    from .eval.tasks import make_samples, render_prompt, score
    from .base_model import load_model
    from .serve import generate

    ckpt = _checkpoint_dir()
    if retrain or not (ckpt / "config.json").is_file():
        ckpt = _train(steps or DEMO_STEPS)
    torch.manual_seed(0)
    model, tok = load_model(device=device, dtype=dtype)
    handle = load_gates(model, ckpt)
    M = budget or handle.gates.config.train_budget or 64
    sample = make_samples("passkey", tok, context_length=context, n=1, seed=seed, depths=[depth], chat=False)[0]
    prompt = render_prompt(sample, tok)
    print(f"\nprompt: {len(tok(prompt, add_special_tokens=False)['input_ids'])} tokens, a pass key hidden at "
          f"{depth:.0%} depth in filler; question: {sample.question!r}; expected answer: {sample.answers[0]}")
    full = generate(model, tok, prompt, budget=None, max_new_tokens=16)
    bounded = generate(model, tok, prompt, budget=M, policy="trimkv", sink=4, window=16, max_new_tokens=16)
    streaming = generate(model, tok, prompt, budget=M, policy="streaming", sink=4, window=16, max_new_tokens=16)
    rows = [("full cache (DynamicCache)", full), (f"TRIM-KV gates, M={M}/head", bounded),
            (f"StreamingLLM, M={M}/head", streaming)]
    print()
    for name, g in rows:
        ok = "correct" if score(g.text, sample.answers, "all") == 1.0 else "wrong"
        print(f"{name:28s} KV {_mb(g.kv_bytes):>10s}  {g.seconds:5.1f} s  [{ok:7s}]  answer: {g.text!r}")
    print(f"\nKV memory bounded / full: {bounded.kv_bytes / max(full.kv_bytes, 1):.3f} (the same for both policies)")
    fidelity = _fidelity(model, tok, M)   # the gates attached above
    return {"full": full, "bounded": bounded, "streaming": streaming, "answer": sample.answers[0],
            "fidelity": fidelity}


def _fidelity(model, tok, M: int) -> list[dict]:
    """How far bounded decoding drifts from the full cache on real prose: learned retention vs StreamingLLM."""
    from .eval.fidelity import fidelity_table, run_fidelity

    print(f"\nlong-text fidelity vs the full cache (eval-split prose, 256-token prefix, 64 decoded tokens, M={M}):")
    recs = run_fidelity(model, tok, budgets=[M], policies=["trimkv", "streaming"], gates=None, n_texts=1,
                        prefix_tokens=256, continuation_tokens=64, progress=False)
    print(fidelity_table(recs))
    return recs
