# Two commands on a fresh Debian/Ubuntu machine with Python 3.11+:
#   make demo   the whole device end to end on the simulator
#   make test   install what the tests need (Mosquitto included) and run them
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test soak bench lint system-deps clean pi-check

system-deps:
	@PYTHON=$(PYTHON) bash tools/system-deps.sh

# Three distributions, all editable for development: the device (the root: device_agent and
# the wire package), the clinic's gateway and the simulator. A device installs the first only.
$(STAMP): pyproject.toml dermascope_wire/pyproject.toml clinic_gateway/pyproject.toml sim/pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./dermascope_wire -e '.[dev]' -e ./clinic_gateway -e ./sim
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/device-agent demo --out demo-out --captures 10

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The fault-injection soak runs in `make test` as a short version (20 kill -9 trials,
# 4 broker restarts); `make soak` is the long one, with its figures printed as JSON.
test: $(STAMP) lint
	$(PY) -m pytest -q

soak: $(STAMP)
	SOAK_TRIALS=500 SOAK_RESTARTS=50 $(PY) -m pytest -q -s tests/test_uplink.py -k soak

# Each bench script prints its figures for a person and, last, one JSON line; every script
# runs, and the exit status says whether every goal was met.
bench: $(STAMP)
	@status=0; for script in bench/bench_*.py; do $(PY) $$script || status=1; done; exit $$status

# The README's Raspberry Pi install, proved on Debian 12 (Bookworm's base): see tools/pi-check.sh.
pi-check:
	@bash tools/pi-check.sh

clean:
	rm -rf $(VENV) .venv-pi demo-out .pytest_cache .ruff_cache
