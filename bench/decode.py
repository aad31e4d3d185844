"""Decode tokens/s and KV bytes vs context length: the bounded RetentionCache vs transformers' DynamicCache.

Both caches are measured side by side in one run, at each context length L:
  * full:    the plain model (original attention, no gates) decoding with a DynamicCache holding L tokens;
  * bounded: the same model with gates attached decoding with a RetentionCache of M tokens per KV head.
Prefill is not what is measured, so each cache is filled directly with random keys / values of the right shapes
(L tokens for the full cache; M kept tokens at random positions < L for the bounded one); then ``--steps`` decode
steps (one token, batch 1) are timed. KV bytes are what each cache holds at that point.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from trimkv.attach import attach_gates
from trimkv.cache import RetentionCache, dynamic_cache_nbytes
from trimkv.compat import cache_kwargs

try:
    from . import common
except ImportError:  # python bench/decode.py
    import common


def kv_shape(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads or heads, getattr(cfg, "head_dim", None) or \
        cfg.hidden_size // heads


def full_cache(cfg, L: int, dtype, device) -> DynamicCache:
    n, hkv, d = kv_shape(cfg)
    cache = DynamicCache(config=cfg)
    for layer in range(n):
        cache.update(torch.randn(1, hkv, L, d, dtype=dtype, device=device),
                     torch.randn(1, hkv, L, d, dtype=dtype, device=device), layer)
    return cache


def bounded_cache(model, cfg, L: int, M: int, dtype, device, *, sink=4, window=16) -> RetentionCache:
    """A RetentionCache as after L tokens: M kept tokens per head (the first ``sink``, the last ``window``,
    the rest at random positions), filled through the layer interface (one chunk, then compaction)."""
    n, hkv, d = kv_shape(cfg)
    cache = RetentionCache.for_model(model, M, sink=sink, window=window)
    m = min(M, L)
    middle = torch.randperm(L - sink - window)[: m - sink - window] + sink
    pos = torch.cat([torch.arange(sink), middle.sort().values, torch.arange(L - window, L)])[None].to(device)
    for layer in cache.layers:
        layer.stage(logb=-0.01 * torch.rand(1, hkv, m, device=device), pos=pos,
                    valid=torch.ones(1, m, dtype=torch.bool, device=device))
        k = torch.randn(1, hkv, m, d, dtype=dtype, device=device)
        layer.update(k, k)
        layer.insert(k, torch.randn_like(k))
        layer.compact()
    return cache


@torch.no_grad()
def decode_seconds(model, cache, L: int, steps: int, device) -> float:
    """Median seconds per decode step (one token) continuing from position L."""
    tok = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    state = {"t": L}

    def step():
        pos = torch.tensor([[state["t"]]], device=device)
        model(input_ids=tok, position_ids=pos, **cache_kwargs(model, cache), use_cache=True)
        state["t"] += 1

    return common.timeit(step, repeat=steps, warmup=2, device=device)


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="context lengths (default: CPU 1k-8k, "
                                                                          "GPU 1k-32k)")
    p.add_argument("--budget", type=int, default=None, help="M tokens per KV head (default 512; 32 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per point (default 16)")
    args = p.parse_args(argv)
    common.setup(args)
    gpu = args.device.startswith("cuda")
    lengths = args.lengths or ([64, 128] if args.quick else
                               [1024, 4096, 16384, 32768] if gpu else [1024, 2048, 4096, 8192])
    M = args.budget or (32 if args.quick else 512)
    steps = args.steps or (3 if args.quick else 16)
    model, cfg = common.load(args)
    dtype = next(model.parameters()).dtype
    rows = []
    for L in lengths:
        full = full_cache(cfg, L, dtype, args.device)
        t_full = decode_seconds(model, full, L, steps, args.device)
        full_bytes = dynamic_cache_nbytes(full)
        del full
        handle = attach_gates(model)
        bounded = bounded_cache(model, cfg, L, M, dtype, args.device)
        t_b = decode_seconds(model, bounded, L, steps, args.device)
        handle.detach()
        rows.append({"context": L, "budget_M": M, "full_tok_s": 1 / t_full, "bounded_tok_s": 1 / t_b,
                     "speedup": t_full / t_b, "full_kv_MB": full_bytes / 2**20,
                     "bounded_kv_MB": bounded.nbytes() / 2**20, "kv_ratio": bounded.nbytes() / full_bytes})
    title = (f"decode, batch 1, {type(model).__name__} on {args.device}: bounded RetentionCache (M={M}/head) vs "
             "DynamicCache, side by side")
    flat = len({r["bounded_kv_MB"] for r in rows}) == 1
    return common.finish(args, "decode", rows, title, {"bounded_kv_bytes_constant": flat})


if __name__ == "__main__":
    main()
