# Everything installs into .venv from this project's own files: `make run` and `make test` work on a
# machine that has only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The in-process tests (bridges on this process's event loop), with those of the commands, run again on the
# oldest PostgreSQL CI installs, under uvloop.
VERSION_TESTS := tests/db tests/unit tests/process/test_sql_and_cli.py
# What depends most on the server's version (its catalogs, types, roles, snapshots), on the version in between.
SQL_TESTS := tests/db/test_schema.py tests/db/test_capture.py tests/db/test_hostile_roles.py tests/db/test_access.py \
	tests/db/test_core.py tests/db/test_sessions.py
# Tests run in parallel, each worker on a PostgreSQL of its own: a test alone keeps less than one core busy (it
# waits on sockets, timers and the server); four workers keep both busy.
TEST_WORKERS ?= 4

.PHONY: run test test-versions lint bench clean system-packages

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pgbridge dev

# The tests run in asyncio's debug mode, which reports coroutines never awaited, callbacks that hold the loop
# and resources never closed. The browser tests and the benchmark's short run come after the rest, one at a
# time and out of debug mode: Chromium and the benchmark take both cores in bursts, and timing in a browser
# is what the browser tests check.
test: lint
	PYTHONASYNCIODEBUG=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --ignore=tests/browser --ignore=tests/bench
	$(BIN)/python -m pytest -q tests/browser tests/bench

# The in-process tests on PostgreSQL 15 (Debian's package, which .ci/run installs) under uvloop, which
# `--loop auto` picks in production; the SQL tests on 16 (the embedded wheel's) under asyncio out of debug
# mode. `make test` runs every test on 18 under asyncio, in debug mode.
test-versions: $(STAMP)
	PGBRIDGE_TEST_LOOP=uvloop PGBRIDGE_TEST_POSTGRES=/usr/lib/postgresql/15/bin $(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(VERSION_TESTS)
	PGBRIDGE_TEST_POSTGRES=16 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(SQL_TESTS)

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
