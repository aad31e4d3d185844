"""``make gpu-verify``: every GPU path checked in one device command, a summary table last.

Parts, in order, under one wall-time budget (``--budget``, default 270 s; a part that would not fit is skipped and
named in the table, so the command always returns its summary):

1. ``tests``: the suite with compiled Triton kernels (``TRITON_INTERPRET=0``), in parallel (pytest-xdist), failing
   fast (``--maxfail``), each test at most 120 s; the failures are named in the table;
2. ``train_step``: gate-training step vs frozen forward+backward at 2k / 4k / 8k, batch 1 and the memory-sized
   batch, tokens/s and MFU (``bench/train_step.py``), on a random-weight model of the default model's shape;
3. ``decode``: compiled CUDA-graph bounded decode vs eager, DynamicCache and StaticCache compiled at 1k and 32k,
   batch 1 and the largest batch under equal KV memory, and the compiled tokens against the eager ones;
4. ``deepspeed``: a short bf16 ZeRO-2 recipe on the GPU, stopped and resumed exactly (``bench/gpu_deepspeed.py``);
5. ``evict``: append+evict as a share of a decode step;
6. ``attention``: training attention kernels at 4k / 16k;
7. ``decode_more``: the decode columns at 4k and 16k (no StaticCache: it compiles a graph per length).

Everything goes to ``--work`` (logs, JSON) and, bundled, to ``--out`` (``$OUT`` on the device: ``verify.tar.gz``,
``summary.txt``), which ``python -m bench.gpu_stage unpack`` extracts into ``results/gpu-<machine>/``.
``--dry-run`` runs every part on this CPU with tiny sizes (the plan's check; ``DRY_RUN=1 make gpu-verify``).
Estimates (``estimate_s``) are guesses from the H100 visit's timings (``bench/README.md``) and CPU runs: the first
H200 visit replaces them with what its summary says.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

try:
    from . import gpu_parts, gpu_stage
    from .gpu_parts import Part, read_json
except ImportError:  # python bench/gpu_verify.py
    import gpu_parts
    import gpu_stage
    from gpu_parts import Part, read_json

BUDGET_S = 270.0
SHAPE = "smollm2-shape"          # random weights of the default model's shape: speed needs no staged weights


def _tests_summary(out: Path) -> str:
    """pytest's closing tally (or, when the part was stopped, the outcomes counted so far) and the failed tests."""
    text = (out / "tests.log").read_text()
    final = [ln for ln in text.splitlines() if re.match(r"^=+ .*\b(passed|failed|errors?|skipped)\b.* in [\d.]+s", ln)]
    if final:
        head = final[-1].strip("= ")
    else:
        found = re.findall(r"\b(PASSED|FAILED|SKIPPED|ERROR)\b", text)
        head = "stopped: " + ", ".join(f"{found.count(w)} {w.lower()}" for w in ("PASSED", "FAILED", "SKIPPED", "ERROR"))
    failed = sorted(set(re.findall(r"(?:FAILED|ERROR) (tests/[^\s:]+::[^\s]+)", text)))
    if failed:
        head += f"; failed: {' '.join(failed[:8])}" + (f" and {len(failed) - 8} more" if len(failed) > 8 else "")
    return head


def _bench_summary(name: str):
    def read(out: Path) -> str:
        res = read_json(out / f"bench_{name}.json")
        rows = res["rows"]
        x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        if name == "train_step":
            pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
            return "; ".join(f"{_k(r['tokens'])} x{r['rows']}: {x(r['ratio'])} frozen, "
                             f"{r['gate_tok_s'] / 1e3:.0f}k tok/s, MFU {pct(r['gate_mfu'])}" for r in rows)
        if name.startswith("decode"):
            line = "; ".join(f"{_k(r['context'])} b{r['batch']}: {x(r['compiled_vs_full'])} full, "
                             f"{x(r['compiled_vs_static'])} static, {x(r['compiled_vs_eager'])} eager" for r in rows)
            check = res.get("tokens_vs_eager")
            if check:
                line += f"; tokens {check['same_steps']}/{check['steps']} same as eager"
            return line
        if name == "evict":
            return "; ".join(f"{r['backend']}: {r['fraction_pct']:.1f}% of a step" for r in rows)
        if name == "attention":
            return "; ".join(f"{r['impl']}@{r['T']}: {1e3 * r['seconds']:.1f} ms" for r in rows)
        return json.dumps(rows)[:200]
    return read


def _k(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 else str(tokens)


def _deepspeed_summary(out: Path) -> str:
    r = read_json(out / "deepspeed" / "deepspeed.json")
    return (f"{r['steps']} steps ZeRO-2 {'bf16 ' if r['gpu'] else ''}on {r['gpu'] or r['device']}, resumed at step {r['resumed_from']}: loss differs by "
            f"{r['max_rel_loss_diff_after_resume']:.1e} (rel), gates by {r['max_abs_gate_diff']:.1e}"
            + (" (bit-identical)" if r["bit_identical"] else ""))


def pytest_args(dry: bool) -> list[str]:
    """The suite on the GPU; on the CPU one small test file with the same flags (xdist only if installed here)."""
    flags = ["-v", "-p", "no:cacheprovider", "-p", "no:randomly", "--timeout=120"]
    if not dry:
        return [*flags, "-n", "12", "--maxfail=20", "tests"]
    xdist = ["-n", "2"] if importlib.util.find_spec("xdist") else []
    return [*flags, *xdist, "--maxfail=20", "tests/test_throughput.py", "-k", "rows_for_memory or no_peak"]


def parts(dry: bool = False) -> list[Part]:
    quick = ["--quick", "--model", "tiny", "--device", "cpu", "--threads", "1"]
    return [
        Part("tests", "pytest", pytest_args(False), pytest_args(True), 150, 200, _tests_summary,
             env={"TRITON_INTERPRET": "0"}, subprocess_only=True),
        Part("train_step", "bench.train_step",
             ["--model", SHAPE, "--lengths", "2048", "4096", "8192", "--repeat", "3",
              "--json", "{out}/bench_train_step.json"],
             [*quick, "--max-rows", "2", "--json", "{out}/bench_train_step.json"], 70, 150,
             _bench_summary("train_step")),
        Part("decode", "bench.decode",
             ["--model", SHAPE, "--lengths", "1024", "32768", "--steps", "16", "--check-tokens", "64",
              "--json", "{out}/bench_decode.json"],
             [*quick, "--steps", "2", "--check-tokens", "4", "--json", "{out}/bench_decode.json"], 100, 200,
             _bench_summary("decode")),
        Part("deepspeed", "bench.gpu_deepspeed", ["--out", "{out}/deepspeed"],
             ["--out", "{out}/deepspeed", "--device", "cpu", "--steps", "6"], 60, 120, _deepspeed_summary),
        Part("evict", "bench.evict", ["--model", SHAPE, "--steps", "32", "--json", "{out}/bench_evict.json"],
             [*quick, "--steps", "2", "--json", "{out}/bench_evict.json"], 20, 60, _bench_summary("evict")),
        Part("attention", "bench.attention",
             ["--lengths", "4096", "16384", "--impls", "reference", "chunked", "triton", "flex", "--max-reference",
              "4096", "--max-chunked", "4096", "--repeat", "3", "--json", "{out}/bench_attention.json"],
             [*quick, "--lengths", "48", "--json", "{out}/bench_attention.json"], 40, 90, _bench_summary("attention")),
        Part("decode_more", "bench.decode",
             ["--model", SHAPE, "--lengths", "4096", "16384", "--steps", "16", "--methods", "eager", "compiled",
              "full", "--json", "{out}/bench_decode_more.json"],
             [*quick, "--steps", "2", "--methods", "eager", "full", "--json", "{out}/bench_decode_more.json"], 60, 120,
             _bench_summary("decode_more")),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None, help="logs and JSON (default: $TRIMKV_GPU_STAGE/verify on the "
                                                           "GPU, runs/gpu-verify-dry for a dry run)")
    p.add_argument("--out", type=Path, default=None, help="bundle and summary (default: $OUT, else --work)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    p.add_argument("--parts", default=None, help="comma-separated subset of the parts, e.g. decode,attention")
    p.add_argument("--dry-run", action="store_true", help="every part with tiny sizes on this CPU")
    p.add_argument("--in-process", action="store_true", help="dry run: run the Python parts in this process")
    args = p.parse_args(argv)
    dry = args.dry_run
    env = gpu_parts.environment()
    print(json.dumps(env), flush=True)
    if not dry and env["gpu"] is None:
        print("gpu-verify needs a CUDA GPU (torch.cuda.is_available() is False); DRY_RUN=1 checks the plan on a CPU",
              file=sys.stderr)
        return 2
    work = args.work or (gpu_stage.STAGE / "verify" if not dry else gpu_parts.REPO / "runs" / "gpu-verify-dry")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else work)
    only = args.parts.split(",") if args.parts else None
    unknown = sorted(set(only or []) - {q.name for q in parts()})
    if unknown:
        print(f"unknown part(s) {unknown}; the parts are {[q.name for q in parts()]}", file=sys.stderr)
        return 2
    rows = gpu_parts.run_parts(parts(), work, dry=dry, budget_s=args.budget, only=only, in_process=args.in_process)
    summary = gpu_parts.write_summary(work, env, rows, {"dry_run": dry})
    machine = gpu_parts.machine_name(env)
    bundles = gpu_stage.bundle(work, out, "verify", exclude=("deepspeed/model-smollm2-shape", "deepspeed/run-full",
                                                              "deepspeed/run-resumed", "deepspeed/data-cache"))
    if out != work:
        (out / "summary.txt").write_text((work / "summary.txt").read_text())
    print(f"\ngpu-verify on {env['gpu'] or 'CPU (dry run)'} (torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']}); results for results/gpu-{machine}/: "
          + ", ".join(b.name for b in bundles) + f"\n{summary}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
