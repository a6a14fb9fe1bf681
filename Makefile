# aigc-dist: two commands on a fresh machine, `make demo` and `make test`.
# Install order matters: torch==2.13.0 first (a local CPU wheel here; anything else pulls GBs of
# CUDA packages), then DeepSpeed built against it without build isolation, then the project.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.aigc-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean system-deps

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make test` starts at once.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e '.[dev]'
	@touch $@

demo: install
	$(VENV)/bin/aigc-dist demo

lint: install
	$(VENV)/bin/ruff check .

# Debian packages the Prometheus integration tests run for real; installed when missing and make
# runs as root (CI), else named in the error (those tests fail without them, never skip).
SYSTEM_PACKAGES := prometheus prometheus-pushgateway
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else echo "make test: missing$$missing; install with: sudo apt-get install -y$$missing" >&2; exit 1; fi; \
	fi

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: install lint system-deps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache aigc-demo
