# Two commands on a fresh Debian/Ubuntu machine with Python 3.11+:
#   make demo   the whole device end to end on the simulator
#   make test   install what the tests need (Mosquitto included) and run them
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test soak bench lint system-deps clean

system-deps:
	@PYTHON=$(PYTHON) bash tools/system-deps.sh

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/device-agent demo --out demo-out --captures 10

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q -m "not soak"

soak: $(STAMP)
	$(PY) -m pytest -q -m soak

# Each bench script prints its figures for a person and, last, one JSON line.
bench: $(STAMP)
	@for script in bench/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
