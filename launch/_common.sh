# shellcheck shell=bash
# Helpers shared by launch/torchrun.sh and launch/deepspeed.sh; sourced, never run. slurm.sbatch keeps its own
# copies on purpose: sbatch runs a spooled copy of the script, where no file beside it can be found.

# require_recipe "$@": exit 2 with the usage line when no recipe is given.
require_recipe() {
    if [[ $# -lt 1 ]]; then
        echo "usage: $0 RECIPE.yaml [--resume] [--set section.field=value ...]" >&2
        exit 2
    fi
}

# gpu_count: GPUs on this node from nvidia-smi, else 1.
gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L | wc -l
    else
        echo 1
    fi
}

# run_or_print CMD...: with DRY_RUN=1 print the exact command (shell-quoted) and exit 0, else exec it.
run_or_print() {
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        printf '%q ' "$@"
        printf '\n'
        exit 0
    fi
    exec "$@"
}
