#!/usr/bin/env bash
# Single-node training with the DeepSpeed launcher (ZeRO-2 by default; the recipe's train.zero_stage).
#
#   launch/deepspeed.sh RECIPE.yaml [--resume] [--set section.field=value ...]
#
# Topology only; hyperparameters live in the recipe. The run always uses train.engine=deepspeed. Environment:
#   NGPUS        GPUs on this node                               (default: all, from nvidia-smi, else 1)
#   MASTER_PORT  rendezvous port                                 (default: 29500)
#   DS_CONFIG    a DeepSpeed JSON, e.g. launch/ds_zero3_offload.json (default: built from the recipe's zero_stage)
#   DEEPSPEED    the launcher command                            (default: deepspeed)
#   DRY_RUN=1    print the exact command instead of running it
set -euo pipefail

# shellcheck source=_common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/_common.sh"
require_recipe "$@"

ngpus="${NGPUS:-$(gpu_count)}"
port="${MASTER_PORT:-29500}"
read -r -a launcher <<< "${DEEPSPEED:-deepspeed}"

extra=(--set train.engine=deepspeed)
if [[ -n "${DS_CONFIG:-}" ]]; then
    if [[ ! -f "$DS_CONFIG" ]]; then
        echo "DS_CONFIG=$DS_CONFIG does not exist (see launch/ds_zero*.json)" >&2
        exit 2
    fi
    extra+=(--set "train.ds_config=$DS_CONFIG")
fi

# --no_local_rank: trimkv reads LOCAL_RANK from the environment, not from a --local_rank argument.
cmd=("${launcher[@]}" --num_gpus="$ngpus" --master_port="$port" --no_local_rank
     --module trimkv.cli train "$@" "${extra[@]}")

run_or_print "${cmd[@]}"
