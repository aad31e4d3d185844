"""Launch scripts: each DRY_RUN prints the exact command it would run; the scripts pass shellcheck."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"]


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "MASTER_", "NPROC", "NGPUS", "DS_CONFIG", "GPUS_PER_NODE"))}
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], env={**clean, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def test_torchrun_single_node():
    cmd = dry_run("torchrun.sh", "recipes/r.yaml", "--resume", "--set", "train.steps=10", NPROC="2")
    assert cmd == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=2", "-m", "trimkv.cli", "train",
                   "recipes/r.yaml", "--resume", "--set", "train.steps=10"]


def test_torchrun_command_is_overridable_and_quoting_survives():
    cmd = dry_run("torchrun.sh", "r.yaml", "--set", "output.run_dir=runs/a b", NPROC="1",
                  TORCHRUN="python -m torch.distributed.run")
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    assert cmd[-1] == "output.run_dir=runs/a b"


def test_deepspeed_single_node_default_and_json():
    cmd = dry_run("deepspeed.sh", "r.yaml", NGPUS="4", MASTER_PORT="29511")
    assert cmd == ["deepspeed", "--num_gpus=4", "--master_port=29511", "--no_local_rank", "--module", "trimkv.cli",
                   "train", "r.yaml", "--set", "train.engine=deepspeed"]
    cfg = str(LAUNCH / "ds_zero3_offload.json")
    cmd = dry_run("deepspeed.sh", "r.yaml", NGPUS="8", DS_CONFIG=cfg)
    assert cmd[-4:] == ["--set", "train.engine=deepspeed", "--set", f"train.ds_config={cfg}"]


def test_deepspeed_missing_json_is_named():
    proc = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh"), "r.yaml"], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "NGPUS": "1", "DS_CONFIG": "nope.json"})
    assert proc.returncode == 2 and "nope.json" in proc.stderr


def test_slurm_multi_node_c10d_rendezvous():
    cmd = dry_run("slurm.sbatch", "r.yaml", SLURM_NNODES="4", SLURM_JOB_ID="1234", SLURM_GPUS_ON_NODE="8",
                  MASTER_ADDR="gpu-001", MASTER_PORT="29600")
    assert cmd == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "torchrun", "--nnodes=4",
                   "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-001:29600", "--rdzv-id=1234",
                   "-m", "trimkv.cli", "train", "r.yaml", "--resume"]


def test_slurm_script_declares_its_allocation():
    text = (LAUNCH / "slurm.sbatch").read_text()
    for directive in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--requeue"):
        assert f"#SBATCH {directive}" in text


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_without_recipe(script):
    proc = subprocess.run(["bash", str(LAUNCH / script)], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1"})
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    proc = subprocess.run(["shellcheck", *(str(LAUNCH / s) for s in SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
