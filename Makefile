# hyperdreambooth: every target builds on `setup`, which creates .venv from uv.lock.
SHELL := /bin/bash
PY := .venv/bin/python
UV := python3 -m uv
UV_VERSION := 0.13.8

.PHONY: setup run test lint proto bench eval reliability clean

setup: .venv/.setup-stamp

.venv/.setup-stamp: pyproject.toml uv.lock
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q "uv==$(UV_VERSION)"
	$(UV) sync --frozen --all-groups --extra eval
	$(MAKE) --no-print-directory proto
	@touch $@

# Python gRPC stubs are generated from proto/ at build time, never edited by hand.
proto:
	@if [ -f serving/proto_build.py ]; then $(PY) -m serving.proto_build; fi

# `hdb serve`: the gRPC service on localhost:50051 with the embedded tiny models (dev mode).
run: setup
	$(PY) -m hypernet.recipes.cli serve

test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check .

# Every benchmark on CPU (< 30 min on an idle 2-core machine) -> benchmarks/results/ (JSON, REPORT.md, PNGs).
bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf .venv .cache
