"""Long-text fidelity: how far memory-bounded decoding drifts from the full cache on real text, teacher-forced.

For each text (real English from ``trimkv.data.corpus`` split ``"eval"``, never seen in training), the first
``prefix_tokens`` are prefilled in chunks of ``prefill_chunk`` and the next ``continuation_tokens`` are fed
``step`` at a time (1 = true decoding: every step evicts; larger steps are faster but let the cache hold
``budget + step`` tokens during a step). Each continuation token's next-token distribution is compared with the
full-cache one (a single causal forward over the whole text):

  * ``kl``        - mean over tokens of KL(p_full || p_bounded), in nats;
  * ``top1``      - fraction of tokens whose argmax agrees;
  * ``ppl_ratio`` - perplexity of the text under the bounded cache / under the full cache (1.0 = no loss).

Policies and budgets are judged with the same cache, sink/window protection and schedule as the task harness.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from trimkv.data import corpus
from trimkv.compat import cache_kwargs
from trimkv.eval.harness import (gate_fingerprint, mixes_gates, policy_cache, prepared_gates, series_name,
                                 uses_gates)
from trimkv.base_model import input_device
from trimkv.progress import Progress
from trimkv.serve import FULL, gates_for, prefill


def eval_texts(tokenizer, *, n_texts: int, n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_texts`` token id tensors [1, n_tokens] of eval-split prose (different seeds, so different documents)."""
    texts = []
    for i in range(n_texts):
        chars = 6 * n_tokens
        while True:
            ids = tokenizer(corpus.prose_text("eval", chars, seed=seed + i), return_tensors="pt",
                            add_special_tokens=False)["input_ids"]
            if ids.shape[1] >= n_tokens:
                break
            chars *= 2
        texts.append(ids[:, :n_tokens])
    return texts


@torch.no_grad()
def full_logprobs(model, ids: torch.Tensor, n_last: int) -> torch.Tensor:
    """Log-probs [n_last, V] predicting the last ``n_last`` tokens of ``ids``, from one full-attention forward of
    the frozen model."""
    with gates_for(model, None):
        logits = model(ids, use_cache=False, logits_to_keep=n_last + 1).logits[0, :-1]
    return logits.float().log_softmax(-1)


@torch.no_grad()
def bounded_logprobs(model, ids: torch.Tensor, cache, *, prefix: int, prefill_chunk: int, step: int) -> torch.Tensor:
    """Teacher-forced log-probs [T - prefix, V] predicting ``ids[prefix:]`` through ``cache``."""
    logits, _ = prefill(model, ids[:, :prefix], cache, chunk=prefill_chunk)
    out = [logits]                                                                   # [1, V]
    T = ids.shape[1]
    with gates_for(model, cache):
        for s in range(prefix, T - 1, step):
            e = min(s + step, T - 1)
            out.append(model(ids[:, s:e], **cache_kwargs(model, cache), use_cache=True).logits[0])
    return torch.cat(out).float().log_softmax(-1)


def compare(ref: torch.Tensor, test: torch.Tensor, targets: torch.Tensor) -> dict:
    """KL(ref || test), top-1 agreement and perplexities of two log-prob tables [N, V] on ``targets`` [N]."""
    kl = F.kl_div(test, ref, log_target=True, reduction="none").sum(-1)             # [N]
    nll_ref = -ref.gather(-1, targets[:, None]).squeeze(-1)
    nll_test = -test.gather(-1, targets[:, None]).squeeze(-1)
    return dict(kl=kl.mean().item(), top1=(ref.argmax(-1) == test.argmax(-1)).float().mean().item(),
                nll_full=nll_ref.mean().item(), nll=nll_test.mean().item())


def run_fidelity(model, tokenizer, *, budgets, policies, gates=None, n_texts: int = 2, prefix_tokens: int = 1024,
                 continuation_tokens: int = 256, step: int = 1, seed: int = 0, sink: int = 4, window: int = 16,
                 prefill_chunk: int = 256, head_budgets=None, out_dir=None, progress: bool = True) -> list[dict]:
    """One record per (policy, budget): mean kl / top1 over all continuation tokens of all texts, and the
    perplexity ratio. ``head_budgets``: an allocation (file or folder of ``trimkv profile``) whose table of each
    policy splits its budget over the heads (the records name it), or None / "uniform". Writes ``fidelity.json``
    and ``fidelity.md`` into ``out_dir`` when given."""
    policies = [p for p in policies if p != FULL]
    from trimkv.serve.budgets import UNIFORM, load_allocation

    allocation = None if head_budgets in (None, UNIFORM) else load_allocation(head_budgets)
    budgets = sorted({int(b) for b in budgets})
    device = input_device(model)
    texts = [t.to(device) for t in eval_texts(tokenizer, n_texts=n_texts, n_tokens=prefix_tokens +
                                              continuation_tokens, seed=seed)]
    sums: dict[tuple, dict] = {}
    with prepared_gates(model, gates, need_trained=any(uses_gates(p) for p in policies)) as handle:
        gate_id = gate_fingerprint(handle) if any(uses_gates(p) for p in policies) else None
        refs = [full_logprobs(model, ids, continuation_tokens) for ids in texts]
        with Progress("fidelity", total=len(texts) * len(policies) * len(budgets), enabled=progress) as bar:
            for policy in policies:
                for budget in budgets:
                    bar.update(label=f"fidelity {policy} M={budget}")
                    for i, (ids, ref) in enumerate(zip(texts, refs)):
                        cache = policy_cache(model, policy, budget, sink=sink, window=window, seed=seed * 1000 + i,
                                             head_budgets=allocation)
                        test = bounded_logprobs(model, ids, cache, prefix=prefix_tokens,
                                                prefill_chunk=prefill_chunk, step=step)
                        m = compare(ref, test, ids[0, prefix_tokens:])
                        acc = sums.setdefault((policy, budget), dict(kl=0.0, top1=0.0, nll=0.0, nll_full=0.0))
                        for k in acc:
                            acc[k] += m[k] / len(texts)
                        bar.update(advance=1)
    records = [dict(policy=p, budget=b, kl=v["kl"], top1=v["top1"], ppl=math.exp(v["nll"]),
                    ppl_full=math.exp(v["nll_full"]), ppl_ratio=math.exp(v["nll"] - v["nll_full"]),
                    n_texts=n_texts, prefix_tokens=prefix_tokens, continuation_tokens=continuation_tokens, step=step,
                    sink=sink, window=window, gates=gate_id if uses_gates(p) else None) for (p, b), v in sums.items()]
    if allocation is not None:
        for r in records:
            r["head_budgets"] = allocation.name
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fidelity.json").write_text(json.dumps(records, indent=1))
        (out / "fidelity.md").write_text(fidelity_table(records))
    return records


def fidelity_table(records: list[dict]) -> str:
    lines = ["| policy | M | KL(full‖bounded) | top-1 agree | ppl ratio |", "|---|---|---|---|---|"]
    tag = mixes_gates(records)
    for r in records:
        lines.append(f"| {series_name(r, gates=tag)} | {r['budget']} | {r['kl']:.4f} | {100 * r['top1']:.1f}% | "
                     f"{r['ppl_ratio']:.3f} |")
    return "\n".join(lines) + "\n"
