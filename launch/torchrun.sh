#!/usr/bin/env bash
# Single-node training with torchrun: one process per GPU (or NPROC CPU processes with gloo).
#
#   launch/torchrun.sh RECIPE.yaml [--resume] [--set section.field=value ...]
#
# This script owns the topology only; hyperparameters live in the recipe (the engine too: a recipe with
# train.engine: deepspeed runs DeepSpeed under torchrun). --standalone picks a free local rendezvous port.
# Environment:
#   NPROC        processes on this node       (default: number of GPUs from nvidia-smi, else 1)
#   TORCHRUN     the torchrun command         (default: torchrun)
#   DRY_RUN=1    print the exact command instead of running it
set -euo pipefail

# shellcheck source=_common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/_common.sh"
require_recipe "$@"

nproc="${NPROC:-$(gpu_count)}"
read -r -a torchrun <<< "${TORCHRUN:-torchrun}"

cmd=("${torchrun[@]}" --standalone --nnodes=1 --nproc-per-node="$nproc" -m trimkv.cli train "$@")

run_or_print "${cmd[@]}"
