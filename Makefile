# Every target sets up .venv if it is missing, so a fresh clone needs nothing else. Each target
# installs what it needs: `make demo` the [train] extra, `make test` everything (integrations,
# dev tools); one stamp each, so `make demo` then `make test` installs the rest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.base
TRAIN_STAMP := $(VENV)/.installed-train
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo bench lint docs clean

setup: $(STAMP)

# The venv with pip and torch (the CPU wheel CI tests).
$(BASE):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	touch $(BASE)

# Our own environment is exact (constraints.txt); the package declares ranges (pyproject.toml).
$(TRAIN_STAMP): pyproject.toml constraints.txt src/sigreg/_version.py | $(BASE)
	$(PY) -m pip install -q -c constraints.txt -e ".[train]"
	@$(MAKE) --no-print-directory fashion-mnist
	touch $(TRAIN_STAMP)

# Everything includes [train], so it stands for the demo's stamp too.
$(STAMP): pyproject.toml constraints.txt src/sigreg/_version.py | $(BASE)
	$(PY) -m pip install -q -c constraints.txt -e ".[train,lightning,transformers,docs,dev]"
	@$(MAKE) --no-print-directory fashion-mnist
	touch $(STAMP) $(TRAIN_STAMP)

# Real data for the demo: Debian ships Fashion-MNIST; install it when we can (root + apt).
.PHONY: fashion-mnist
fashion-mnist:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then \
	  echo "setup: Fashion-MNIST found in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "setup: installing Debian package dataset-fashion-mnist"; \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	    || echo "setup: could not install dataset-fashion-mnist; the demo will download it or fall back to synthetic data"; \
	else \
	  echo "setup: Fashion-MNIST not installed (needs root + apt); the demo will download it or fall back to synthetic data"; \
	fi

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

demo: $(TRAIN_STAMP)
	$(PY) -m sigreg.train.demo

bench: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/throughput.py

# The documentation site (mkdocs.yml, docs/) into site/; strict: a warning (a broken link or
# reference, a docstring the API pages cannot read) fails the build, as in the test suite.
docs: setup
	$(VENV)/bin/mkdocs build --strict

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments examples

clean:
	rm -rf $(VENV) runs .pytest_cache site
