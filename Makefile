# Everything installs into .venv from this project's own files: `make run` and `make test` work on a
# machine that has only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The tests that exercise PostgreSQL itself, run again on each other version CI covers.
VERSION_TESTS := tests/db/test_capture.py tests/db/test_recovery.py tests/process/test_sql_and_cli.py tests/db/test_ticker.py \
                 tests/db/test_core.py tests/db/test_access.py tests/db/test_flow_control.py tests/db/test_sessions.py \
                 tests/unit

.PHONY: run test test-versions lint bench clean system-packages

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pgbridge dev

test: lint
	$(BIN)/python -m pytest -q

# The tests that exercise PostgreSQL itself (in process, so they also run the event loop's other ways):
# on PostgreSQL 15 (Debian's package, which .ci/run installs) under uvloop, which `--loop auto` picks in
# production, and on 16 (the embedded wheel's) in asyncio's debug mode, which reports coroutines never
# awaited, callbacks that hold the loop and resources never closed. `make test` covers 18 on asyncio.
test-versions: $(STAMP)
	PGBRIDGE_TEST_LOOP=uvloop PGBRIDGE_TEST_POSTGRES=/usr/lib/postgresql/15/bin $(BIN)/python -m pytest -q $(VERSION_TESTS)
	PYTHONASYNCIODEBUG=1 PGBRIDGE_TEST_POSTGRES=16 $(BIN)/python -m pytest -q $(VERSION_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check pgbridge tests
	$(BIN)/ruff format --check pgbridge tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m tests.bench

# Debian's packages some tests need, as root: chromium (the browser tests), haproxy (the replicas and the
# TLS example), pgbouncer (tests/process/test_pgbouncer.py), postgresql-15 (test-versions). .ci/run
# installs those that are missing.
SYSTEM_PACKAGES := chromium haproxy pgbouncer postgresql-15

system-packages:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES)

clean:
	rm -rf $(VENV) .pgbridge build *.egg-info
