"""Future-utility targets: how much attention each key receives from the queries that come after it.

One layer, one row, queries in chunks (memory O(chunk x keys), never the whole T x T for all heads at once). For
query j and key i the attention weight is the frozen model's own softmax,

    p[h, j, i] = softmax_i( q[h, j] . k[h // G, i] * scaling )    over the keys i that j sees (causal, same document)

and a target is a max, over the query heads h of the key's KV group (GQA: G query heads share one KV head) and
over a set of later queries j > i:

    target[hk, i] = max_{h in group(hk)} max_{j in J(i)} p[h, j, i]

or, for ``mean``, the mean over both: ``mean_{h in group(hk)} mean_{j in J(i)} p[h, j, i]`` (H2O's accumulated
attention per reader, so an old token does not win for having had more readers; Zhang et al. 2023, arXiv 2306.14048).

The max (not a sum) is the form KVzip uses for its reconstruction score (Kim et al., 2025, arXiv 2505.23416: max over
the repeating queries and over the group's heads); a token that one later query needs badly is worth keeping, however
many others ignore it. The sets J(i) are :class:`Read` s:

==========================  =================================================================================
``Read()``                  every later query, ``j > i``                           -> target ``future``
``Read(horizon=h)``         the next h queries only, ``i < j <= i + h``            -> ``future@<h>``
``Read(min_age=h)``         the queries more than h later, ``j > i + h``           -> ``later@<h>``
``Read(queries=mask)``      later queries where ``mask[j]`` is set (answers; the repeated context of KVzip)
``Read(reduce="mean")``     every later query, averaged instead of the max        -> ``mean``
==========================  =================================================================================

The max marks a token that one reader needs badly (a fact a question asks for); the mean marks what every reader
leans on (attention sinks, punctuation, the frequent words most heads park their attention on).

:func:`received_attention` also returns the attention output ``p @ v``, so the frozen model runs on exactly the
weights the targets were read from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..names import TRACE_TARGETS, check_names

# the targets a trace store can hold (``future@<h>`` for each horizon h besides ``future``), what each one reads
TARGETS = {
    "future": "attention received from every later query (max over the queries and the KV group's query heads)",
    "later": "attention received from the queries more than h tokens later (j > i + h), one later@<h> per horizon: "
             "what is left of a token's use once it is h tokens old (an upper bound of its use from step i + h + 1 on)",
    "mean": "mean attention received from the later queries of its document (mean over the queries and the KV group's "
            "query heads): H2O's accumulated attention per reader, what every reader leans on",
    "answer": "attention received from the queries that produce the answer tokens of a QA row (the token before each "
              "answer token: j with loss_mask[j + 1]); 0 for rows without an answer",
    "recon": "KVzip-style: attention received from the model's second reading of the row (after a repeat prompt), "
             "with the first reading's keys as its past",
}
check_names("trimkv.trace.targets.TARGETS", TARGETS, TRACE_TARGETS)


def horizon_name(h: int) -> str:
    return f"future@{h}"


def later_name(h: int) -> str:
    return f"later@{h}"


def target_names(targets, horizons) -> list[str]:
    """The stored target names: ``future``, one ``future@<h>`` per horizon, one ``later@<h>`` per horizon when
    ``later`` is asked for, then the other ``targets`` in the order of :data:`TARGETS`."""
    names = ["future", *(horizon_name(h) for h in horizons)]
    if "later" in targets:
        names += [later_name(h) for h in horizons]
    return names + [t for t in TARGETS if t in targets and t not in ("future", "later")]


@dataclass(frozen=True)
class Read:
    """Which later queries a target reads: ``horizon`` (only ``j <= i + horizon``; None = every later query),
    ``min_age`` (only ``j > i + min_age``) and ``queries`` ([Tq] bool over the chunked queries; None = all of them);
    ``reduce``: ``"max"`` or ``"mean"`` over those queries and the group's heads."""

    horizon: int | None = None
    min_age: int = 0
    queries: torch.Tensor | None = None
    reduce: str = "max"

    def __post_init__(self):
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"Read(reduce={self.reduce!r}): choose 'max' or 'mean'")


def received_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float, q_idx: torch.Tensor,
                       seg: torch.Tensor | None = None, reads: dict[str, Read] | None = None,
                       chunk: int = 256) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Causal attention of one row, and the attention each key receives (see the module docstring).

    q [H, Tq, D]; k, v [Hkv, S, D] (post-RoPE); ``q_idx`` [Tq]: the key index of each query (it sees keys
    ``<= q_idx``); ``seg`` [S] document ids of packed rows (a query sees its own document only; None = one document).
    Returns ``out`` [H, Tq, D] (q's dtype) and ``{name: [Hkv, S] fp32}`` for each of ``reads``. Computed in fp32, in
    chunks of ``chunk`` queries.
    """
    reads = reads or {}
    H, Tq, D = q.shape
    Hkv, S = k.shape[:2]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not split into groups over {Hkv} KV heads")
    G = H // Hkv
    qg = q.reshape(Hkv, G, Tq, D).float()
    kf, vf = k.float(), v.float()
    k_idx = torch.arange(S, device=k.device)
    out = torch.empty(Hkv, G, Tq, D, device=q.device, dtype=torch.float32)
    got = {name: torch.zeros(Hkv, S, device=k.device) for name in reads}       # a running max, or a sum (mean)
    readers = {name: torch.zeros(S, device=k.device) for name, r in reads.items() if r.reduce == "mean"}
    for c0 in range(0, Tq, chunk):
        c1 = min(c0 + chunk, Tq)
        j = q_idx[c0:c1]
        delta = j[:, None] - k_idx[None, :]                                   # [c, S] query index - key index
        visible = delta >= 0
        if seg is not None:
            visible = visible & (seg[j][:, None] == seg[None, :])
        logits = torch.einsum("hgcd,hsd->hgcs", qg[:, :, c0:c1], kf) * scaling
        p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)   # [Hkv, G, c, S]
        out[:, :, c0:c1] = torch.einsum("hgcs,hsd->hgcd", p, vf)
        if not reads:
            continue
        pm = p.amax(dim=1) if len(readers) < len(reads) else None            # [Hkv, c, S] max over the group
        pa = p.mean(dim=1) if readers else None                               # [Hkv, c, S] mean over the group
        later = (delta > 0) & visible                                         # (a mean counts only its readers)
        for name, read in reads.items():
            m = later
            if read.horizon is not None:
                m = m & (delta <= read.horizon)
            if read.min_age:
                m = m & (delta > read.min_age)
            if read.queries is not None:
                sel = read.queries[c0:c1]
                if not bool(sel.any()):
                    continue
                m = m & sel[:, None]
            if read.reduce == "mean":
                got[name] += pa.masked_fill(~m, 0.0).sum(dim=1)
                readers[name] += m.sum(dim=0)
            else:
                got[name] = torch.maximum(got[name], pm.masked_fill(~m, 0.0).amax(dim=1))
    for name, n in readers.items():
        got[name] = got[name] / n.clamp_min(1)
    return out.reshape(H, Tq, D).to(q.dtype), got


def future_reads(horizons, answer_queries: torch.Tensor | None = None, later: bool = False,
                 mean: bool = False) -> dict[str, Read]:
    """The reads of the first pass: ``future``, ``future@<h>`` per horizon (and ``later@<h>`` when ``later``),
    ``mean`` when ``mean``, ``answer`` when ``answer_queries`` [T] bool is given."""
    reads = {"future": Read()}
    reads.update({horizon_name(h): Read(horizon=h) for h in horizons})
    if later:
        reads.update({later_name(h): Read(min_age=h) for h in horizons})
    if mean:
        reads["mean"] = Read(reduce="mean")
    if answer_queries is not None:
        reads["answer"] = Read(queries=answer_queries)
    return reads
