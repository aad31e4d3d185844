"""LU-KV offline profiling (Tang et al., 2026, arXiv 2602.08585): per (layer, KV head) eviction-loss curves of a
policy, measured with full attention on a profiling set, turned into a per-head budget allocation.

    alloc = profile_allocation(model, tok, policies=["snapkv", "trimkv"], n_docs=4, questions=8, length=2048)
    alloc.save("checkpoints/smollm2-135m-lukv", card=allocation_card(alloc))
    cache = make_cache(model, "snapkv", 64, head_budgets="checkpoints/smollm2-135m-lukv")

**The profiling set** is ``builtin:qa-plain`` documents (:mod:`trimkv.data.synthqa`): train-split prose with
made-up facts, then questions with an answer lead ("The badge number of Kalo Renvas is") and the answer. Its wording,
haystack (train split, not the eval split or the filler) and seeds share nothing with the evaluation prompts of
:mod:`trimkv.eval.tasks`. Each question is one *query* (the paper uses ~30 queries on one ~4k context): its prompt
is the context + that question + its lead; the future decoding steps are the queries that produce the answer (the
lead's last token and the answer's tokens but the last, teacher-forced).

**One query** (per policy ``pi``): the context is prefilled once into a bounded cache whose budget exceeds the whole
document, so nothing is evicted (full attention) and the policy scores every token as it would in a real cache
(same chunked prefill, its own attention statistics, the gates for TRIM-KV); each question continues from a copy.
Then, per (layer l, KV head h), over the prompt's tokens j:

* the policy's keep-score ``s_j`` at the end of the prompt (sink / window protection applied): head h keeps its
  top ``b`` by ``s``;
* the **oracle importance** ``I_j = max_{future step t, query head g of h} A_{g,t,j} * ||W_O^g v_j||`` (the largest
  contribution the token makes to the attention output over the answer, with full attention);
* the **eviction-loss curve** ``L_h(b) = sum of I_j over the tokens outside the top b`` (b = 0 .. prompt length);
  its marginal gains are convexified (PAVA) from ``b = sink + window + 1`` (the cache's per-head floor) on;
* the **greedy solution** (:func:`trimkv.serve.budgets.allocations_over_grid`) at each global keep ratio ``rho`` of
  ``grid`` (total = rho x prompt length x heads): budgets ``b_h``, ratios ``b_h / prompt length``, shares
  ``b_h / mean``.

The allocation stores, per policy, the ratios averaged over queries ([R, L, Hkv]) and the shares averaged over queries
and the grid ([L, Hkv], mean 1): what ``--head-budgets`` scales to a budget. Diagnostics per policy: the oracle loss
of the uniform and of the LU-KV budgets at each ratio, on the raw (unconvexified) curves of the profiling queries.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from trimkv.attach import attention_modules
from trimkv.data.corpus import prose_documents
from trimkv.data.synthqa import qa_documents
from trimkv.base_model import input_device
from trimkv.errors import CacheError, DataError
from trimkv.eval.harness import prepared_rankers, uses_rankers
from trimkv.names import LUKV_GRID
from trimkv.progress import Progress
from trimkv.serve import make_cache
from trimkv.serve.budgets import GRANULARITIES, HeadAllocation, allocations_over_grid, pava_nonincreasing
from trimkv.serve.eviction import protect
from trimkv.serve.factory import model_shape
from trimkv.serve.generation import prefill
from trimkv.serve.pipeline import clone_cache
from trimkv.serve.policies import get_policy
from trimkv.serve.slot_attention import slot_attention

DEFAULT_GRID = LUKV_GRID   # global keep ratios (M ~ 30 .. 330 tokens per head at 2k)
MATCHED_BUDGETS = (32, 64, 128, 256, 512)   # the card's equal-allocated-memory table


@dataclass
class Query:
    """One profiling query: the prompt after the shared context, and the answer that the future steps produce."""

    tail: str        # "\n\n<question>\n<answer lead>"
    answer: str      # " <value>."


def profiling_set(tokenizer, *, n_docs: int, questions: int, length: int, seed: int) -> list[tuple[str, list[Query]]]:
    """``n_docs`` ``builtin:qa-plain`` documents of at most ``length`` tokens with ``questions`` questions each (and
    a few more facts than questions, as distractors): [(context, [Query, ...]), ...]."""
    paragraphs = [p.strip() for d in prose_documents("train") for p in d.split("\n\n") if p.strip()]
    try:
        docs = qa_documents(paragraphs, tokenizer, length=length, n_docs=n_docs, chat=False, seed=seed,
                            n_facts=(questions + 2, questions + 4), n_questions=(questions, questions))
    except ValueError as err:
        raise DataError(f"profiling set: {err}; raise --length or lower --questions") from None
    out = []
    for doc in docs:
        text, spans = doc["text"], doc["target_spans"]
        end = text.rfind("\n\n", 0, spans[0][0])           # the context ends where the first question starts
        queries, prev = [], end
        for s, e in spans:
            queries.append(Query(text[prev:s].rstrip(" "), " " + text[s:e]))
            prev = e
        out.append((text[:end], queries))
    return out


class _QueryRecorder:
    """Keeps the queries every layer of a cache attends with (its ``attend`` wrapped; the cache is a private copy)."""

    def __init__(self, cache):
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor, float]]] = [[] for _ in cache.layers]
        for i, layer in enumerate(cache.layers):
            layer.attend = self._wrap(layer, layer.attend, self.calls[i])

    @staticmethod
    def _wrap(layer, attend, calls):
        def recorded(q, k, v, *, scaling):
            calls.append((q.detach(), layer._staged.pos.clone(), scaling))
            return attend(q, k, v, scaling=scaling)
        return recorded


def _by_position(values: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """[H, S] values of slots at positions ``pos`` [H, S] -> [H, n] by position (slots outside 0..n-1 dropped)."""
    out = torch.zeros(values.shape[0], n + 1, dtype=values.dtype)
    idx = torch.where((pos >= 0) & (pos < n), pos, n)
    return out.scatter_(1, idx.cpu(), values.cpu())[:, :n]


def _oracle(layer, queries: list[tuple[torch.Tensor, torch.Tensor, float]], w_gram: torch.Tensor,
            n: int) -> torch.Tensor:
    """Oracle importance [Hkv, n] of the prompt's tokens (positions 0..n-1) in one layer's slots: the largest
    ``A_{g,t,j} ||W_O^g v_j||`` over the recorded future queries t and the query heads g of each KV head."""
    q = torch.cat([c[0] for c in queries], dim=2)                                  # [1, H, Tq, D]
    q_pos = torch.cat([c[1] for c in queries], dim=1)                              # [1, Tq]
    keys, values, pos = layer.keys, layer.values, layer.pos
    _, w = slot_attention(q, keys, values, q_pos=q_pos, k_pos=pos, k_valid=pos >= 0, scaling=queries[0][2],
                          return_weights=True)                                     # [1, Hkv, G*Tq, C]
    Hkv, G = keys.shape[1], q.shape[1] // keys.shape[1]
    v = values[0].float()                                                          # [Hkv, C, D]
    v_g = v[:, None].expand(Hkv, G, *v.shape[1:])                                  # [Hkv, G, C, D]
    vnorm = ((v_g @ w_gram.view(Hkv, G, *w_gram.shape[1:])) * v_g).sum(-1).clamp_min(0).sqrt()   # [Hkv, G, C]
    imp = (w[0].view(Hkv, G, -1, w.shape[-1]) * vnorm[:, :, None]).amax(dim=(1, 2))            # [Hkv, C]
    return _by_position(imp, pos[0], n)


def _o_proj_gram(model) -> list[torch.Tensor]:
    """Per layer, W_O^g^T W_O^g for every query head g: [H, D, D] (so ||W_O^g v|| = sqrt(v^T Gram v))."""
    cfg = getattr(model.config, "text_config", None) or model.config
    H = cfg.num_attention_heads
    out = []
    for attn in attention_modules(model):
        o = getattr(attn.o_proj, "base_layer", attn.o_proj)                       # the frozen weight under LoRA
        W = o.weight.detach().float()                                              # [hidden, H * D]
        Wg = W.view(W.shape[0], H, -1).permute(1, 0, 2)                             # [H, hidden, D]
        out.append(Wg.transpose(1, 2) @ Wg)
    return out


def query_gains(cache, recorder: _QueryRecorder, scores: list[torch.Tensor], n: int, floor: int,
                grams: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For one query: the raw marginal gains [L*Hkv, n] (oracle importance in the policy's keep order) and their
    convexified form from the floor on [L*Hkv, n - floor]."""
    raw = []
    for layer, calls, score, gram in zip(cache.layers, recorder.calls, scores, grams):
        imp = _oracle(layer, calls, gram, n)                                       # [Hkv, n]
        order = torch.sort(-score, dim=1, stable=True).indices                     # keep order, best first
        raw.append(imp.gather(1, order))
    raw = torch.cat(raw).double()                                                  # [N, n]
    convex = torch.tensor([pava_nonincreasing(r[floor:].tolist()) for r in raw], dtype=torch.float64)
    return raw, convex


@torch.no_grad()
def profile_policy(model, tokenizer, policy: str, docs, *, grid, sink: int, window: int, prefill_chunk: int,
                   per: str = "head", bar: Progress | None = None, kvp=None) -> dict:
    """Per-query greedy solutions of one policy over ``docs`` (:func:`profiling_set`) -> {"shares" [L][H],
    "ratios" [R][L][H], "loss_uniform" [R], "loss_lukv" [R], "queries"}. ``per="layer"``: the solver hands tokens
    to whole layers (:func:`layer_allocations`), so the heads of a layer share one budget. ``kvp``: the KVP rankers
    the ``kvp`` policy reads (:func:`trimkv.eval.harness.prepared_rankers`)."""
    L, H = model_shape(model)
    device = input_device(model)
    floor = sink + window + 1
    grams = [g.to(device) for g in _o_proj_gram(model)]
    encode = lambda text: tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)  # noqa: E731
    ratios = torch.zeros(len(grid), L * H, dtype=torch.float64)
    shares = torch.zeros(L * H, dtype=torch.float64)
    loss_u, loss_a = torch.zeros(len(grid), dtype=torch.float64), torch.zeros(len(grid), dtype=torch.float64)
    count = 0
    scorer = get_policy(policy, rankers=kvp) if uses_rankers(policy) else get_policy(policy)
    for context, queries in docs:
        ctx = encode(context)
        tails, answers = [encode(q.tail) for q in queries], [encode(q.answer) for q in queries]
        room = ctx.shape[1] + max(t.shape[1] + a.shape[1] for t, a in zip(tails, answers)) + 1
        base = make_cache(model, scorer, room, sink=sink, window=window)              # never evicts: full attention
        prefill(model, ctx, base, chunk=prefill_chunk)
        for tail, answer in zip(tails, answers):
            cache = clone_cache(base)
            rec = _QueryRecorder(cache)
            prefill(model, tail, cache, chunk=prefill_chunk)
            n = ctx.shape[1] + tail.shape[1]                                       # the prompt's tokens
            scores = [_by_position(protect(cache.policy.scores(layer.slots), layer.pos, layer.t_now, sink=sink,
                                           window=window)[0].float(), layer.pos[0], n) for layer in cache.layers]
            for calls in rec.calls:                                                # the prompt's last query only
                q, pos, s = calls[-1]
                calls[:] = [(q[:, :, -1:], pos[:, -1:], s)]
            if answer.shape[1] > 1:
                prefill(model, answer[:, :-1], cache, chunk=prefill_chunk)         # the answer, teacher-forced
            raw, convex = query_gains(cache, rec, scores, n, floor, grams)
            if per == "layer":
                totals = [min(max(round(r * n * L), floor * L), n * L) * H for r in grid]
                alloc = layer_allocations(convex, totals, floor, L, H).double()    # [R, N]
            else:
                totals = [min(max(round(r * n * L * H), floor * L * H), n * L * H) for r in grid]
                alloc = allocations_over_grid(convex, totals, floor).double()      # [R, N]
            ratios += alloc / n
            shares += (alloc / (torch.tensor(totals, dtype=torch.float64)[:, None] / (L * H))).mean(0)
            kept = raw.cumsum(1)                                                   # oracle importance kept at b
            total_imp = kept[:, -1].sum()
            for r, (t, b) in enumerate(zip(totals, alloc.long())):
                uniform = torch.full((L * H,), t // (L * H)).clamp(floor, n)
                loss_u[r] += float(total_imp - kept.gather(1, (uniform - 1)[:, None]).sum()) / float(total_imp)
                loss_a[r] += float(total_imp - kept.gather(1, (b.clamp_max(n) - 1)[:, None]).sum()) / float(total_imp)
            count += 1
            if bar is not None:
                bar.update(advance=1, label=policy)
    return {"shares": _rounded((shares / count).view(L, H)), "ratios": _rounded((ratios / count).view(len(grid), L, H)),
            "loss_uniform": _rounded(loss_u / count), "loss_lukv": _rounded(loss_a / count), "queries": count}


def layer_allocations(convex: torch.Tensor, totals: list[int], floor: int, L: int, H: int) -> torch.Tensor:
    """Per-layer greedy solutions [R, L*H] from per-head convexified gains ``convex`` [L*H, n]: a layer's gain for
    one more token in each of its H heads is the sum of their gains (non-increasing, since each is), the solver runs
    over the L layers with totals ``totals / H``, and each head gets its layer's budget."""
    if any(t % H for t in totals):
        raise ValueError(f"per-layer totals must be multiples of the {H} KV heads, got {totals}")
    gains = convex.view(L, H, -1).sum(1)                                           # [L, n]
    return allocations_over_grid(gains, [t // H for t in totals], floor).repeat_interleave(H, dim=1)


def _rounded(t: torch.Tensor, digits: int = 6) -> list:
    """Nested lists of ``t``'s values rounded to ``digits`` decimals (a small file; shares keep mean 1 to 1e-6)."""
    return torch.round(t.double(), decimals=digits).tolist()


def profile_allocation(model, tokenizer, *, policies: list[str], n_docs: int = 4, questions: int = 8,
                       length: int = 2048, seed: int = 23, grid=DEFAULT_GRID, sink: int = 4, window: int = 16,
                       prefill_chunk: int = 256, name: str = "allocation", gates: str | None = None,
                       per: str = "head", progress: bool = True, kvp=None) -> HeadAllocation:
    """Profile ``policies`` on :func:`profiling_set` and return the allocation (gates, when a policy reads them, must
    be attached to ``model`` already); ``per``: "head" (a budget per KV head) or "layer" (one per layer); ``kvp``:
    the KVP rankers (a checkpoint folder / Hub id or :class:`~trimkv.kvp.KVPRankers`) when ``policies`` has ``kvp``."""
    if per not in GRANULARITIES:
        raise ValueError(f"per must be one of {', '.join(GRANULARITIES)}, got {per!r}")
    t0 = time.perf_counter()
    docs = profiling_set(tokenizer, n_docs=n_docs, questions=questions, length=length, seed=seed)
    n_queries = sum(len(q) for _, q in docs)
    tables, per_policy_s = {}, {}
    rankers = prepared_rankers(model, kvp, need=any(uses_rankers(p) for p in policies))
    with Progress("profile", total=n_queries * len(policies), enabled=progress) as bar:
        for policy in policies:
            t = time.perf_counter()
            tables[policy] = profile_policy(model, tokenizer, policy, docs, grid=list(grid), sink=sink, window=window,
                                            prefill_chunk=prefill_chunk, per=per, bar=bar, kvp=rankers)
            per_policy_s[policy] = round(time.perf_counter() - t, 1)
    L, H = model_shape(model)
    tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c, _ in docs)
    settings = dict(source="builtin:qa-plain (train-split prose; wording disjoint from trimkv.eval.tasks)",
                    n_docs=n_docs, questions=questions, length=length, seed=seed, queries=n_queries, sink=sink,
                    window=window, floor=sink + window + 1, prefill_chunk=prefill_chunk, gates=gates)
    if rankers is not None:
        settings["kvp"] = str(kvp) if not isinstance(kvp, torch.nn.Module) else rankers.fingerprint()
    cost = dict(seconds=round(time.perf_counter() - t0, 1), seconds_per_policy=per_policy_s,
                context_tokens_per_policy=tokens, device=str(input_device(model)),
                threads=torch.get_num_threads())
    model_name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return HeadAllocation(base_model=model_name, shape=(L, H), grid=[float(g) for g in grid], tables=tables,
                          settings=settings, cost=cost, name=name, granularity=per)


def allocation_card(alloc: HeadAllocation) -> str:
    """A README for the allocation folder: what was profiled, how, what it cost, and what the profile predicts."""
    s, c = alloc.settings, alloc.cost
    per_layer = alloc.granularity == "layer"
    lines = [f"# {alloc.name}: LU-KV per-{alloc.granularity} budgets for {alloc.base_model}", "",
             ("Per-layer budget shares (every KV head of a layer gets its layer's budget: no padding, the allocated "
              "bytes equal the uniform cache's)" if per_layer else "Per (layer, KV head) budget shares") +
             f" ({alloc.shape[0]} layers x {alloc.shape[1]} KV heads) from LU-KV "
             "profiling (arXiv 2602.08585): eviction-loss curves of each policy with full attention, convexified "
             "(PAVA), solved greedily, averaged over the profiling queries and the grid of global keep ratios.", "",
             "    trimkv eval --head-budgets <this folder> ...      # or make_cache(..., head_budgets=<this folder>)", "",
             f"- profiling set: {s.get('source')}; {s.get('n_docs')} documents of <= {s.get('length')} tokens, "
             f"{s.get('questions')} questions each ({s.get('queries')} queries), seed {s.get('seed')}",
             f"- cache settings: sink {s.get('sink')}, window {s.get('window')} (per-head floor {s.get('floor')}), "
             f"prefill chunk {s.get('prefill_chunk')}; gates: {s.get('gates') or 'none'}",
             f"- global keep ratios: {', '.join(f'{g:g}' for g in alloc.grid)}",
             f"- cost: {c.get('seconds')} s on {c.get('device')} with {c.get('threads')} thread(s) "
             f"(per policy: {c.get('seconds_per_policy')}); {c.get('context_tokens_per_policy')} context tokens per policy",
             "", "Oracle loss on the profiling queries (share of the answer's oracle importance evicted), uniform -> "
             "LU-KV budgets, at each global keep ratio:", "",
             "| policy | " + " | ".join(f"{g:g}" for g in alloc.grid) + " | min / max share |",
             "|---|" + "---|" * (len(alloc.grid) + 1)]
    for policy, t in alloc.tables.items():
        sh = torch.tensor(t["shares"])
        cells = " | ".join(f"{u:.3f} -> {a:.3f}" for u, a in zip(t.get("loss_uniform", []), t.get("loss_lukv", [])))
        lines.append(f"| {policy} | {cells} | {float(sh.min()):.2f} / {float(sh.max()):.2f} |")
    floor = s.get("floor")
    if not per_layer and isinstance(floor, int):
        budgets = [b for b in MATCHED_BUDGETS if b >= floor]
        lines += ["", "The cache allocates each layer's largest head budget for all its KV heads, so these budgets "
                  "allocate more slots than the uniform cache at the same mean budget M. The mean budget whose "
                  "allocated slots fit the uniform cache's at M (equal allocated memory):", "",
                  "| policy | " + " | ".join(f"M={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for policy in alloc.tables:
            cells = []
            for b in budgets:
                try:
                    cells.append(str(alloc.matched_budget(policy, b, floor)))
                except CacheError:
                    cells.append("-")
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["profile_allocation", "profile_policy", "profiling_set", "allocation_card", "layer_allocations",
           "DEFAULT_GRID", "Query"]
