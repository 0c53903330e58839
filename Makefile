# The two commands: `make demo` and `make test`. Both set up everything on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv tools lint typecheck plane lock chart-sync bench wrk clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip wheel setuptools
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev,transformers]"
	touch $@

venv: $(STAMP)

# Test control plane binaries (etcd, kube-apiserver/-controller-manager/-scheduler, kwok, KubeRay, helm),
# built from Go modules and cached by version in ~/.cache/regserve-tools.
tools:
	tools/build.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# The docs site (mkdocs.yml, docs/): --strict fails on a broken link or reference. Offline.
.PHONY: docs
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

test: venv tools lint typecheck docs
	$(BIN)/pytest --durations=25 $(PYTEST_ARGS)

# The inner loop: lint, types and the tests that need neither the control plane nor Ray and are not
# slow (pure, in-process, a local mlflow server); under two minutes on 2 cores. CI runs `make test`.
test-fast: venv lint typecheck
	$(BIN)/pytest -m "not k8s and not ray and not kuberay and not slow" --durations=10 $(PYTEST_ARGS)

demo: venv
	$(BIN)/regserve demo

# Starts the test control plane for manual use, with real Ray behind the pods of namespace kuberay-ray,
# an mlflow server holding a demo model and the operator; prints what to apply and curl (needs root).
# Ctrl-C stops it. `python -m tests.k8s.plane` starts the bare control plane.
plane: venv tools
	$(BIN)/python -m tests.k8s.playground

# Regenerates the chart's and deploy/'s copies of crds/ and the RBAC rules (a test fails on drift).
chart-sync: venv
	$(BIN)/regserve crd > crds/regserve.io_registeredmodelservings.yaml
	$(BIN)/python -m tests.install.chart_sync

# Benchmarks (bench/README.md): about 25 minutes on 2 cores; prints tables, writes bench/results/.
bench: venv wrk
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.versions --rounds 2 --duration 2 --cold 2
	$(BIN)/python -m bench.promotion
	$(BIN)/python -m bench.registry_load
	$(BIN)/python -m bench.hostile_registry
	$(BIN)/python -m bench.profile_replica
	$(BIN)/python -m bench.shared_cluster
	$(BIN)/python -m bench.autoscaling
	$(BIN)/python -m bench.payloads --rounds 3 --duration 2

# Re-pins constraints.txt from the current virtualenv.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^regserve' > constraints.txt

# The benchmarks' load generator (bench/wrk.py).
wrk:
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
