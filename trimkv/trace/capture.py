"""Reading one row's traces out of the frozen model, through trimkv's hooks (no copied modeling files).

The model runs with a :class:`TraceCache`: its layers follow the :class:`~trimkv.attach.CacheLayer` protocol, so
trimkv's attention pre-hook hands each layer its :class:`~trimkv.attach.LayerInputs` (positions, the attention input
x) and trimkv's attention function hands it q, k, v after RoPE (``layer.attend``). The layer keeps the keys and
values (``DynamicLayer``), computes the attention itself (:func:`~trimkv.trace.targets.received_attention`, one
layer at a time, queries in chunks) and keeps the targets it read on the way.

Two passes per row (:func:`trace_row`):

1. the row itself: keys, values, x, and the targets ``future``, ``future@<h>``, ``later@<h>``, ``mean``, ``answer``;
2. only with the ``recon`` target (KVzip, Kim et al. 2025, arXiv 2505.23416): a repeat prompt and the row again,
   with the first pass's keys and values as the past; ``recon`` is the attention the first pass's keys receive from
   the second reading's copy of the row. It costs a second forward over 2T keys (about 2-3x the first pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attach import CacheLayer, LayerInputs, attention_modules, install_hooks
from ..attention_impl import packed_documents
from ..compat import cache_kwargs
from ..errors import DataError
from .targets import Read, future_reads, received_attention


@dataclass
class RowPlan:
    """What the layers of one row need: document ids of a packed row [T] (None = one document), the answer queries
    [T] bool (None = no answer target), the second pass's repeat queries [P + T] bool (set before that pass)."""

    seg: torch.Tensor | None = None
    answer_queries: torch.Tensor | None = None
    repeat_queries: torch.Tensor | None = None


@dataclass
class TracePlan:
    """Which layers are traced, which keep x (``hidden``), the horizons, whether ``later@<h>``, ``mean`` and
    ``answer`` are read, chunk size."""

    layers: tuple[int, ...]
    hidden_layers: tuple[int, ...] = ()
    horizons: tuple[int, ...] = ()
    later: bool = False
    mean: bool = False
    answer: bool = False
    query_chunk: int = 256


class TraceLayer(DynamicLayer, CacheLayer):
    """One decoder layer's keys, values (all tokens, both passes), attention input and targets of one row."""

    def __init__(self, layer_idx: int, plan: TracePlan, row: RowPlan):
        super().__init__()
        self.layer_idx, self.plan, self.row = layer_idx, plan, row
        self.traced = layer_idx in plan.layers
        self.hidden: torch.Tensor | None = None              # [T, d] the first pass's attention input
        self.targets: dict[str, torch.Tensor] = {}           # name -> [Hkv, T] fp32
        self._staged: LayerInputs | None = None

    def stage(self, inputs: LayerInputs) -> None:
        self._staged = inputs
        if self.hidden is None and self.layer_idx in self.plan.hidden_layers:
            self.hidden = inputs.hidden[0].detach()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float) -> torch.Tensor:
        """q [1, H, Tq, D]; k/v [1, Hkv, S, D] (every token so far, the Tq new ones last) -> out [1, H, Tq, D]."""
        self._staged = None
        if q.shape[0] != 1:
            raise ValueError("a TraceCache traces one row per forward")
        Tq, S = q.shape[2], k.shape[2]
        past = S - Tq
        q_idx = torch.arange(past, S, device=q.device)
        if past == 0:                                         # the row itself
            reads = future_reads(self.plan.horizons, self.row.answer_queries if self.plan.answer else None,
                                 later=self.plan.later, mean=self.plan.mean)
            seg = self.row.seg
        else:                                                 # the second reading (recon)
            reads = {"recon": Read(queries=self.row.repeat_queries)}
            seg = None
        out, got = received_attention(q[0], k[0], v[0], scaling=scaling, q_idx=q_idx, seg=seg,
                                      reads=reads if self.traced else None, chunk=self.plan.query_chunk)
        for name, t in got.items():
            self.targets[name] = t[:, :past] if past else t
        return out[None]


class TraceCache(Cache):
    """A transformers ``Cache`` of :class:`TraceLayer` s for one row (see the module docstring)."""

    def __init__(self, num_layers: int, plan: TracePlan, row: RowPlan):
        super().__init__(layers=[TraceLayer(i, plan, row) for i in range(num_layers)])


@dataclass
class RowTrace:
    """One row's traces, unpadded (L real tokens): per traced layer keys / values [Hkv, L, D], targets
    {name: [Hkv, L]}, hidden [L, d] where kept."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    targets: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


def answer_queries(loss_mask: torch.Tensor) -> torch.Tensor | None:
    """[T] bool: the queries that produce an answer token (j with ``loss_mask[j + 1]``); None when the row has no
    targets."""
    aq = torch.zeros_like(loss_mask, dtype=torch.bool)
    aq[:-1] = loss_mask[1:].bool()
    return aq if bool(aq.any()) else None


@torch.no_grad()
def trace_row(model, input_ids: torch.Tensor, position_ids: torch.Tensor, loss_mask: torch.Tensor,
              plan: TracePlan, *, recon_ids: torch.Tensor | None = None) -> RowTrace:
    """Run the frozen ``model`` over one row (``input_ids`` / ``position_ids`` / ``loss_mask`` [L]) and return its
    traces. ``recon_ids`` [P]: the repeat prompt of the ``recon`` target (None = no second pass)."""
    handle = install_hooks(model)
    if handle.gates is not None and handle.enabled:
        raise ValueError("trace the frozen model: detach the gates or run inside `with model.trimkv.disabled():`")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    device = input_ids.device
    L = input_ids.shape[0]
    row = RowPlan(seg=packed_documents(position_ids),
                  answer_queries=answer_queries(loss_mask) if plan.answer else None)
    num_layers = len(attention_modules(model))
    cache = TraceCache(num_layers, plan, row)
    decoder(input_ids=input_ids[None], position_ids=position_ids[None], use_cache=True,
            **cache_kwargs(decoder, cache))
    if recon_ids is not None:
        if row.seg is not None:
            raise DataError("the 'recon' target reads one document per row; this row packs several (positions "
                            "restart inside it): trace with data.pack: false, or leave 'recon' out")
        P = recon_ids.shape[0]
        second = torch.cat([recon_ids.to(device), input_ids])
        row.repeat_queries = torch.cat([torch.zeros(P, dtype=torch.bool, device=device),
                                        torch.ones(L, dtype=torch.bool, device=device)])
        start = int(position_ids[-1]) + 1
        pos2 = torch.arange(start, start + P + L, device=device)
        decoder(input_ids=second[None], position_ids=pos2[None], use_cache=True, **cache_kwargs(decoder, cache))
    out = RowTrace()
    for layer in cache.layers:
        i = layer.layer_idx
        if layer.traced:
            out.keys[i], out.values[i] = layer.keys[0, :, :L], layer.values[0, :, :L]
            out.targets[i] = layer.targets
            if plan.answer and "answer" not in layer.targets:
                out.targets[i]["answer"] = torch.zeros_like(layer.targets["future"])
        if layer.hidden is not None:
            out.hidden[i] = layer.hidden
    return out
