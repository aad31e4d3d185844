"""Training attention: time (forward + backward) and peak memory of reference vs chunked (vs triton / flex on GPU).

Shapes follow the default model (SmolLM2-135M: 9 query heads, 3 KV heads, head dim 64), batch 1, fp32 on CPU
(bf16 on GPU), gradients for q, k, v and logb. Each point runs in a fresh subprocess on CPU so that its peak
resident memory (VmHWM minus the resident size once the inputs exist) belongs to that point alone; on GPU the peak
is torch.cuda.max_memory_allocated minus the inputs.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import torch

try:
    from . import common
except ImportError:  # python bench/attention.py
    import common


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_point(impl: str, T: int, H: int, Hkv: int, D: int, device: str, repeat: int) -> dict:
    """Time and peak extra memory of forward + backward of one impl at length T (in this process)."""
    from trimkv.attention import retention_attention

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if T > 16:  # warm up libraries and lazily initialised state on a tiny input, so the peak below is the point's
        run_point(impl, 16, H, Hkv, D, device, 1)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, H, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    k = torch.randn(1, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    v = torch.randn(1, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
    logb = (-0.01 * torch.rand(1, Hkv, T, device=device, generator=g)).requires_grad_(True)
    pos = torch.arange(T, device=device)[None]
    dout = torch.randn(1, H, T, D, device=device, dtype=dtype, generator=g)

    def fwd_bwd():
        out = retention_attention(q, k, v, logb, scaling=1 / math.sqrt(D), q_pos=pos, k_pos=pos, impl=impl)
        torch.autograd.grad(out, (q, k, v, logb), dout)

    if device.startswith("cuda"):
        fwd_bwd()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        sec = common.timeit(fwd_bwd, repeat=repeat, warmup=0, device=device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_kb("VmRSS")
        t0 = time.perf_counter()
        fwd_bwd()  # the first run alone sets the peak; later runs reuse freed memory
        first = time.perf_counter() - t0
        peak = (_rss_kb("VmHWM") - base) * 1024
        sec = min(first, common.timeit(fwd_bwd, repeat=repeat - 1, warmup=0)) if repeat > 1 else first
    return {"impl": impl, "T": T, "seconds": sec, "peak_MB": peak / 2**20}


def point(impl, T, H, Hkv, D, device, repeat) -> dict:
    if device.startswith("cuda"):
        return run_point(impl, T, H, Hkv, D, device, repeat)
    code = ("import json,sys; from bench.attention import run_point; "
            f"print('RESULT', json.dumps(run_point({impl!r}, {T}, {H}, {Hkv}, {D}, 'cpu', {repeat})))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if torch.get_num_threads():
        env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{impl} at T={T} failed:\n{res.stderr[-2000:]}")


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default: CPU 1k 2k 4k, GPU 2k-16k")
    p.add_argument("--impls", nargs="+", default=None, help="default: reference chunked (+ triton flex on GPU)")
    p.add_argument("--heads", type=int, nargs=3, default=(9, 3, 64), metavar=("H", "HKV", "D"))
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--max-reference", type=int, default=None, help="skip the reference above this T "
                                                                   "(default 4096 CPU, 8192 GPU)")
    p.add_argument("--max-chunked", type=int, default=None, help="skip the PyTorch chunked path above this T "
                                                                 "(default: none; it takes ~10 s at 16k on a GPU)")
    args = p.parse_args(argv)
    common.setup(args)
    gpu = args.device.startswith("cuda")
    lengths = args.lengths or ([64, 128] if args.quick else [2048, 4096, 8192, 16384] if gpu else [1024, 2048, 4096])
    impls = args.impls or (["reference", "chunked"] + (["triton", "flex"] if gpu else []))
    repeat = args.repeat or (1 if args.quick else 3)
    max_ref = args.max_reference or (8192 if gpu else 4096)
    H, Hkv, D = args.heads
    rows, by = [], {}
    for T in lengths:
        for impl in impls:
            if (impl == "reference" and T > max_ref) or (impl == "chunked" and T > (args.max_chunked or T)):
                continue
            r = point(impl, T, H, Hkv, D, args.device, repeat)
            by[(impl, T)] = r
            ref = by.get(("reference", T))
            rows.append({**r, "time_vs_ref": r["seconds"] / ref["seconds"] if ref else None,
                         "mem_vs_ref": r["peak_MB"] / ref["peak_MB"] if ref and ref["peak_MB"] > 0 else None})
    title = (f"training attention fwd+bwd, B=1 H={H} Hkv={Hkv} D={D} on {args.device} "
             "(peak = extra memory over the inputs)")
    return common.finish(args, "attention", rows, title)


if __name__ == "__main__":
    main()
