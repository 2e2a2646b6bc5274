# dsv3 — two commands: `make demo` and `make test`. Both create .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

# torch is installed first and pinned: `torch==2.13.0` is the CPU wheel here; an open range would pull CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# DEMO_MINUTES=N make demo: a shorter (or longer) training run. A previous runs/demo is moved aside
# (runs/demo.old-<timestamp>), never deleted.
demo: $(STAMP)
	$(PY) -m dsv3 demo --overwrite $(if $(DEMO_MINUTES),--minutes $(DEMO_MINUTES))

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
