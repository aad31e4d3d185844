"""``make gpu-check``: check an install on a CUDA machine end to end and print one summary table.

1. the test suite with the Triton kernels compiled (``TRITON_INTERPRET=0``; the GPU-only tests run too);
2. the four benchmarks at GPU sizes (training attention, gate-training step, decode, append+evict);
3. a short bf16 training run of the demo recipe on the default model (attention ``auto`` = Triton on CUDA), with a
   resume from its mid-run checkpoint.

Every part writes its full output under ``--out`` (default ``runs/gpu-check``); a part that fails is reported in
the table and the others still run. The default model must be on disk (``make model``); without it the
benchmarks use random weights of its shape and the training run is skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m-prose-m64.yaml"


def _env() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run_tests(out: Path, extra: list[str], timeout: float | None) -> dict:
    """The whole suite in a subprocess with compiled kernels; the pytest summary line parsed into counts."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        (out / "tests.log").write_text(text)
        return {"part": "tests (compiled kernels)", "ok": False, "seconds": time.perf_counter() - t0,
                "result": f"stopped after {timeout:.0f} s: {text.count('.')} dots, {text.count('F')} F so far"}
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", proc.stdout)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or proc.stdout[-300:]
    return {"part": "tests (compiled kernels)", "ok": proc.returncode == 0 and failed == 0,
            "result": summary, "seconds": time.perf_counter() - t0}


def run_benchmarks(out: Path, model: str) -> list[dict]:
    from bench import attention, decode, evict, train_step

    plans = [
        ("attention", attention.main, ["--lengths", "4096", "16384", "--impls", "reference", "chunked", "triton",
                                       "flex", "--max-reference", "4096", "--max-chunked", "4096", "--repeat", "3"]),
        ("train_step", train_step.main, ["--model", model, "--length", "4096", "--repeat", "5"]),
        ("decode", decode.main, ["--model", model, "--lengths", "1024", "4096", "16384", "32768", "--steps", "16"]),
        ("evict", evict.main, ["--model", model, "--steps", "32"]),
    ]
    rows = []
    for name, fn, argv in plans:
        t0, buf = time.perf_counter(), io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                res = fn([*argv, "--device", "cuda", "--json", str(out / f"bench_{name}.json")])
            rows.append({"part": f"bench {name}", "ok": True, "result": _bench_summary(name, res),
                         "seconds": time.perf_counter() - t0})
        except Exception:  # noqa: BLE001 - one failing part must not hide the others
            buf.write(traceback.format_exc())
            rows.append({"part": f"bench {name}", "ok": False, "result": buf.getvalue().strip()[-300:],
                         "seconds": time.perf_counter() - t0})
        (out / f"bench_{name}.log").write_text(buf.getvalue())
        print(buf.getvalue(), flush=True)
    return rows


def _bench_summary(name: str, res: dict) -> str:
    rows = res["rows"]
    if name == "attention":
        return "; ".join(f"{r['impl']}@{r['T']}: {1e3 * r['seconds']:.1f} ms" for r in rows)
    if name == "train_step":
        r = rows[0]
        return (f"{r['tokens']} tok {r['dtype']}: gate step {1e3 * r['gate_step_s']:.0f} ms vs frozen "
                f"{1e3 * r['frozen_fwd_bwd_s']:.0f} ms = {r['ratio']:.2f}x (target <= 1.5x)")
    if name == "decode":   # compiled bounded tok/s over eager bounded / DynamicCache / StaticCache compiled
        x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        return "; ".join(f"{r['context'] // 1024}k batch {r['batch']}: {x(r['compiled_vs_eager'])} eager, "
                         f"{x(r['compiled_vs_full'])} full, {x(r['compiled_vs_static'])} static" for r in rows)
    if name == "evict":
        return "; ".join(f"{r['backend']}: {r['fraction_pct']:.1f}% of a decode step" for r in rows)
    return json.dumps(rows)[:200]


def run_training(out: Path, steps: int) -> dict:
    """The demo recipe for ``steps`` bf16 steps on CUDA (Triton attention), checkpointing half-way; then the
    second half is run again from that checkpoint (``--resume``) and must give the same losses."""
    import shutil

    from trimkv.train.run import finetune

    run = out / "train"
    shutil.rmtree(run, ignore_errors=True)
    half = max(1, steps // 2)
    common = [f"train.steps={steps}", "train.device=cuda", "train.bf16=true", "train.attn_impl=auto",
              f"train.save_every={half}", "train.keep_last=3", "train.warmup_steps=2", "logging.wandb=disabled",
              f"output.run_dir={run}", f"output.checkpoint={run / 'gates'}"]
    t0 = time.perf_counter()
    finetune(RECIPE, overrides=common, progress=False)
    seconds = time.perf_counter() - t0
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    newest = max((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    shutil.rmtree(newest)                                  # as if the job died before its last checkpoint
    finetune(RECIPE, overrides=common, progress=False, resume=True)
    second = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in first]
    finite = all(math.isfinite(x) for x in losses)
    redo = [(a["loss"], b["loss"]) for a, b in zip(first[half:], second[half:])]
    diff = max((abs(a - b) / max(abs(a), 1e-12) for a, b in redo), default=float("nan"))
    tok_s = sorted(m["tokens_per_s"] for m in first)[len(first) // 2]
    result = (f"{len(first)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {tok_s:.0f} tok/s, {seconds:.0f} s; "
              f"resumed at step {half}: losses of steps {half + 1}-{steps} differ by <= {diff:.1e} (relative)")
    return {"part": f"train {steps} steps bf16 (demo recipe)", "ok": finite and len(redo) == steps - half
            and diff < 1e-5, "result": result, "seconds": seconds}


def table(rows: list[dict]) -> str:
    w = max(len(r["part"]) for r in rows)
    lines = [f"{'part':{w}s}  ok    seconds  result", "-" * (w + 60)]
    for r in rows:
        lines.append(f"{r['part']:{w}s}  {'yes' if r['ok'] else 'NO ':3s}  {r['seconds']:8.1f}  {r['result']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "runs" / "gpu-check"), help="folder for logs and JSON")
    p.add_argument("--steps", type=int, default=20, help="training steps of the smoke run")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "bench", "train"], help="parts to leave out")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-n 8' with pytest-xdist")
    p.add_argument("--tests-timeout", type=float, default=None, help="stop the test suite after this many seconds")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from trimkv.base_model import GGUF_NAME, default_model_dir

    have_model = (default_model_dir() / GGUF_NAME).is_file()
    env = _env()
    print(json.dumps(env), flush=True)
    rows: list[dict] = []
    if "tests" not in args.skip:
        rows.append(run_tests(out, args.pytest_args.split(), args.tests_timeout))
        print(table(rows[-1:]), flush=True)
    if "bench" not in args.skip:
        rows += run_benchmarks(out, "smollm2" if have_model else "smollm2-shape")
    if "train" not in args.skip:
        if have_model:
            try:
                rows.append(run_training(out, args.steps))
            except Exception:  # noqa: BLE001
                rows.append({"part": "train", "ok": False, "result": traceback.format_exc()[-300:], "seconds": 0})
        else:
            rows.append({"part": "train", "ok": False, "seconds": 0,
                         "result": f"skipped: {default_model_dir() / GGUF_NAME} not on disk (make model)"})
    summary = table(rows)
    print(f"\ngpu-check on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']})\n{summary}")
    (out / "summary.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    (out / "summary.txt").write_text(summary + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
