# Two commands do everything: `make demo` and `make test`. Both install what is
# missing first (Debian packages for the local stack, a virtualenv with probe).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_ARGS ?=

.PHONY: demo test typecheck docs compose-check dist bench bench-smoke deps venv stack-up stack-down clean

deps:
	@bash scripts/install-deps.sh

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# `probe demo`: private stack on free loopback ports, provider, say(), clean-up.
demo: deps venv
	@bash scripts/demo.sh $(VENV)/bin/probe

# The type check, the docs and the compose file first, so pytest's summary closes
# the log.
test: deps venv typecheck docs compose-check
	$(PY) -m pytest tests -q -p no:cacheprovider

# mypy on the whole package (settings in pyproject.toml); a type regression fails.
typecheck: venv
	$(VENV)/bin/mypy probe

docs: venv
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

compose-check:
	@bash scripts/compose-check.sh

dist: venv
	rm -rf dist
	$(PY) -m build --outdir dist .

bench: deps venv
	$(PY) bench/run.py $(BENCH_ARGS)

bench-smoke: deps venv
	$(PY) bench/run.py --smoke

stack-up: deps venv
	$(VENV)/bin/probe stack up

stack-down: venv
	$(VENV)/bin/probe stack down

clean:
	rm -rf $(VENV) dist build *.egg-info
