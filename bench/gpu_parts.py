"""The pieces of a GPU visit's targets (``make gpu-verify``, ``make gpu-train``): parts run in order under one
wall-time budget, each with its log; the environment; the summary table printed last.

A :class:`Part` is a command (``python -m MODULE ARGS``) with GPU-sized arguments and CPU-sized ones for the dry run
(``DRY_RUN=1``: the same module on a tiny model on this CPU, which proves that the command and its imports resolve).
:func:`run_parts` starts each part only while the budget has room for its estimate, stops it at its own timeout and
at the end of the budget, and records why a part did not run; a failing part never stops the others.
"""
from __future__ import annotations

import contextlib
import io
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Part:
    name: str
    module: str                         # run as ``python -m module``
    gpu_args: list[str]                 # ``{out}`` is replaced by the output folder
    dry_args: list[str]
    estimate_s: float                   # expected seconds on the H200 (see ESTIMATES in each target)
    timeout_s: float                    # stopped after this long
    summarize: Callable[[Path], str] | None = None   # one line from what the part wrote
    env: dict[str, str] = field(default_factory=dict)
    subprocess_only: bool = False       # cannot run inside this process (pytest)

    def argv(self, out: Path, dry: bool) -> list[str]:
        return [a.replace("{out}", str(out)) for a in (self.dry_args if dry else self.gpu_args)]

    def outputs(self, out: Path, dry: bool) -> list[Path]:
        """What the part writes: its log and every argument under ``{out}/`` (a JSON file, a folder)."""
        args = self.dry_args if dry else self.gpu_args
        return [out / f"{self.name}.log"] + [out / a.removeprefix("{out}/") for a in args if a.startswith("{out}/")]


def remove(path: Path) -> None:
    """Delete a file or a folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run_part(part: Part, out: Path, *, dry: bool, timeout: float, in_process: bool = False) -> dict:
    """Run one part; its output goes to ``out/<name>.log``. Returns a row of the summary table. What an earlier run
    of the part left in ``out`` is deleted first, so that a rerun on a warm machine neither trips over it nor reports
    it as its own."""
    argv, log = part.argv(out, dry), out / f"{part.name}.log"
    for path in part.outputs(out, dry):
        remove(path)
    t0 = time.perf_counter()
    if in_process and not part.subprocess_only:
        ok, text = _in_process(part.module, argv)
    else:
        ok, text = _subprocess(part, argv, timeout)
    seconds = time.perf_counter() - t0
    log.write_text(text)
    result = "ok" if ok else _tail(text)
    if part.summarize is not None:
        try:
            result = part.summarize(out) if ok else f"{part.summarize(out)}; {_tail(text)}"
        except Exception as err:  # noqa: BLE001 - the summary of a part that wrote nothing
            result = _tail(text) if not ok else f"no summary ({type(err).__name__}: {err})"
    return {"part": part.name, "ok": ok, "seconds": round(seconds, 1), "result": result}


def _subprocess(part: Part, argv: list[str], timeout: float) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", part.module, *argv]
    env = {**os.environ, **part.env}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        text += (err.stderr or b"").decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        return False, f"$ {' '.join(cmd)}\n{text}\nSTOPPED after {timeout:.0f} s"
    return proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\nexit {proc.returncode}"


def _in_process(module: str, argv: list[str]) -> tuple[bool, str]:
    buf = io.StringIO()
    ok = True
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = importlib.import_module(module).main(argv)
            ok = rc in (None, 0) or isinstance(rc, dict)
        except SystemExit as err:
            ok = err.code in (None, 0)
        except Exception:  # noqa: BLE001 - reported in the table like a failed subprocess
            buf.write(traceback.format_exc())
            ok = False
    return ok, f"(in process) python -m {module} {' '.join(argv)}\n{buf.getvalue()}"


def _tail(text: str, n: int = 240) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-n:] if lines else "(no output)"


def run_parts(parts: list[Part], out: Path, *, dry: bool, budget_s: float, only: list[str] | None = None,
              in_process: bool = False, echo: bool = True) -> list[dict]:
    """Run ``parts`` in order within ``budget_s`` seconds (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    end = time.perf_counter() + budget_s
    rows = []
    for part in parts:
        if only and part.name not in only:
            continue
        left = end - time.perf_counter()
        if not dry and left < min(part.estimate_s, part.timeout_s):
            rows.append({"part": part.name, "ok": False, "seconds": 0.0,
                         "result": f"skipped: {left:.0f} s of the budget left, it needs ~{part.estimate_s:.0f} s"})
        else:
            rows.append(run_part(part, out, dry=dry, timeout=min(part.timeout_s, max(left, 1.0)),
                                 in_process=in_process))
        if echo:
            print(table(rows[-1:], header=not rows[:-1]), flush=True)
    return rows


def environment() -> dict:
    """Versions and the device, printed first on a GPU (the image may have changed since the last visit)."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "gpu_memory_GiB": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            if torch.cuda.is_available() else None, "cpus": os.cpu_count()}
    for name in ("transformers", "triton", "deepspeed", "gguf", "datasets", "accelerate", "peft", "xdist"):
        try:
            module = importlib.import_module(name)
            info[name] = getattr(module, "__version__", "present")
        except Exception as err:  # noqa: BLE001 - a missing or broken package is what this reports
            info[name] = f"missing ({type(err).__name__})"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def machine_name(env: dict) -> str:
    """``h200`` for 'NVIDIA H200', ``cpu`` without a GPU: the folder name ``results/gpu-<machine>``."""
    gpu = env.get("gpu") or "cpu"
    words = [w for w in gpu.replace("NVIDIA", "").split() if w]
    return (words[0] if words else "gpu").lower()


def table(rows: list[dict], header: bool = True) -> str:
    lines = [f"{'part':14s}  ok    seconds  result", "-" * 90] if header else []
    for r in rows:
        lines.append(f"{r['part']:14s}  {'yes' if r['ok'] else 'NO ':3s}  {r['seconds']:8.1f}  {r['result']}")
    return "\n".join(lines)


def write_summary(out: Path, env: dict, rows: list[dict], extra: dict | None = None) -> str:
    text = table(rows)
    (out / "summary.json").write_text(json.dumps({"env": env, "rows": rows, **(extra or {})}, indent=1))
    (out / "summary.txt").write_text(json.dumps(env) + "\n" + text + "\n")
    return text


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
