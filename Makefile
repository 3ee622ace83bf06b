# One place for the commands README and CI run. `make test` == what .ci/run executes.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip

.PHONY: install lint test quickstart bench clean

# CPU install: the torch 2.13.0 CPU wheel first (an unpinned torch pulls a multi-GB CUDA build),
# then the package with everything that runs on a CPU machine plus the dev tools.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[cpu,dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

quickstart: install
	$(VENV)/bin/megatron-vespo train examples/configs/tiny_cpu_vespo.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
