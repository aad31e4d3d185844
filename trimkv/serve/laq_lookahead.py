"""LAQ's pseudo lookahead decoding (stages 1-2 of Lookahead Q-Cache, arXiv 2505.20334): the part of LAQ that drives
the model, above the policies it builds.

:class:`~trimkv.serve.policies.laq.LAQPolicy` scores prompt tokens by the queries of a few pseudo decoded tokens;
:meth:`LookaheadLAQ.lookahead` makes those queries for a prompt (a chunked prefill into a SnapKV cache of the same
budget, then ``n`` greedy steps that record every layer's query), and :meth:`LookaheadLAQ.for_prompt` is how the
evaluation harness builds LAQ for each prompt. The method and its deviations are in :mod:`.policies.laq`.
"""
from __future__ import annotations

import torch

from ..base_model import input_device
from ..compat import cache_kwargs
from .factory import gates_for, make_cache
from .generation import prefill
from .policies.laq import LAQPolicy, QueryRecorder


class LookaheadLAQ(LAQPolicy):
    """LAQ built for one prompt: with the model, the prompt and the cache settings, the full method; without them,
    stage 1 alone (SnapKV, with a warning at its first prefill)."""

    @classmethod
    def for_prompt(cls, *, model=None, prompt: str | None = None, tokenizer=None, budget: int | None = None,
                   sink: int = 4, window: int = 16, prefill_chunk: int = 256, **context) -> LAQPolicy:
        """With the model, the prompt and the cache's budget (the evaluation harness passes them): the full method
        (pseudo lookahead queries of this prompt); without: stage 1 alone (see the module docstring)."""
        if model is None or prompt is None or tokenizer is None or budget is None:
            return cls()
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(input_device(model))
        return cls.lookahead(model, ids, budget=budget, sink=sink, window=window, chunk=prefill_chunk)

    @classmethod
    @torch.no_grad()
    def lookahead(cls, model, ids: torch.Tensor, *, budget: int, sink: int = 4, window: int = 16, chunk: int = 256,
                  attention_mask: torch.Tensor | None = None, n: int = 8, local_window: int = 8,
                  stage1_window: int = 32, kernel: int = 7, pooling: str = "max") -> LAQPolicy:
        """Stages 1-2 for the prompts ids [B, T]: prefill them into a SnapKV cache of ``budget`` tokens per KV head
        (``sink`` / ``window`` protected, ``chunk`` tokens per forward), decode ``n`` tokens greedily and return the
        policy holding every layer's queries of those tokens. Use it in a fresh cache of the same budget for the
        same rows."""
        if n < 1:
            raise ValueError(f"LAQ needs n >= 1 pseudo decoded tokens, got {n}")
        recorder = QueryRecorder(obs_window=stage1_window, kernel=kernel, pooling=pooling)
        cache = make_cache(model, recorder, budget, sink=sink, window=window)
        logits, pos = prefill(model, ids, cache, attention_mask=attention_mask, chunk=chunk)
        if logits is None:
            raise ValueError("LAQ needs a prompt of at least one token")
        token, step_pos = logits.argmax(-1, keepdim=True), pos[:, -1:] + 1                 # [B, 1] each
        mask = None if attention_mask is None else attention_mask.to(ids.device)
        kwargs = cache_kwargs(model, cache)
        recorder.recording = True
        with gates_for(model, cache):
            for _ in range(n):
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                logits = model(input_ids=token, attention_mask=mask, position_ids=step_pos, use_cache=True,
                               **kwargs).logits[:, -1]
                token, step_pos = logits.argmax(-1, keepdim=True), step_pos + 1
        layers = sorted(recorder.seen)
        queries = torch.stack([torch.cat(recorder.seen[i], dim=2) for i in layers])         # [L, B, Hq, n, D]
        query_pos = torch.cat(recorder.seen_pos, dim=1)[:, :n]                             # [B, n] (layer 0's)
        return cls(queries, query_pos, local_window=local_window, stage1_window=stage1_window, kernel=kernel,
                   pooling=pooling)


__all__ = ["LookaheadLAQ"]
