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
	$(PY) -m hdb.cli serve

test: setup
	$(PY) -m pytest -q

# ruff, then the layer contract (pyproject.toml [tool.importlinter]): a new arrow across layers fails.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports

# Every benchmark on CPU (< 30 min on an idle 2-core machine) -> benchmarks/results/ (JSON, REPORT.md, PNGs).
bench: setup
	$(PY) -m benchmarks

# Identity quality on held-out faces (REPORT.md with Table 1 + CIs): trains the face world and its
# hypernetwork first (~1 h on 2 idle cores; each step resumes and skips finished work), then `hdb eval`.
# The defaults are the settings of the numbers quoted in README.md.
FACES ?= ../shared/data/faces/caltech/identities.csv
FACE_WORLD ?= runs/face_world
FACE_WORLD_STEPS ?= 1500
FACE_HYPERNET ?= runs/face_world_hypernet
EVAL_OUT ?= runs/eval
EVAL_ARGS ?=
eval: setup
	nice -n 19 $(PY) -m hdb.cli base train-face-world \
		--corpus $(FACES) --out $(FACE_WORLD) --steps $(FACE_WORLD_STEPS) --threads 2 --resume
	nice -n 19 $(PY) -m hdb.cli pretrain all \
		--config tiny-cpu --output-dir $(FACE_HYPERNET) --set base=$(FACE_WORLD) --set device=cpu \
		--set 'data.corpus=["$(FACE_WORLD)/train_identities.csv"]' --set data.max_images_per_identity=8 \
		--set stage1.train.steps=100 --set stage2.steps=300
	nice -n 19 $(PY) -m hdb.cli eval --base $(FACE_WORLD) --hypernet $(FACE_HYPERNET)/export \
		--corpus $(FACES) --out $(EVAL_OUT) --threads 1 $(EVAL_ARGS)

# Fuzzing, fault injection, a 10-minute soak, security and privacy checks of the gRPC service
# (< 30 min on 2 cores) -> benchmarks/results/reliability.md (+ .json, soak PNG).
reliability: setup
	$(PY) -m benchmarks.reliability

clean:
	rm -rf .venv .cache
