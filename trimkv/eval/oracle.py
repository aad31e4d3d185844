"""Needle oracle: an upper bound for diagnosis, not a method. It is told which prompt positions hold the needle
sentences (the tokens the answer is in) and keeps them; every other slot goes to the most recent tokens.

It is TRIM-KV with perfect gates: log beta = 0 (never decays) on the needle, -1 (recency) everywhere else, so it
runs through the same scoring and fused decode step as the learned gates. If a task fails under the oracle at
budget M, no scoring rule can pass it at M with this model and cache schedule; if the oracle passes and a policy
fails, the policy kept the wrong tokens. The eval harness runs it as policy ``"oracle"`` for tasks with needles in a
haystack (it reads the needle sentences from the sample).

Tie: the newest token also scores 0; the cache's recent ``window`` protects it, so with ``window >= 1`` and a
budget above sink + window + needle the needle is always kept.
"""
from __future__ import annotations

import re

import torch

from trimkv.serve.policies import RecencyPolicy


class NeedleOraclePolicy(RecencyPolicy):
    name = "oracle"

    def __init__(self, keep_positions):
        super().__init__()
        self.keep = torch.as_tensor(keep_positions, dtype=torch.long).flatten()

    @classmethod
    def for_prompt(cls, *, sample=None, prompt: str | None = None, tokenizer=None, **context) -> "NeedleOraclePolicy":
        if sample is None or prompt is None or tokenizer is None:
            raise ValueError("policy 'oracle' needs keep_positions (the needle tokens' prompt positions), or the "
                             "sample, prompt and tokenizer to find them")
        return cls(needle_positions(sample, prompt, tokenizer))

    def new_state(self, new):
        recency = super().new_state(new)                                       # log beta -1 for every token
        return recency.masked_fill(torch.isin(new.pos, self.keep.to(new.pos.device)), 0.0)

    def __repr__(self) -> str:
        return f"NeedleOraclePolicy({self.keep.numel()} positions)"


def needle_positions(sample, prompt: str, tokenizer) -> list[int]:
    """Token positions of ``prompt`` that overlap a needle sentence of ``sample``."""
    needles = sample.metadata.get("needles")
    if not needles:
        raise ValueError(f"task {sample.task!r} has no needles in a haystack: the 'oracle' policy only applies to "
                         "passkey, multikey_needle and multivalue_needle")
    spans = [(m.start(), m.end()) for n in needles for m in re.finditer(re.escape(n), prompt)]
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offsets) if any(a < e and b > s for s, e in spans)]
