"""KVP score overhead: the rankers' score of the entering token (all layers) as a fraction of a decode step, M = 512.

Side by side in one run, on the same model and cache shapes (a bounded cache as after 2M tokens, full, so every step
evicts):

* ``decode_kvp_ms``      - an eager decode step with the ``kvp`` policy (the score runs inside it, in new_state);
* ``decode_base_ms``     - the same step with ``streaming`` (state = 0: no score at all);
* ``score_ms``           - the KVP score alone: ``rankers.score`` of one token for every layer, timed on its own;
* ``fraction_pct``       - score_ms / decode_kvp_ms (target <= 5%); ``step_delta_pct`` - (kvp - base) / base.

The rankers have the default training shape (hidden 64) with random weights: the cost does not depend on the values.
``--kvp CKPT`` times trained ones instead.
"""
from __future__ import annotations

import torch

from trimkv.kvp import KVPConfig, KVPRankers, load_rankers
from trimkv.serve.policies import KVPPolicy

try:
    from . import common
    from .decode import bounded_cache, decode_seconds, kv_shape
except ImportError:  # python bench/kvp.py
    import common
    from decode import bounded_cache, decode_seconds, kv_shape


@torch.no_grad()
def score_seconds(rankers: KVPRankers, n_layers: int, hkv: int, d: int, dtype, device, repeat: int) -> float:
    """Median seconds of one token's score in every layer (what a decode step adds)."""
    k = torch.randn(1, hkv, 1, d, dtype=dtype, device=device)
    pos = torch.full((1, hkv, 1), 1000, device=device)
    return common.timeit(lambda: [rankers.score(l, k, k, pos) for l in range(n_layers)], repeat=repeat, warmup=3,
                         device=device)


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    common.add_decode_args(p)
    p.add_argument("--kvp", default=None, help="a trained ranker checkpoint (default: random rankers, hidden 64)")
    args = p.parse_args(argv)
    M, steps, model, cfg, dtype = common.decode_setup(args)
    n, hkv, d = kv_shape(cfg)
    rankers = load_rankers(args.kvp, model) if args.kvp else KVPRankers(KVPConfig.for_model(cfg), seed=0)
    rankers = rankers.to(args.device)
    def step_seconds(policy) -> float:
        cache = bounded_cache(model, cfg, 2 * M, M, dtype, args.device, policy=policy)
        return decode_seconds(model, cache, 2 * M, steps, args.device)

    t_kvp, t_base = step_seconds(KVPPolicy(rankers)), step_seconds("streaming")
    t_score = score_seconds(rankers, n, hkv, d, dtype, args.device, steps)
    rows = [{"budget_M": M, "layers": n, "kv_heads": hkv, "hidden": rankers.config.hidden,
             "decode_kvp_ms": 1e3 * t_kvp, "decode_base_ms": 1e3 * t_base, "score_ms": 1e3 * t_score,
             "per_layer_us": 1e6 * t_score / n, "fraction_pct": 100 * t_score / t_kvp,
             "step_delta_pct": 100 * (t_kvp - t_base) / t_base}]
    title = f"KVP score vs a bounded decode step, {type(model).__name__} on {args.device} (target <= 5%)"
    return common.finish(args, "kvp", rows, title)


if __name__ == "__main__":
    main()
