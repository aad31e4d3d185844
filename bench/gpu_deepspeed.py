"""DeepSpeed ZeRO-2 on one device: a short bf16 recipe, stopped after a checkpoint and resumed; the resumed steps
must give the uninterrupted run's losses and gates.

The recipe is a real one (``train.engine: deepspeed``, ``zero_stage: 2``, ``bf16`` base weights with the fp32 gates
under autocast, Triton attention on CUDA, gradient accumulation 2, checkpoints every 4 steps) on a random-weight
model of the default model's shape with a small byte-level tokenizer (:func:`bench.common.random_model_dir`), so it
needs neither the default model's GGUF nor a download. Run A trains 8 steps; run B stops after step 6 (its last
checkpoint is step 4) and resumes to step 8. Multi-GPU DeepSpeed cannot be tried on one GPU; the launch scripts'
dry runs are tested in the suite (tests/test_launch.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

try:
    from . import common
except ImportError:  # python bench/gpu_deepspeed.py
    import common


def recipe(model_dir: Path, run_dir: Path, *, seq_len: int, device: str, steps: int) -> dict:
    gpu = device.startswith("cuda")
    return {
        "model": {"name": str(model_dir), "dtype": "bfloat16" if gpu else "float32"},
        "gates": {"gate_hidden": 64, "bias_init": 6.0},
        "data": {"source": "builtin:prose", "seq_len": seq_len, "batch_size": 2, "pack": True, "seed": 0,
                 "cache_dir": str(run_dir.parent / "data-cache")},
        "loss": {"budget": max(8, seq_len // 16), "chunk_size": 512},
        "train": {"steps": steps, "engine": "deepspeed", "zero_stage": 2, "bf16": True, "device": device,
                  "attn_impl": "auto", "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "grad_accum": 2,
                  "save_every": 4, "keep_last": 3},
        "output": {"run_dir": str(run_dir), "checkpoint": str(run_dir / "gates")},
        "logging": {"wandb": "disabled"},
    }


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the runs and deepspeed.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, help="random model shape (default: smollm2-shape on GPU, tiny on CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: GPU 1024, CPU 64)")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")       # the CUDA run (nccl, bf16, Triton) has not happened yet: issue 24
    if not gpu:                          # CPU: no JIT build of DeepSpeed's shared-memory collective (gloo is enough)
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from trimkv.recipe import parse_recipe
    from trimkv.train.run import finetune

    shape, T = args.shape or ("smollm2-shape" if gpu else "tiny"), args.seq_len or (1024 if gpu else 64)
    model_dir = common.random_model_dir(args.out / f"model-{shape}", shape)
    runs = {}
    for name in ("full", "resumed"):
        run_dir = args.out / f"run-{name}"
        raw = recipe(model_dir, run_dir, seq_len=T, device=args.device, steps=args.steps)
        if name == "full":
            finetune(parse_recipe(raw), progress=False)
        else:
            finetune(parse_recipe(raw), progress=False, until_step=args.steps - 2)   # last checkpoint: step 4
            finetune(parse_recipe(raw), progress=False, resume=True)
        runs[name] = run_dir
    a, b = losses(runs["full"]), losses(runs["resumed"])
    redo = [s for s in sorted(a) if s > 4]
    rel = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in redo)
    ga = load_file(str(runs["full"] / "gates" / "model.safetensors"))
    gb = load_file(str(runs["resumed"] / "gates" / "model.safetensors"))
    gate_diff = max(float((ga[k] - gb[k]).abs().max()) for k in ga)
    result = {"device": args.device, "gpu": torch.cuda.get_device_name() if gpu else None, "shape": shape,
              "seq_len": T, "steps": args.steps, "resumed_from": 4, "losses_full": a, "losses_resumed": b,
              "max_rel_loss_diff_after_resume": rel, "max_abs_gate_diff": gate_diff,
              "bit_identical": rel == 0.0 and gate_diff == 0.0}
    (args.out / "deepspeed.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("losses")}))
    if not (rel < 1e-5 and gate_diff < 1e-5):
        raise SystemExit(f"the resumed DeepSpeed run differs: loss {rel:.2e} (relative), gates {gate_diff:.2e}")
    return result


if __name__ == "__main__":
    main()
