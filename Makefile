# Two commands do everything: `make demo` and `make test`. Both install what is
# missing first (Debian packages for the local stack, a virtualenv with probe).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STACK := .demo-stack
BENCH_ARGS ?=

.PHONY: demo test bench bench-smoke deps venv stack-up stack-down clean

deps:
	@bash scripts/install-deps.sh

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: deps venv
	@PY=$(PY) DEMO_STACK=$(DEMO_STACK) bash scripts/demo.sh

test: deps venv
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: deps venv
	$(PY) bench/run.py $(BENCH_ARGS)

bench-smoke: deps venv
	$(PY) bench/run.py --smoke

stack-up: deps venv
	$(VENV)/bin/probe stack up

stack-down: venv
	$(VENV)/bin/probe stack down

clean:
	-$(VENV)/bin/probe stack down --dir $(DEMO_STACK) --wipe 2>/dev/null
	rm -rf $(VENV) $(DEMO_STACK) *.egg-info
