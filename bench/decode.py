"""Decode throughput at fixed memory: compiled bounded vs eager bounded vs DynamicCache vs StaticCache compiled.

Four ways to decode, side by side in one run, each timing the same greedy step (``trimkv.serve.decode.decode_step``):
  * eager:    gates attached, a RetentionCache of M tokens per KV head, the eager step;
  * compiled: the same cache and step under torch.compile (``trimkv.serve.CompiledDecoder``; CUDA graphs on GPU);
  * full:     the plain model (original attention, no gates; a copy of the gated one) with transformers' DynamicCache
              holding the context;
  * static:   the plain model with transformers' StaticCache, compiled the same way (the strongest plain baseline).
At each context length L, two batch settings: ``1`` (one row each) and ``max`` (each cache gets the most rows whose
KV bytes fit ``--kv-limit-mb``, capped at ``--max-batch``: a bounded row costs M slots whatever L is, a full row L).
Prefill is not measured: caches are filled directly with random keys / values of the right shapes (L tokens for the
full caches, M kept tokens at random positions < L for the bounded one); then ``--steps`` decode steps are timed
after ``--warmup`` steps (which compile, and record the CUDA graph). tok/s counts every row; ratios are
compiled-bounded tok/s over each other column's, in the same setting.

``--check-tokens N``: the compiled decode must give the eager decode's tokens. One random prompt of
``--check-context`` tokens is prefilled into a bounded cache and decoded greedily for N steps twice, with the eager
step and with the compiled one (end-of-sequence ignored); the JSON gets the number of steps that agree, the first
that does not, and the eager step's top-1 minus top-2 logit there (a difference at a near-tie of random bf16 weights
is rounding, not a bug: compare with ``smallest_eager_margin``).
"""
from __future__ import annotations

import copy
import sys
import time

import torch
from transformers import DynamicCache, StaticCache

from trimkv.attach import LayerInputs, attach_gates
from trimkv.compat import cache_name
from trimkv.serve import RetentionCache, kv_nbytes, make_cache
from trimkv.serve import gates_for, prefill
from trimkv.serve.decode import CompiledDecoder, DecodeState, compiled_step, decode_step, graphs_compiled

try:
    from . import common
except ImportError:  # python bench/decode.py
    import common

METHODS = ("eager", "compiled", "full", "static")


def kv_shape(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads or heads, getattr(cfg, "head_dim", None) or \
        cfg.hidden_size // heads


def row_bytes(cfg, dtype, tokens: int, *, bounded: bool) -> int:
    """KV bytes of one batch row holding ``tokens`` per KV head (bounded: + 12 bytes of slot metadata each)."""
    n, hkv, d = kv_shape(cfg)
    per_token = 2 * d * torch.finfo(dtype).bits // 8 + (12 if bounded else 0)
    return n * hkv * tokens * per_token


def full_cache(cfg, L: int, dtype, device, batch: int = 1) -> DynamicCache:
    n, hkv, d = kv_shape(cfg)
    cache = DynamicCache(config=cfg)
    for layer in range(n):
        cache.update(torch.randn(batch, hkv, L, d, dtype=dtype, device=device),
                     torch.randn(batch, hkv, L, d, dtype=dtype, device=device), layer)
    return cache


def static_cache(cfg, L: int, room: int, dtype, device, batch: int = 1) -> StaticCache:
    """A StaticCache of L + ``room`` slots holding L random tokens (what a compiled transformers decode uses)."""
    n, hkv, d = kv_shape(cfg)
    cache = StaticCache(config=cfg, max_cache_len=L + room)
    for layer in range(n):
        cache.update(torch.randn(batch, hkv, L, d, dtype=dtype, device=device),
                     torch.randn(batch, hkv, L, d, dtype=dtype, device=device), layer)
    return cache


def bounded_cache(model, cfg, L: int, M: int, dtype, device, *, sink=4, window=16, batch: int = 1,
                  policy="trimkv") -> RetentionCache:
    """A RetentionCache of ``policy`` (a name or a policy object) as after L tokens: M kept tokens per head (the first
    ``sink``, the last ``window``, the rest at random positions), filled through the layer interface (one chunk,
    then compaction; TRIM-KV reads the staged random log beta, other policies score the keys themselves)."""
    n, hkv, d = kv_shape(cfg)
    cache = make_cache(model, policy, M, sink=sink, window=window)
    m = min(M, L)
    middle = torch.randperm(L - sink - window)[: m - sink - window] + sink
    pos = torch.cat([torch.arange(sink), middle.sort().values, torch.arange(L - window, L)])[None].to(device)
    pos = pos.expand(batch, m)
    for layer in cache.layers:
        layer.stage(LayerInputs(pos=pos, valid=torch.ones(batch, m, dtype=torch.bool, device=device),
                                logb=-0.01 * torch.rand(batch, hkv, m, device=device)))
        k = torch.randn(batch, hkv, m, d, dtype=dtype, device=device)
        layer.update(k, k)
        layer.insert(k, torch.randn_like(k))
        layer.compact()
    return cache


def start_state(model, L: int, batch: int, device) -> DecodeState:
    """Random tokens at position L, never done."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    return DecodeState(ids=ids, pos=torch.full((batch, 1), L, device=device),
                       done=torch.zeros(batch, dtype=torch.bool, device=device),
                       eos=torch.zeros(0, dtype=torch.long, device=device),
                       pad=torch.zeros((), dtype=torch.long, device=device))


@torch.no_grad()
def step_seconds(step, steps: int, warmup: int, device) -> tuple[float, int]:
    """(median seconds of ``step()``, graphs compiled during the timed steps)."""
    for _ in range(warmup):
        step()
    graphs = graphs_compiled()
    seconds = common.timeit(step, repeat=steps, warmup=0, device=device)
    return seconds, graphs_compiled() - graphs


@torch.no_grad()
def decode_seconds(model, cache, L: int, steps: int, device, *, batch: int = 1) -> float:
    """Median seconds per eager decode step (one token per row) continuing from position L."""
    state, arg = start_state(model, L, batch, device), cache_name(model)
    return step_seconds(lambda: decode_step(model, arg, cache, state), steps, 2, device)[0]


def measure(method: str, model, cfg, L: int, B: int, args, dtype) -> dict:
    """tok/s (all rows), KV MB and recompilations of one method at context L with B rows."""
    if B < 1:
        return {"tok_s": None, "kv_MB": None, "recompiles": 0}
    dev, M, room = args.device, args.budget, args.warmup + args.steps + 1
    if method in ("eager", "compiled"):
        cache = bounded_cache(model, cfg, L, M, dtype, dev, batch=B)
        nbytes = cache.nbytes()
    else:
        cache = full_cache(cfg, L, dtype, dev, B) if method == "full" else static_cache(cfg, L, room, dtype, dev, B)
        nbytes = kv_nbytes(cache)
    state, arg = start_state(model, L, B, dev), cache_name(model)
    if method == "compiled":
        decoder = CompiledDecoder(model, cache, mode=args.mode, backend=args.backend)
        state = decoder.adopt(state)
        step = lambda: decoder.step(state)  # noqa: E731
    elif method == "static":                             # StaticCache marks its own buffers static
        compiled = compiled_step(args.mode, args.backend)

        def step():
            torch.compiler.cudagraph_mark_step_begin()
            compiled(model, arg, cache, state)
    else:
        step = lambda: decode_step(model, arg, cache, state)  # noqa: E731
    seconds, recompiles = step_seconds(step, args.steps, args.warmup, dev)
    return {"tok_s": B / seconds, "kv_MB": nbytes / 2**20, "recompiles": recompiles}


@torch.no_grad()
def token_check(gated, cfg, args) -> dict:
    """Greedy tokens of the eager and the compiled bounded decode from one random prompt (see the docstring). Checked
    on CPU (inductor and eager backends); the CUDA-graph comparison is make gpu-verify's, not yet run (issue 24)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, args.check_context), generator=g).to(args.device)
    n, arg = args.check_tokens, cache_name(gated)
    runs, margins = {}, []
    for method in ("eager", "compiled"):
        cache = make_cache(gated, "trimkv", args.budget, sink=4, window=16)
        if method == "compiled":
            out = CompiledDecoder(gated, cache, mode=args.mode, backend=args.backend).generate(
                ids, max_new_tokens=n, eos_token_id=[])[:, ids.shape[1]:]
        else:                                    # decode_step's greedy step, written out to see the logits
            logits, pos = prefill(gated, ids, cache, chunk=256)
            nxt, steps = logits.argmax(-1, keepdim=True), []
            for k in range(n):
                top2 = logits.float().topk(2, dim=-1).values[0]
                margins.append(float(top2[0] - top2[1]))   # how far the eager step is from a tie
                steps.append(nxt)
                with gates_for(gated, cache):
                    out = gated(input_ids=nxt, position_ids=pos[:, -1:] + 1 + k, use_cache=True, **{arg: cache})
                logits = out.logits[:, -1]
                nxt = logits.argmax(-1, keepdim=True)
            out = torch.cat(steps, dim=1)
        runs[method] = out.cpu()
    differ = (runs["eager"] != runs["compiled"])[0].nonzero()
    first = None if len(differ) == 0 else int(differ[0])
    return {"context": args.check_context, "steps": n, "same_steps": int((runs["eager"] == runs["compiled"]).sum()),
            "first_difference": first, "eager_margin_there": None if first is None else margins[first],
            "smallest_eager_margin": min(margins)}


def max_rows(cfg, dtype, L: int, args) -> dict[str, int]:
    """The most rows of each cache whose KV bytes fit the limit (capped at --max-batch)."""
    limit = args.kv_limit_mb * 2**20
    per_row = {"eager": row_bytes(cfg, dtype, args.budget, bounded=True),
               "full": row_bytes(cfg, dtype, L, bounded=False),
               "static": row_bytes(cfg, dtype, L + args.warmup + args.steps + 1, bounded=False)}
    per_row["compiled"] = per_row["eager"]
    return {m: min(int(limit // b), args.max_batch) for m, b in per_row.items()}


def ratio(a, b):
    return a / b if a and b else None


def table_rows(res: dict, lengths, rows_of, methods) -> list[dict]:
    out = []
    for L in lengths:
        for setting in ("1", "max"):
            r = {m: res.get((L, setting, m), {}) for m in methods}
            tok = {m: r[m].get("tok_s") for m in methods}
            c = tok.get("compiled")
            out.append({"context": L, "batch": setting,
                        **{f"rows_{m}": rows_of[L][setting][m] for m in ("eager", "full", "static")},
                        **{f"{m}_tok_s": tok.get(m) for m in METHODS},
                        "compiled_vs_eager": ratio(c, tok.get("eager")),
                        "compiled_vs_full": ratio(c, tok.get("full")),
                        "compiled_vs_static": ratio(c, tok.get("static")),
                        "eager_vs_full": ratio(tok.get("eager"), tok.get("full")),
                        "bounded_kv_MB": (r.get("eager") or r.get("compiled") or {}).get("kv_MB"),
                        "full_kv_MB": (r.get("full") or r.get("static") or {}).get("kv_MB")})
    return out


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="context lengths (default: CPU 1k-8k, "
                                                                          "GPU 1k-32k)")
    p.add_argument("--budget", type=int, default=None, help="M tokens per KV head (default 512; 32 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per point (default 16)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, CUDA-graph recording)")
    p.add_argument("--kv-limit-mb", type=float, default=None,
                   help="KV memory for the max-batch setting (default: CPU 1024, GPU 8192; 0.0625 with --quick)")
    p.add_argument("--max-batch", type=int, default=None, help="cap on rows (default: CPU 32, GPU 256, quick 4)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--mode", default="auto", help="torch.compile mode ('auto': reduce-overhead on CUDA)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; eager with --quick: "
                                                    "graph capture only, fast)")
    p.add_argument("--check-tokens", type=int, default=0, metavar="N",
                   help="also check that N compiled decode steps give the eager steps' tokens (0: no check)")
    p.add_argument("--check-context", type=int, default=None, help="prompt tokens of the check (default 1024; "
                                                                     "64 with --quick)")
    args = p.parse_args(argv)
    common.setup(args)
    gpu = args.device.startswith("cuda")
    lengths = args.lengths or ([64] if args.quick else [1024, 4096, 16384, 32768] if gpu else [1024, 2048, 4096, 8192])
    args.budget = args.budget or (32 if args.quick else 512)
    args.steps = args.steps or (3 if args.quick else 16)
    args.kv_limit_mb = args.kv_limit_mb or (0.0625 if args.quick else 8192 if gpu else 1024)
    args.max_batch = args.max_batch or (4 if args.quick else 256 if gpu else 32)
    args.backend = args.backend or ("eager" if args.quick else "inductor")
    if args.mode == "auto":                              # what CompiledDecoder picks, for both compiled columns
        args.mode = "reduce-overhead" if gpu and args.backend == "inductor" else None
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)   # a graph per shape
    model, cfg = common.load(args)
    dtype = next(model.parameters()).dtype
    gated = None
    if {"eager", "compiled"} & set(args.methods) or args.check_tokens:   # a gated copy: cells run back to back
        gated = copy.deepcopy(model)
        attach_gates(gated, bias_init=4.0)           # beta ~ 0.98, spread by the input: no near-ties in eviction
    rows_of = {L: {"1": dict.fromkeys(METHODS, 1), "max": max_rows(cfg, dtype, L, args)} for L in lengths}
    res: dict = {}
    todo = [(L, setting, m) for L in lengths for setting in ("1", "max") for m in args.methods]
    for i, (L, setting, m) in enumerate(todo, 1):     # a cell compiles for minutes on a CPU: say what runs
        net = gated if m in ("eager", "compiled") else model
        B = rows_of[L][setting][m]
        t0 = time.perf_counter()
        res[L, setting, m] = r = measure(m, net, cfg, L, B, args, dtype)
        tok = "-" if r["tok_s"] is None else f"{r['tok_s']:.1f} tok/s"
        print(f"[{i}/{len(todo)}] context {L}, {B} rows, {m}: {tok} ({time.perf_counter() - t0:.0f} s with warm-up)",
              file=sys.stderr, flush=True)
    rows = table_rows(res, lengths, rows_of, args.methods)
    title = (f"decode, {type(model).__name__} on {args.device}, bounded M={args.budget}/head, max batch under "
             f"{args.kv_limit_mb:g} MB of KV (<= {args.max_batch} rows); compile: {args.backend}, mode {args.mode}")
    bounded_mb = {r["bounded_kv_MB"] for r in rows if r["batch"] == "1" and r["bounded_kv_MB"] is not None}
    extra = {"bounded_kv_bytes_constant": len(bounded_mb) <= 1,
             "compiled_recompiles_after_warmup": sum(v["recompiles"] for k, v in res.items() if k[2] == "compiled")}
    if args.check_tokens:
        args.check_context = args.check_context or (64 if args.quick else 1024)
        extra["tokens_vs_eager"] = token_check(gated, cfg, args)
    return common.finish(args, "decode", rows, title, extra)


if __name__ == "__main__":
    main()
