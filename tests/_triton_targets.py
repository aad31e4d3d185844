"""Compile every Triton kernel of trimkv for real GPU targets, on any machine (no GPU needed).

Run as a script (``TRITON_INTERPRET=0 python tests/_triton_targets.py``) it compiles each case below down to a
cubin and prints one JSON line per case: ``{"case": ..., "ok": true}`` or the compiler's error. The kernels must be
imported with the interpreter off, which a pytest process that already ran the interpreted kernel tests cannot
do, so ``test_triton_compile.py`` runs this file in a subprocess.

Each kernel is compiled the way its host wrapper launches it: q/k/v-like pointers in one dtype (the wrappers cast
them to ``compute_dtype``), log beta, statistics and gradients in fp32, positions / ids in int64.
"""
from __future__ import annotations

import json
import sys

DTYPES = ("fp32", "bf16", "fp16")
INT64 = {"QPOS", "KPOS", "QSEG", "KSEG", "KVALID", "QMAX", "KMIN", "POS", "SEG", "VALID", "TMAX", "IMIN",
         "POSNEW", "TNOW", "VICTIM"}
FP32 = {"LOGB", "LSE", "DELTA", "DK", "DV", "DQ", "DLOGB", "GRAD", "LOGBNEW"}
IN_DTYPE = {"Q", "K", "V", "DO", "OUT", "KEYS", "VALUES", "KNEW", "VNEW"}
ATTN_CONST = dict(HAS_SEG=True, HAS_VALID=True, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64)


def signature(kernel, dtype: str, constexprs: dict, overrides: dict | None = None) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in IN_DTYPE:
            sig[name] = "*" + dtype
        elif name in FP32:
            sig[name] = "*fp32"
        elif name in INT64:
            sig[name] = "*i64"
        elif name == "scaling":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    sig.update(overrides or {})
    return sig


def cases():
    """(case name, kernel, dtype, constexprs, capability, signature overrides) for every compile to check."""
    from trimkv.kernels import triton_attention as ta
    from trimkv.kernels import triton_evict as te

    prec = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}
    out = []
    for cap, dtypes in ((90, DTYPES), (80, ("bf16",))):
        for dt in dtypes:
            for k in (ta._attn_fwd, ta._attn_bwd_dkdv, ta._attn_bwd_dq):
                out.append((f"sm{cap}-{dt}-{k.__name__}", k, dt, dict(ATTN_CONST, PREC=prec[dt]), cap, None))
    for cap in (90, 80):
        for backward in (False, True):
            out.append((f"sm{cap}-fp32-_cap_kernel-{'bwd' if backward else 'fwd'}", ta._cap_kernel, "fp32",
                        dict(HAS_SEG=True, HAS_VALID=False, BLOCK=64, BACKWARD=backward), cap, None))
    for dt in DTYPES:
        out.append((f"sm90-{dt}-_append_evict_kernel", te._append_evict_kernel, dt,
                    dict(BLOCK_C=512, BLOCK_D=64, WRITE_VICTIM=False), 90, None))
    # the bug this guards against: fp32 q/k (RoPE under autocast) with a bf16 v -> must be refused by the compiler
    out.append(("mixed-sm90-_attn_bwd_dq", ta._attn_bwd_dq, "fp32", dict(ATTN_CONST, PREC="tf32"), 90, {"V": "*bf16"}))
    return out


def compile_case(kernel, dtype, constexprs, capability, overrides) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs, overrides), constexprs=constexprs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32))
    except Exception as err:  # noqa: BLE001 - reported to the test as text, with its causes
        chain, e = [], err
        while e is not None:
            chain.append(f"{type(e).__name__}: {e}"[-1500:])
            e = e.__cause__ or e.__context__
        return {"ok": False, "error": "\n... caused by ...\n".join(chain)}
    return {"ok": bool(compiled.asm.get("cubin"))}


def main() -> int:
    for name, kernel, dtype, constexprs, cap, overrides in cases():
        print(json.dumps({"case": name, **compile_case(kernel, dtype, constexprs, cap, overrides)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
