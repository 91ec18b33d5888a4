# The two commands of the README. Each installs what it needs: a virtualenv with pgherd and
# its test tools, and PostgreSQL from apt when no initdb can be found.
VENV    := .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp

.PHONY: test demo bench deps postgres pgbouncer pgbadger uitools clean deb rpm client-suites fuzz reliability

test: deps postgres pgbouncer pgbadger uitools
	$(PY) -m pytest -n auto -p no:cacheprovider

demo: deps postgres pgbouncer
	$(VENV)/bin/pgherd bench --throwaway --workers 2 --clients 32 --duration 10 --select-only

# psycopg's and asyncpg's own test suites (../shared/client-suites), straight to a throwaway
# PostgreSQL and through pgherd in session and transaction mode; prints per suite and mode
# what passed and what passed directly but not through pgherd. Long (about an hour on
# 2 cores): not part of `make test`. SUITES=psycopg MODES=direct,session narrows it;
# ARGS are pytest arguments for the suites.
SUITES ?= psycopg,asyncpg
MODES  ?= direct,session,transaction
client-suites: deps postgres
	$(PY) -m tests.client_suites --suites $(SUITES) --modes $(MODES) $(if $(ARGS),-- $(ARGS))

# Hostile input against a throwaway PostgreSQL and pgherd (2 workers): CASES cases, 24 at a
# time, a bystander client querying throughout (tests/fuzzing.py). Not in CI (the suite runs
# 5,000 of them); exit status 1 if a worker died, the bystander failed or memory grew >10 %.
CASES ?= 100000
SEED  ?= 1
fuzz: deps postgres
	$(PY) -m tests.fuzzing --cases $(CASES) --seed $(SEED)

# Faults and hostile clients, pgherd and the installed PgBouncer side by side: the figures of
# docs/reliability.md (tests/reliability.py; ROUNDS rounds, min-max printed).
ROUNDS ?= 3
reliability: deps postgres pgbouncer
	$(PY) -m tests.reliability --rounds $(ROUNDS) --json reliability.json

deps: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# PostgreSQL (initdb, pg_ctl, pgbench, psql) for the throwaway clusters of tests and demo.
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "PostgreSQL found"; \
	else \
		apt-get update && apt-get install -y postgresql; \
	fi

# PgBouncer, side by side: the demo compares numbers, the tests compare admin columns.
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || ls /usr/sbin/pgbouncer >/dev/null 2>&1 || \
		(apt-get install -y pgbouncer || (apt-get update && apt-get install -y pgbouncer)) || \
		echo "pgbouncer could not be installed: the demo compares with PostgreSQL only"

# pgBadger (Debian's): the tests check that it reads pgherd's log as a PgBouncer log.
pgbadger:
	@command -v pgbadger >/dev/null 2>&1 || \
		apt-get -o DPkg::Lock::Timeout=300 install -y pgbadger || \
		(apt-get update && apt-get -o DPkg::Lock::Timeout=300 install -y pgbadger)

# A terminal and a browser for the tests that look at `pgherd top` and the status page as a
# person would: tmux, and headless Chromium with its driver (Debian's: no browser download).
UITOOLS := tmux:tmux chromium:chromium chromedriver:chromium-driver
uitools:
	@missing=""; for pair in $(UITOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing \
		|| (apt-get update && DEBIAN_FRONTEND=noninteractive \
		    apt-get install -y -q --no-install-recommends $$missing); \
	fi

# Service packages (packaging/README.md): dist/pgherd_<version>_<arch>.deb and
# dist/pgherd-<version>-1.<arch>.rpm, version from pyproject.toml. Each installs the Debian
# build tools it lacks (dh-virtualenv, rpm...) and takes the pinned dependencies from PyPI;
# RPM_PYTHON=3.12 make rpm targets another Python than 3.11.
deb:
	sh packaging/build-deb.sh

rpm:
	sh packaging/build-rpm.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache bench-results
