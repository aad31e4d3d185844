"""``make demo``: gates on the embedded SmolLM2-135M-Instruct, then one long-prompt question answered with the full
cache and with the memory-bounded cache, printing both answers and both KV sizes.

Uses the gate checkpoint shipped under ``checkpoints/`` when present (quick); ``--retrain`` trains new gates with
the demo recipe first (a few minutes on 2 CPU cores).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m-prose-m64.yaml"
DEMO_STEPS = 40   # a retrain in the demo is a short version of the recipe (~5 min on 2 cores); the shipped gates ran it all


def _checkpoint_dir() -> Path:
    from .recipe import load_recipe

    ckpt = load_recipe(RECIPE).checkpoint_dir()
    return ckpt if ckpt.is_absolute() else REPO / ckpt


def _train(steps: int | None) -> Path:
    from .train.run import finetune

    # a retrain never overwrites the shipped checkpoint: it goes to runs/demo/gates
    overrides = [f"output.checkpoint={REPO / 'runs' / 'demo' / 'gates'}", f"output.run_dir={REPO / 'runs' / 'demo'}"]
    if steps:
        overrides.append(f"train.steps={steps}")
    t0 = time.perf_counter()
    out = finetune(RECIPE, overrides=overrides)
    print(f"trained gates in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def run_demo(*, retrain: bool = False, steps: int | None = None, context: int = 2048, budget: int | None = None,
             seed: int = 3, depth: float = 0.25) -> dict:
    from .checkpoint import load_gates
    from .eval.tasks import make_samples, render_prompt, score
    from .generate import generate
    from .models import load_model

    ckpt = _checkpoint_dir()
    if retrain or not (ckpt / "config.json").is_file():
        ckpt = _train(steps or DEMO_STEPS)
    torch.manual_seed(0)
    model, tok = load_model()
    handle = load_gates(model, ckpt)
    M = budget or handle.gates.config.train_budget or 64
    sample = make_samples("passkey", tok, context_length=context, n=1, seed=seed, depths=[depth], chat=False)[0]
    prompt = render_prompt(sample, tok)
    print(f"\nprompt: {len(tok(prompt, add_special_tokens=False)['input_ids'])} tokens, a pass key hidden at "
          f"{depth:.0%} depth "
          f"in filler; question: {sample.question!r}; expected answer: {sample.answers[0]}")
    with handle.disabled():
        full = generate(model, tok, prompt, budget=None, max_new_tokens=24)
    bounded = generate(model, tok, prompt, budget=M, sink=4, window=16, max_new_tokens=24)
    rows = [("full cache (DynamicCache)", full), (f"TRIM-KV bounded cache, M={M}/head", bounded)]
    print()
    for name, g in rows:
        ok = "correct" if score(g.text, sample.answers, "all") == 1.0 else "wrong"
        print(f"{name:36s} KV {_mb(g.kv_bytes):>10s}  {g.seconds:5.1f} s  [{ok}]  answer: {g.text!r}")
    print(f"\nKV memory ratio bounded/full: {bounded.kv_bytes / max(full.kv_bytes, 1):.3f}")
    fidelity = _fidelity(model, tok, M)   # the gates attached above
    return {"full": full, "bounded": bounded, "answer": sample.answers[0], "fidelity": fidelity}


def _fidelity(model, tok, M: int) -> list[dict]:
    """How far bounded decoding drifts from the full cache on real prose: learned retention vs StreamingLLM."""
    from .eval.fidelity import fidelity_table, run_fidelity

    print(f"\nlong-text fidelity vs the full cache (eval-split prose, 256-token prefix, 64 decoded tokens, M={M}):")
    recs = run_fidelity(model, tok, budgets=[M], policies=["trimkv", "streaming"], gates=None, n_texts=1,
                        prefix_tokens=256, continuation_tokens=64, progress=False)
    print(fidelity_table(recs))
    return recs
