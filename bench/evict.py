"""Eviction overhead: time of the fused append+evict (all layers) as a fraction of a whole decode step.

The decode step is a bounded-cache decode step of the model (gates attached, RetentionCache with M tokens per KV
head, full, so every step evicts). The append+evict time is ``append_evict_`` called once per layer on buffers of
the same shapes, timed on its own; the fraction is (layers x one call) / one decode step.
"""
from __future__ import annotations

import torch

from trimkv.attach import attach_gates
from trimkv.serve.policies.retention import append_evict_

try:
    from . import common
    from .decode import bounded_cache, decode_seconds, kv_shape
except ImportError:  # python bench/evict.py
    import common
    from decode import bounded_cache, decode_seconds, kv_shape


def evict_seconds(n_layers, hkv, d, M, dtype, device, backend: str, repeat: int) -> float:
    """Median seconds of one append+evict per layer, for all layers (one decode step's worth)."""
    bufs = []
    for _ in range(n_layers):
        bufs.append((torch.randn(1, hkv, M, d, dtype=dtype, device=device),
                     torch.randn(1, hkv, M, d, dtype=dtype, device=device),
                     torch.randperm(4 * M, device=device)[:M].view(1, 1, M).repeat(1, hkv, 1).contiguous(),
                     -torch.rand(1, hkv, M, device=device)))
    k = torch.randn(1, hkv, 1, d, dtype=dtype, device=device)
    state = {"t": 4 * M}

    def step():
        t = torch.tensor([state["t"]], device=device)
        pos_new = t.view(1, 1, 1).expand(1, hkv, 1)
        logb_new = torch.full((1, hkv, 1), -0.5, device=device)
        for kb, vb, pb, lb in bufs:
            append_evict_(kb, vb, pb, lb, k, k, pos_new, logb_new, t, sink=4, window=16, backend=backend,
                          return_victim=False)   # as the cache calls it
        state["t"] += 1

    return common.timeit(step, repeat=repeat, warmup=3, device=device)


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    common.add_decode_args(p)
    args = p.parse_args(argv)
    M, steps, model, cfg, dtype = common.decode_setup(args)
    n, hkv, d = kv_shape(cfg)
    handle = attach_gates(model)
    cache = bounded_cache(model, cfg, 2 * M, M, dtype, args.device)
    t_step = decode_seconds(model, cache, 2 * M, steps, args.device)
    handle.detach()
    backends = ["torch"] + (["triton"] if args.device.startswith("cuda") else [])
    rows = []
    for backend in backends:
        t_ev = evict_seconds(n, hkv, d, M, dtype, args.device, backend, steps)
        rows.append({"backend": backend, "budget_M": M, "layers": n, "kv_heads": hkv,
                     "decode_step_ms": 1e3 * t_step, "append_evict_ms": 1e3 * t_ev,
                     "per_layer_us": 1e6 * t_ev / n, "fraction_pct": 100 * t_ev / t_step})
    title = f"append+evict vs a bounded decode step, {type(model).__name__} on {args.device} (target <= 3%)"
    return common.finish(args, "evict", rows, title)


if __name__ == "__main__":
    main()
