# make bench  - set up (first time: venv, pinned requirements, extension build), then benchmark
# make test   - set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: setup bench test
setup: $(VENV)/.built

$(VENV)/.built: requirements.txt scripts/setup.sh $(SOURCES)
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh
	touch $@

bench: setup
	$(PY) -m convmixer_kernels bench $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)
