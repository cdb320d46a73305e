# blockvault: `make demo` shows it working, `make test` checks everything (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# Python keeps the compiled bytecode of the project's modules (in __pycache__, ignored by git)
# even where the environment says not to: without it every process the suite starts (workers,
# APIs, CLI runs) compiled blockvault from source, and every pytest worker re-rewrote and
# compiled ~400 test modules (collection 15.6 -> 5.9 CPU s; docs/testing.md)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast lint typecheck pytest bench venv venv-libvirt system-demo system-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# libvirt-python (the libvirt extra, docs/libvirt.md) builds against libvirt-dev, which
# system-test installs: the tests need it, `make demo` does not
LIBVIRT_STAMP := $(VENV)/.libvirt-stamp
$(LIBVIRT_STAMP): $(STAMP) | system-test
	$(PY) -m pip install -q -e '.[dev,libvirt]'
	touch $(LIBVIRT_STAMP)

venv-libvirt: system-test $(LIBVIRT_STAMP)

system-demo:
	tests/harness/ensure-system demo

system-test:
	tests/harness/ensure-system test

demo: venv system-demo
	$(VENV)/bin/blockvault demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# pytest-xdist workers (docs/testing.md: most tests wait on child processes, so more workers
# than the 2 cores pay); worksteal: an idle worker takes tests queued on a busy one.
PYTEST_WORKERS ?= 6
XDIST := -n $(PYTEST_WORKERS) --dist worksteal

pytest: venv system-test venv-libvirt
	tests/harness/ensure-services
	$(PY) -m pytest -q $(XDIST) --durations=40

test: lint typecheck pytest

# the unit layer only, for the edit loop: no test marked slow (docs/testing.md)
test-fast: venv system-test venv-libvirt
	tests/harness/ensure-services
	$(PY) -m pytest -q $(XDIST) -m "not slow"

bench: venv system-test
	$(PY) tests/bench/compare_peers.py $(BENCH_ARGS)

.PHONY: bench-sync
bench-sync: venv system-test
	$(PY) tests/bench/sync_targets.py $(BENCH_ARGS)

.PHONY: bench-db
bench-db: venv system-test
	$(PY) tests/bench/db_dedup.py $(BENCH_ARGS)

.PHONY: bench-live
bench-live: venv system-test
	$(PY) tests/bench/live_backup.py $(BENCH_ARGS)

.PHONY: bench-hosts
bench-hosts: venv system-test
	$(PY) tests/bench/multihost_throughput.py $(BENCH_ARGS)

# a site under scheduled work and random faults for SOAK_MINUTES, then its checks (docs/testing.md)
SOAK_MINUTES ?= 20
.PHONY: soak
soak: venv system-test
	tests/harness/ensure-services
	$(PY) tests/bench/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# the console's pages, screenshot by its browser tests, into docs/screenshots/
.PHONY: screenshots
screenshots: venv system-test
	tests/harness/ensure-services
	BLOCKVAULT_CONSOLE_SCREENSHOTS=docs/screenshots $(PY) -m pytest -q tests/console

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .blockvault
