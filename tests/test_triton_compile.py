"""Every Triton kernel compiles for the GPUs users run (H100 = sm_90 in fp32 / bf16 / fp16, A100 = sm_80 in bf16)
down to a cubin, on any machine: the Triton interpreter that runs the kernels on CPU (tests/test_kernels.py) never
compiles, so it cannot catch what only the compiler rejects, such as a ``tl.dot`` of an fp32 and a bf16 tile (the
bf16-autocast training failure first seen on an H100). The compiles run in a subprocess with the interpreter off
(tests/_triton_targets.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the Triton fast paths need the triton package ([triton] extra)")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "_triton_targets.py")], capture_output=True, text=True,
                          env=env, cwd=HERE.parent, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["case"]: r for r in map(json.loads, proc.stdout.splitlines())}


def test_every_kernel_compiles_for_every_target_and_dtype(compiled):
    sys.path.insert(0, str(HERE))
    from _triton_targets import cases

    names = [c[0] for c in cases() if not c[0].startswith("mixed")]
    assert len(names) >= 19 and all(n in compiled for n in names)
    failed = {n: compiled[n]["error"] for n in names if not compiled[n]["ok"]}
    assert not failed, "\n".join(f"{n}: {e}" for n, e in failed.items())


def test_mixed_dtypes_are_refused_by_the_compiler(compiled):
    """The failure the host wrapper prevents, reproduced: q/k in fp32 (after RoPE under autocast) with v in bf16."""
    res = compiled["mixed-sm90-_attn_bwd_dq"]
    assert not res["ok"] and "same dtype" in res["error"]


def test_host_wrapper_reads_one_dtype():
    """What the wrapper hands the kernels: one dtype for q, k and v (the autocast dtype under autocast)."""
    from trimkv.kernels.triton_attention import compute_dtype

    q, k = torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float32)
    v = torch.zeros(2, dtype=torch.bfloat16)
    assert compute_dtype(q, k, v) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(q, k, v) == torch.bfloat16
    assert compute_dtype(v, v, v) == torch.bfloat16
