"""Evaluation in batches, for a GPU: the harness's cells with many prompts per forward.

    run_eval_batched(model, tok, batch_size=40, tasks=["passkey"], lengths=[2048, 4096, 8192], budgets=[32, 64, 128],
                     policies=["full", "trimkv", "streaming"], n_samples=40, gates="checkpoints/...", out_dir="results/")

takes the arguments of :func:`trimkv.eval.harness.run_eval` and writes the same files, keyed the same way: a cell run
here and one run one prompt at a time on a CPU are the same cell (a finished one is reused by either), so runs of
the two add up in one folder.

What runs together: the prompts of one cell that have the same length in tokens (the tasks fit every prompt to the
cell's length, so usually all of them) and the same policy. They go through one cache of ``batch_size`` rows (every
row holds its own ``budget`` slots per KV head and evicts on its own) with the same chunked prefill and greedy
decoding as :func:`trimkv.serve.generate`: ``model.generate`` on the batch, each row cut at its first end-of-sequence
token. A row's result is the one-prompt result up to float rounding of batched matrix products (the test suite
checks equal answers on CPU). Policies built for one prompt (the needle oracle reads where the needle is; the random
policy draws from a per-prompt seed) differ between prompts and run one prompt at a time, exactly as the harness
runs them.
"""
from __future__ import annotations

import functools
import time
from dataclasses import asdict

import torch

from trimkv.base_model import input_device
from trimkv.compat import cache_kwargs
from trimkv.eval.harness import (MAX_NEW_TOKENS, Cell, answer_occurrences, cell_allocation, cell_record,
                                 needle_kept, policy_cache, run_eval)
from trimkv.eval.tasks import TASK_METRIC, render_prompt, score
from trimkv.serve import gates_for, generate, kv_nbytes
from trimkv.serve.factory import budget_nbytes


def run_eval_batched(model, tokenizer, *, batch_size: int, **kwargs) -> list[dict]:
    """:func:`~trimkv.eval.harness.run_eval` with up to ``batch_size`` prompts per forward (see the module
    docstring); ``batch_size=1`` is the harness itself."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need at least 1 prompt per batch")
    if batch_size == 1:
        return run_eval(model, tokenizer, **kwargs)
    return run_eval(model, tokenizer, run_cell=functools.partial(run_cell_batched, batch_size=batch_size), **kwargs)


def run_cell_batched(model, tokenizer, cell: Cell, cfg: dict, samples, bar, *, batch_size: int,
                     context: dict | None = None) -> dict:
    """One cell's record (settings, metrics, per-sample predictions), as the harness's one-prompt path makes it."""
    device = input_device(model)
    max_new = cfg["max_new_tokens"] or MAX_NEW_TOKENS.get(cell.task, 32)
    t_cell = time.perf_counter()
    bar.update(label=cell.slug)
    prompts = [render_prompt(s, tokenizer) for s in samples]
    ids = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in prompts]
    allocation = cell_allocation(cfg)
    caches, built = [], []                        # a sample's seconds include building its policy (LAQ decodes)
    for i, (s, p) in enumerate(zip(samples, prompts)):
        t0 = time.perf_counter()
        caches.append(policy_cache(model, cell.policy, cell.budget, sink=cfg["sink"], window=cfg["window"],
                                   lookahead=cfg.get("lookahead", 0), head_budgets=allocation,
                                   seed=cfg["seed"] * 1000 + i, sample=s, prompt=p, tokenizer=tokenizer,
                                   prefill_chunk=cfg["prefill_chunk"], **(context or {})))
        built.append(time.perf_counter() - t0)
    rows: list[dict | None] = [None] * len(samples)
    for group in batches(ids, caches, batch_size):
        if len(group) == 1:                       # what the harness does for one prompt
            i = group[0]
            gen = generate(model, tokenizer, ids[i].to(device), cache=caches[i], prefill_chunk=cfg["prefill_chunk"],
                           max_new_tokens=max_new)
            results = [(i, gen.text, gen.kv_bytes, gen.seconds, caches[i], 0)]
        else:
            results = _generate_batch(model, tokenizer, group, ids, caches[group[0]], cfg["prefill_chunk"], max_new)
        group_budget = budget_nbytes(caches[group[0]]) // len(group)        # per row
        for i, text, kv_bytes, seconds, cache, row in results:
            sample = samples[i]
            kept = needle_kept(cache, answer_occurrences(sample, prompts[i], tokenizer), row=row) \
                if cell.budget is not None else None
            rows[i] = dict(asdict(cell), index=i, depth=sample.depth, prompt_tokens=int(ids[i].shape[1]),
                           answers=sample.answers, prediction=text,
                           score=score(text, sample.answers, TASK_METRIC[cell.task]),
                           kv_bytes=kv_bytes, budget_kv_bytes=group_budget, seconds=round(built[i] + seconds, 3),
                           needle_heads=kept)
            bar.update(advance=1)
    record = cell_record(cell, cfg, rows, t_cell)
    record["metrics"]["batch_size"] = batch_size  # how the cell ran (not part of its key)
    return record


def batches(ids: list[torch.Tensor], caches: list, batch_size: int) -> list[list[int]]:
    """Sample indices grouped to run together: the same prompt length and the same policy, at most ``batch_size``
    each, in the samples' order."""
    groups: list[list[int]] = []
    open_: dict[int, list[int]] = {}              # group index -> members, while it has room
    for i, (x, cache) in enumerate(zip(ids, caches)):
        home = next((g for g, members in open_.items()
                     if ids[members[0]].shape == x.shape and same_policy(caches[members[0]], cache)), None)
        if home is None:
            home = len(groups)
            groups.append([])
            open_[home] = groups[home]
        groups[home].append(i)
        if len(groups[home]) == batch_size:
            del open_[home]
    return groups


def same_policy(a, b) -> bool:
    """Whether two caches evict alike: the same cache type with equal policies (same class, equal settings)."""
    if type(a) is not type(b):
        return False
    pa, pb = getattr(a, "policy", None), getattr(b, "policy", None)
    if pa is None or pb is None:
        return pa is pb
    if type(pa) is not type(pb) or vars(pa).keys() != vars(pb).keys():
        return False
    for key, x in vars(pa).items():
        y = vars(pb)[key]
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and torch.equal(x.cpu(), y.cpu())):
                return False
        elif x != y:
            return False
    return True


@torch.no_grad()
def _generate_batch(model, tokenizer, group: list[int], ids: list[torch.Tensor], cache, chunk: int, max_new: int):
    """Greedy generation for the prompts ``group`` (same length) in one ``cache`` -> per prompt (index, text, KV bytes
    of its row, seconds (the batch's, shared), the cache, its row)."""
    batch = torch.cat([ids[i] for i in group]).to(input_device(model))                   # [B, T]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with gates_for(model, cache):
        out = model.generate(batch, attention_mask=torch.ones_like(batch), **cache_kwargs(model, cache),
                             max_new_tokens=max_new, pad_token_id=pad, do_sample=False, prefill_chunk_size=chunk)
    seconds = (time.perf_counter() - t0) / len(group)
    per_row = kv_nbytes(cache) // len(group)
    stops = _eos_ids(model, tokenizer)
    results = []
    for row, i in enumerate(group):
        new = out[row, batch.shape[1]:].tolist()
        end = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))          # up to its first EOS
        text = tokenizer.decode(new[:end], skip_special_tokens=True).strip()
        results.append((i, text, per_row, seconds, cache, row))
    return results


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a row's generation (what ``model.generate`` stops a single prompt on)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
