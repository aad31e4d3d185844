"""StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): attention sinks + a window of the most recent tokens.

The rule is recency: a token scores its position (the newest scores highest), so once the sink tokens and the
most recent ones fill the budget, the oldest non-sink token goes. Run it with ``sink=4`` (the paper's four
sink tokens); the recent window is whatever the rest of the budget holds, so the cache's own ``window`` only
matters for ties and does not change the result.

Deviation: none in the kept set. StreamingLLM re-assigns positions inside the cache ("rolling" RoPE); here keys
keep the rotary positions they were computed with, as every other policy in this cache does.
"""
from __future__ import annotations

from .retention import RecencyPolicy


class StreamingPolicy(RecencyPolicy):
    """Keep sinks + the most recent tokens: TRIM-KV's scoring with every log beta = -1, i.e. ``pos - t``
    (newest highest), so the fused decode kernel applies."""

    name = "streaming"
