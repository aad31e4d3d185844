#!/bin/sh
# One command of a GPU visit (python -m bench.gpu_plan prints the visit): keep what this command carried, then run
# the step. Usage: sh bench/gpu_visit.sh verify|stage|train [ARGS], as `make gpu-verify`, `make gpu-stage-part`
# and `make gpu-train` do. With DRY_RUN set: the plan and the step's dry run on this CPU (DRY_PY, default python3).
set -eu
step=$1
shift
cd "$(dirname "$0")/.."
if [ -n "${DRY_RUN:-}" ]; then
    py=${DRY_PY:-python3}
    rc=0
    $py -m bench.gpu_plan || rc=$?              # the plan: carried sizes, commands, time estimate
    if [ "$step" != stage ]; then
        $py -m "bench.gpu_$step" --dry-run "$@" || rc=$?
    fi
    exit $rc
fi
py=${GPU_PY:-python3}
stage=${TRIMKV_GPU_STAGE:-/tmp/trimkv-stage}
$py -m bench.gpu_stage receive                  # parts -> $stage/parts, wheels -> $stage/site
export PYTHONPATH="$stage/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" TRIMKV_HOME="$stage/home" TRITON_INTERPRET=0 \
    PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$step" = stage ]; then
    exit 0                                      # carrying the part was the point
fi
exec $py -m "bench.gpu_$step" "$@"
