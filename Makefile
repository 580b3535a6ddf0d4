# Lazarus: `make demo` and `make test` do all set-up on a fresh Debian 12 machine (as root).
# The distribution's interpreter where it is 3.11 or newer (Debian 12's is), else python3 from PATH: Debian
# builds it with PGO and LTO, and every command starts and imports faster on it than on a default source build
# (pyenv's, first on PATH on our CI machines): `restore --lazy -d` 44.6 against 51.2 ms (docs/BENCHMARKS.md).
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
# Named for the interpreter: another PYTHON makes the venv again, from it.
STAMP := $(VENV)/.installed$(subst /,-,$(PYTHON))
LAUNCHER := $(VENV)/.launcher
DEB_PACKAGES := gcc libc6-dev make python3-venv
# Real programs the tests dump mid-work (tests/test_real_*.py): xz; gzip, grep and seq (coreutils) are essential.
TEST_DEB_PACKAGES := xz-utils gzip grep coreutils
TEST_PROGRAMS := xz gzip grep seq

.PHONY: demo test install deb-deps test-deps lint bench clean

$(STAMP): pyproject.toml
	@# Debian's python3 has the venv module but no ensurepip until python3-venv is installed.
	@command -v gcc >/dev/null && $(PYTHON) -c 'import ensurepip' >/dev/null 2>&1 || $(MAKE) deb-deps
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A path in a .pth file rather than setuptools' default editable finder, which every Python start-up
	@# (every command) imports with pathlib and urllib.parse (~1-3 ms). `compat` is transitional in setuptools:
	@# where it is gone, the default editable install is taken.
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat 2>/dev/null \
		|| $(PY) -m pip install -q -e '.[test]'
	# Compiled once here: a restore's start-up is on the path to the process running, and some
	# environments set PYTHONDONTWRITEBYTECODE, which would recompile every module on every command.
	$(PY) -m compileall -q lazarus
	touch $(STAMP)

# The `lazarus` command starts the interpreter without site's scan of the venv (lazarus/launcher.py), written
# over pip's console script after every install (which rewrites it); pip's stays where it cannot be written.
$(LAUNCHER): $(STAMP) lazarus/launcher.py
	$(PY) -m lazarus.launcher $(VENV)/bin/lazarus || true
	touch $(LAUNCHER)

install: $(STAMP) $(LAUNCHER)
	@# Bytecode of modules changed since the install (a pull, a merge): with PYTHONDONTWRITEBYTECODE set,
	@# every command would otherwise compile them again.
	@$(PY) -m compileall -q lazarus
	@# The launcher's code cache (lazarus/codecache.py) again, for the same reason: a module changed since it
	@# was written is imported the slow way.
	@$(PY) -m lazarus.launcher $(VENV)/bin/lazarus || true

deb-deps:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PACKAGES)

demo: install
	$(PY) demo/demo.py

test-deps:
	@for p in $(TEST_PROGRAMS); do command -v $$p >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_DEB_PACKAGES); fi

test: install test-deps
	$(VENV)/bin/ruff check lazarus tests benchmarks demo
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check lazarus tests benchmarks demo

bench: install
	$(PY) benchmarks/dump_restore.py

clean:
	rm -rf $(VENV) build *.egg-info
