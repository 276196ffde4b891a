# make demo: set up .venv and run the demo; make test: set up .venv and run the tests, then the
# numeric ones (pytest -m numeric, less the end-to-end script runs) again on the AVX2 kernels,
# which other CPUs take: a tolerance that holds only for this CPU's kernels fails here, not on a
# user's machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SECOND_ISA := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

.PHONY: demo test install clean

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest --durations=15
	$(SECOND_ISA) $(BIN)/python -m pytest -m "numeric and not e2e"

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
