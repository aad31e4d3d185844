"""KVP (Moschella, Manduchi, Sener, "Learning to Evict from Key-Value Cache", arXiv 2602.10238): a learned ranker per
(layer, KV head) scores each token from its key, value and position; the lowest score goes.

The score is query-independent and static, so it is computed once, when the token enters the cache
(:meth:`new_state`: one small MLP per head, batched over heads, :class:`trimkv.kvp.KVPRankers`), and kept as the
slot's state; eviction is then the base policy's argmin over states (no attention weights, no host sync, the same in
eager, batched, compiled decode and chunked prefill).

Deviations: the paper compresses the cache once, after prefill; here the ranking also decides every decode-step
eviction (the newcomer always enters, the lowest-ranked kept token goes), and chunked prefill keeps the best
``budget`` of each chunk's [kept + chunk] candidates. Sink and recent-window tokens are protected by the cache (the
paper always keeps the first 4 and last 16). The scores of different heads are not comparable, so KVP serves the
per-head cache only (no global pool).
"""
from __future__ import annotations

import copy

import torch

from ...errors import CacheError
from .base import EvictionPolicy, NewTokens

MISSING = ("policy 'kvp' needs trained KVP rankers: pass them with --kvp CKPT on the command line, kvp=<folder> to "
           "trimkv.eval.run_eval, or build KVPPolicy(trimkv.kvp.load_rankers(CKPT, model)); train them with "
           "`trimkv kvp train --store TRACES --out CKPT`")


class KVPPolicy(EvictionPolicy):
    name = "kvp"
    uses_rankers = True      # the command line and the harness pass --kvp rankers to this policy

    def __init__(self, rankers=None):
        if rankers is None:
            raise CacheError(MISSING)
        self.rankers = rankers
        self._copies: dict[torch.device, object] = {}

    @classmethod
    def for_prompt(cls, *, kvp=None, **context) -> "KVPPolicy":
        return cls(kvp)

    def _on(self, device: torch.device):
        """The rankers on ``device`` (a model split over devices scores each layer where it runs)."""
        r = self._copies.get(device)
        if r is None:
            r = self._copies[device] = self.rankers if self.rankers.w1.device == device else \
                copy.deepcopy(self.rankers).to(device)       # Module.to moves in place: copy first
        return r

    def new_state(self, new: NewTokens) -> torch.Tensor:
        with torch.no_grad():
            return self._on(new.keys.device).score(new.layer_idx, new.keys, new.values, new.pos)

    def __repr__(self) -> str:
        return f"KVPPolicy({self.rankers.fingerprint()})"
