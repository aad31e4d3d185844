"""``make demo``: a pass key hidden in ~2k tokens of filler at several depths, asked for at the end, answered by the
embedded SmolLM2-135M-Instruct with the full cache, with the shipped TRIM-KV gates keeping M tokens per KV head
(uniform, in one pool shared by all heads, and split over the heads by the shipped LU-KV allocation in the same
allocated memory), and with StreamingLLM (sink + recent window) at the same memory. Prints every answer, then the
rate per method and the KV bytes it needed, then how far bounded decoding drifts from the full cache on real prose
(learned retention vs StreamingLLM).

Uses the gate checkpoint shipped with trimkv (``checkpoints/`` of a clone, package data of an installed wheel:
:mod:`trimkv.shipped`: distilled gates in layers 0-14, trace-fitted ones above); ``--retrain`` first trains new gates
with a short CPU version of the distillation recipe the lower layers come from (~10 min on 2 cores; far from the
shipped gates' quality), into ``runs/demo`` under the current folder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .shipped import default_allocation, default_gates, recipe_path

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


DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)       # where the pass key sits in the haystack, one prompt each


@dataclass
class Method:
    """One way of answering: a name, and the cache it answers with (no policy: the full cache)."""

    name: str
    policy: str | None = None             # None: the full cache
    budget: int | None = None             # mean tokens per KV head
    head_budgets: str | Path | None = None


def demo_methods(budget: int, allocation: Path | None, *, sink: int = 4, window: int = 16) -> list[Method]:
    """Full cache; the gates at ``budget`` tokens per KV head, in one pool of the same size for all heads
    (DBTrimKV's cache), and split over the heads by the shipped LU-KV allocation when there is one (at the mean
    budget that allocates no more memory); StreamingLLM at the same memory."""
    methods = [Method("full cache (DynamicCache)"), Method(f"TRIM-KV gates, M={budget}/head", "trimkv", budget),
               Method(f"TRIM-KV gates, one pool of M={budget}", "trimkv-global", budget)]
    if allocation is not None:
        from .serve.budgets import load_allocation

        matched = load_allocation(allocation).matched_budget("trimkv", budget, sink + window + 1)
        methods.append(Method(f"TRIM-KV + LU-KV heads, mean M={matched}", "trimkv", matched, allocation))
    return methods + [Method(f"StreamingLLM, M={budget}/head", "streaming", budget)]


def ask_at_depths(model, tok, methods: list[Method], *, context: int, depths=DEPTHS, seed: int = 3, sink: int = 4,
                  window: int = 16, max_new_tokens: int = 16, show=print) -> dict[str, list[dict]]:
    """The passkey task at each depth of ``depths`` (one prompt each, its own key), answered by every method:
    {method name: [{"depth", "answer", "text", "correct", "kv_bytes", "seconds"}, ...]}. ``show`` prints a line per
    answer as it comes."""
    from .eval.harness import policy_cache
    from .eval.tasks import make_samples, render_prompt, score
    from .serve import FULL, generate

    samples = make_samples("passkey", tok, context_length=context, n=len(depths), seed=seed, depths=list(depths),
                           chat=False)
    out: dict[str, list[dict]] = {m.name: [] for m in methods}
    for depth, sample in zip(depths, samples):
        prompt = render_prompt(sample, tok)
        for m in methods:
            cache = policy_cache(model, m.policy or FULL, m.budget, sink=sink, window=window,
                                 head_budgets=m.head_budgets)          # the eval harness's caches
            g = generate(model, tok, prompt, cache=cache, max_new_tokens=max_new_tokens)
            ok = score(g.text, sample.answers, "all") == 1.0
            out[m.name].append(dict(depth=depth, answer=sample.answers[0], text=g.text, correct=ok,
                                    kv_bytes=g.kv_bytes, seconds=g.seconds))
            show(f"  depth {depth:4.0%}  {m.name:34s} [{'correct' if ok else 'wrong':7s}]  {g.text.strip()[:40]!r}")
    return out


def rate_table(results: dict[str, list[dict]]) -> str:
    """One line per method: a mark per depth, the rate, the KV bytes at the end and the mean seconds a prompt."""
    first = next(iter(results.values()))
    head = f"{'method':34s} " + " ".join(f"{r['depth']:>4.0%}" for r in first) + "   rate     KV bytes   s/prompt"
    lines = [head, "-" * len(head)]
    for name, rows in results.items():
        marks = " ".join(f"{'ok' if r['correct'] else '--':>4s}" for r in rows)
        rate = sum(r["correct"] for r in rows) / len(rows)
        kv = max(r["kv_bytes"] for r in rows)
        secs = sum(r["seconds"] for r in rows) / len(rows)
        lines.append(f"{name:34s} {marks}   {rate:4.0%}   {_mb(kv):>10s}   {secs:6.1f}")
    return "\n".join(lines)


def run_demo(*, retrain: bool = False, steps: int | None = None, context: int = 2048, budget: int | None = None,
             seed: int = 3, depths=DEPTHS, device: str | None = None, dtype: str = "auto") -> dict:
    from .share import load_gates
    from .base_model import load_model

    ckpt = _checkpoint_dir()
    trained_here = retrain or not (ckpt / "config.json").is_file()
    if trained_here:
        ckpt = _train(steps or DEMO_STEPS)
    torch.manual_seed(0)
    model, tok = load_model(device=device, dtype=dtype)
    handle = load_gates(model, ckpt)
    M = budget or handle.gates.config.train_budget or 64
    # the shipped allocation was profiled with the shipped gates: new gates get uniform budgets only
    allocation = None if trained_here else default_allocation()
    methods = demo_methods(M, allocation if allocation is not None and allocation.is_dir() else None)
    print(f"\nthe passkey task at {len(depths)} depths ({', '.join(f'{d:.0%}' for d in depths)}): a ~{context}-token "
          f"haystack of filler with a 5-digit pass key hidden at that depth, asked for at the end; {len(methods)} "
          f"ways of answering, the bounded ones in the KV memory of M = {M} tokens per KV head")
    results = ask_at_depths(model, tok, methods, context=context, depths=depths, seed=seed)
    print()
    print(rate_table(results))
    full = results[methods[0].name][0]["kv_bytes"]
    bounded = results[methods[1].name][0]["kv_bytes"]
    print(f"\nKV memory bounded / full: {bounded / max(full, 1):.3f}. LU-KV gives each (layer, KV head) its own "
          "budget; the cache pads each layer to its largest one, so its mean budget is the largest whose buffers "
          f"fit those of M = {M} (HeadAllocation.matched_budget).\n"
          f"{len(depths)} prompts are a demo, not a measurement: the rates at n = 40 are in results/README.md")
    fidelity = _fidelity(model, tok, M)   # the gates attached above
    return {"methods": [m.name for m in methods], "results": results, "fidelity": fidelity}


def _fidelity(model, tok, M: int) -> list[dict]:
    """How far bounded decoding drifts from the full cache on real prose: learned retention (per head and in one
    pool) vs StreamingLLM."""
    from .eval.fidelity import fidelity_table, run_fidelity

    print(f"\nlong-text fidelity vs the full cache (eval-split prose, 256-token prefix, 64 decoded tokens, M={M}):")
    recs = run_fidelity(model, tok, budgets=[M], policies=["trimkv", "trimkv-global", "streaming"], gates=None,
                        n_texts=1, prefix_tokens=256, continuation_tokens=64, progress=False)
    print(fidelity_table(recs))
    return recs
