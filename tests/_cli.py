"""Running the ``trimkv`` entry point as a user does: ``python -m trimkv ...`` in a subprocess, and what a failed
command must look like (its exit code, one or two lines on stderr naming the input, no traceback)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trimkv

REPO = Path(trimkv.__file__).resolve().parents[1]


def run_cli(*args, cwd: Path | None = None, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """``python -m trimkv *args``; ``env`` adds environment variables (TRIMKV_DEBUG is cleared unless given)."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "TRIMKV_DEBUG": "", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "trimkv", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=environ, timeout=timeout)


def assert_fails(res: subprocess.CompletedProcess, code: int, *named: str) -> str:
    """The command ended with ``code``, no traceback, one or two lines on stderr that contain every ``named``
    string; returns stderr."""
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, res.stderr
    for text in named:
        assert text in res.stderr, (text, res.stderr)
    return res.stderr
