# The two README commands (`make demo`, `make test`) work from a fresh clone: each creates
# .venv if missing and installs the project with every extra and the test tools, torch pinned
# (constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= runs/demo
SOL_DEMO_OUT ?= runs/sol-demo

.PHONY: demo test test-slow test-core bench install proto mlserver-venv clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q -c constraints.txt -e '.[all,test]'
	touch $@

# the main job: a solver-in-the-loop comparison with the solver served by an embedded gRPC
# server, then the digits classifier trained by ZO beside FO
demo: install
	$(PY) examples/sol_demo.py $(SOL_DEMO_OUT)
	$(PY) examples/demo.py --out $(DEMO_OUT)

# the MLServer peer's own environment is part of the install: the tests start MLServer from it
test: install mlserver-venv
	$(PY) -m pytest -q -m "not slow" -n 2

test-slow: install mlserver-venv
	$(PY) -m pytest -q -m slow
	$(MAKE) test-core

# the core install (no extra) in a fresh virtualenv: imports, the plain-function example, a served
# query, and the one-line hints of missing extras
test-core: install
	$(PY) tests/core_only/check.py

bench: install
	$(PY) benchmarks/run.py

proto: install
	$(PY) protos/generate.py

mlserver-venv:
	bash tests/mlserver/setup_venv.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
