# hyperdreambooth: every target builds on `setup`, which creates .venv from uv.lock.
SHELL := /bin/bash
PY := .venv/bin/python
UV := python3 -m uv
UV_VERSION := 0.13.8

.PHONY: setup face-encoder run test lint proto buf buf-lint buf-breaking buf-baseline bench eval reliability clean

setup: .venv/.setup-stamp face-encoder

# The frozen face encoder of identity-conditioned hypernetworks (hypernet/face_encoder.py): the npm
# tarball faceplugin-face-recognition-js@0.0.1, sha256-pinned, its model/fr_feature.onnx extracted to
# .cache/face_encoders/ (gitignored). Idempotent; without npm or a registry it warns and setup goes on
# (tests that need the file then skip, saying why).
face-encoder: .venv/.setup-stamp
	@$(PY) -c "from hypernet.face_encoder import fetch_face_encoder; print('face encoder:', fetch_face_encoder())" \
		|| echo "warning: face encoder not fetched (needs npm + the npm registry); identity-conditioned hypernetworks unavailable"

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

# ruff, then the layer contract (pyproject.toml [tool.importlinter]): a new arrow across layers
# fails; then the API contract: buf lint and buf breaking (below).
lint: setup buf
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	$(MAKE) --no-print-directory buf-lint buf-breaking

# buf checks the API contract (proto/, settings in proto/buf.yaml): `buf lint` (STANDARD rules) and
# `buf breaking` (FILE rules). The binary comes from the npm registry (@bufbuild/buf, pinned) into
# .cache/buf; `make test` runs the same lint through tests/serving/test_contract.py.
BUF_VERSION := 1.75.0
BUF := .cache/buf/node_modules/.bin/buf
# The contract as last released/reviewed (a buf image, JSON). `buf breaking` against it is what CI
# enforces: it passes after a deliberate change only when the same change updates this file
# (`make buf-baseline`), so a breaking change is always a visible, reviewed diff of it.
BUF_BASELINE := proto/contract-baseline.json

buf:
	@if [ "$$($(BUF) --version 2>/dev/null)" != "$(BUF_VERSION)" ]; then \
	  command -v npm >/dev/null || { echo "make buf: npm (Node.js) is needed to install @bufbuild/buf" >&2; exit 1; }; \
	  npm install --prefix .cache/buf --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION); \
	fi

buf-lint: buf
	$(BUF) lint proto

# 1. against the committed baseline (always); 2. against the previous commit, unless that commit
# updated the baseline (a deliberate contract change) or this clone has no previous commit (a
# shallow CI checkout): then it says so and skips only that part.
buf-breaking: buf
	$(BUF) breaking proto --against $(BUF_BASELINE)
	@if ! git rev-parse -q --verify HEAD~1 >/dev/null 2>&1; then \
	  echo "buf breaking vs the previous commit: SKIPPED (no HEAD~1 in this clone: shallow or first commit); the baseline check above ran"; \
	elif [ -z "$$(git ls-tree HEAD~1 -- proto/hyperdreambooth)" ]; then \
	  echo "buf breaking vs the previous commit: SKIPPED (no proto/ there)"; \
	elif ! git diff --quiet HEAD~1 HEAD -- $(BUF_BASELINE); then \
	  echo "buf breaking vs the previous commit: SKIPPED (the last commit updated $(BUF_BASELINE): a deliberate contract change)"; \
	else \
	  echo "$(BUF) breaking proto --against '.git#ref=HEAD~1,subdir=proto'"; \
	  $(BUF) breaking proto --against '.git#ref=HEAD~1,subdir=proto'; \
	fi

# Record the current contract as the baseline (only for a deliberate, reviewed contract change).
buf-baseline: buf
	$(BUF) build proto --exclude-source-info -o '-#format=json' | python3 -m json.tool --indent 1 > $(BUF_BASELINE)

# Every benchmark on CPU (< 30 min on an idle 2-core machine) -> benchmarks/results/ (JSON, REPORT.md, PNGs).
bench: setup
	$(PY) -m benchmarks

# Identity quality on people no training stage saw (issue 14) -> $(EVAL_OUT)/REPORT.md: four stages,
# each resumable (rerun `make eval` after a kill: finished work is skipped) and runnable alone
# (`make eval-corpus`, `eval-face-world`, `eval-pretrain`, `eval-run`; each makes the ones before).
# The defaults reproduce benchmarks/results/eval_v4/REPORT.md (30 Nov 2026: per-identity sampling
# seeds, the fine-tune at its 1e-2 default, the prediction at face-world-cpu's calibrated scale 3);
# measured wall times on the 2 shared cores (other jobs
# running; idle is ~1.5x faster):
#   eval-corpus      LFW + Caltech merged, 48 + 7 people held out ............ seconds
#   eval-face-world  face world v2, 2,500 steps of batch 32 (~1.6 s/step) + encoding 7,283 photos
#                    (<= 2 per person, one crop, no mirror; resumable shards)  ~2.5 h
#                    (dlib finds a face in 81% of 48 samples at 2,500, 85% at 4,000: raise
#                    FACE_WORLD_STEPS for a better instrument)
#   eval-pretrain    prepare (latents + MobileFaceNet embeddings, MTCNN-aligned) + stage 1 on
#                    $(STAGE1_IDENTITIES) training identities, batched (500 in 44 min on 2 ranks)
#                    + stage 2 (identity condition, 300 steps, ~1.1 s/step: 2,000 over-fitted from
#                    ~250 on) + ONNX export at the config's calibrated prediction_scale (3 for
#                    face-world-cpu: DIAGNOSIS.md section 10), then `probe` (seconds: can the face embedding predict
#                    the stage-1 targets at all? -> $(FACE_HYPERNET)/probe.json), then
#                    `mean-adapter` (seconds: the control, one adapter for everyone, as a
#                    hypernetwork export -> $(FACE_HYPERNET)/mean_adapter)                  ~1 h
#   eval-run         `hdb eval --sample-seeds per-identity` on the held-out people, both face
#                    metrics: hypernetwork only (1 and 3 photos), HyperDreamBooth and the fine-tune
#                    from zero (40 steps, relaxed in the LiDB subspace, lr 1e-2: the defaults),
#                    HyperDreamBooth from 3 photos, and the controls (the mean adapter alone and
#                    HyperDreamBooth from it) on all 55; LiDB (400 steps, lr 3e-3) on the first
#                    $(FAST_PEOPLE); LoRA, DreamBooth (400) and Textual Inversion (500) on
#                    $(SLOW_PEOPLE) (the report's cells sum to 6.1 h, computed with up to 8
#                    processes sharing the 2 cores; ~3.5 h alone. Split conditions over two
#                    processes with the same --out and --inputs 3 to use both cores)
#                    The variants of eval_v2/REPORT.md (lr 1e-3, seeds 0..9) run when added:
#                    EVAL_CONDITIONS="$(EVAL_CONDITIONS),$(EVAL_VARIANTS)"                 ~3.5 h
LFW ?= ../shared/data/faces/lfw/identities.csv
CALTECH ?= ../shared/data/faces/caltech/identities.csv
CORPUS ?= runs/corpus_v2
FACE_WORLD ?= runs/face_world_v2
FACE_WORLD_STEPS ?= 2500
FACE_WORLD_WIDTH ?= 64
FACE_HYPERNET ?= runs/face_world_v2_hypernet
STAGE1_IDENTITIES ?= 500
HYPERNET_CONDITION ?= identity
STAGE2_STEPS ?= 300
PRETRAIN_SETS = --set base=$(FACE_WORLD) --set 'data.corpus=["$(FACE_WORLD)/train_identities.csv"]' \
	--set data.max_identities=$(STAGE1_IDENTITIES) --set stage2.model.condition=$(HYPERNET_CONDITION) \
	--set stage2.steps=$(STAGE2_STEPS)
FAST_PEOPLE ?= 24
SLOW_PEOPLE ?= 6
EVAL_OUT ?= runs/eval_v4
EVAL_CONDITIONS ?= base,hypernetwork,hypernetwork-3photos,fast-finetune,hyperdreambooth,hyperdreambooth-3photos,\
	mean-adapter,hyperdreambooth-mean-adapter,lidb,lora,dreambooth,textual-inversion
EVAL_VARIANTS = hypernetwork-3photos-embedding,hyperdreambooth-3photos-ft1,hyperdreambooth-3photos-batch3,\
	hyperdreambooth-relax-lora,fast-finetune-relax-lora,hyperdreambooth-identity,fast-finetune-identity,\
	hyperdreambooth-3photos-identity,hyperdreambooth-3photos-ft1-identity,hyperdreambooth-3photos-eachnorm,\
	hyperdreambooth-1photo-x3-eachnorm
EVAL_ARGS ?= --override dreambooth.steps=400 --override textual-inversion.steps=500
.PHONY: eval-corpus eval-face-world eval-pretrain eval-run
eval: eval-run
eval-corpus: setup
	$(PY) -m hdb.cli base make-corpus --out $(CORPUS) \
		--part lfw=$(LFW) --holdout lfw=48:5 --part caltech=$(CALTECH) --holdout caltech=7:3
eval-face-world: eval-corpus
	nice -n 19 $(PY) -m hdb.cli base train-face-world --corpus $(CORPUS)/identities.csv \
		--split $(CORPUS)/split.json --out $(FACE_WORLD) --steps $(FACE_WORLD_STEPS) --width $(FACE_WORLD_WIDTH) --threads 2 \
		--export-every 500 --detector center --margins 0.5 --max-photos 2 --no-mirror --resume
# stage 1 reads only the face world's train_identities.csv: no held-out person reaches pretraining
eval-pretrain: eval-face-world
	nice -n 19 $(PY) -m hdb.cli pretrain all --config face-world-cpu --output-dir $(FACE_HYPERNET) $(PRETRAIN_SETS)
	$(PY) -m hdb.cli pretrain probe --config face-world-cpu --output-dir $(FACE_HYPERNET) $(PRETRAIN_SETS)
	$(PY) -m hdb.cli pretrain mean-adapter --config face-world-cpu --output-dir $(FACE_HYPERNET) $(PRETRAIN_SETS)
eval-run: eval-pretrain
	nice -n 19 $(PY) -m hdb.cli eval --base $(FACE_WORLD) --hypernet $(FACE_HYPERNET)/export \
		--mean-adapter $(FACE_HYPERNET)/mean_adapter \
		--corpus $(CORPUS)/identities.csv --out $(EVAL_OUT) --threads 1 --detector center --inputs 3 \
		--sample-seeds per-identity --conditions $(EVAL_CONDITIONS) \
		--people hyperdreambooth-3photos-batch3=$(FAST_PEOPLE) --people hyperdreambooth-relax-lora=$(FAST_PEOPLE) \
		--people fast-finetune-relax-lora=$(FAST_PEOPLE) --people lidb=$(FAST_PEOPLE) --people lora=$(SLOW_PEOPLE) \
		--people dreambooth=$(SLOW_PEOPLE) --people textual-inversion=$(SLOW_PEOPLE) $(EVAL_ARGS)

# Fuzzing, fault injection, a 10-minute soak, security and privacy checks of the gRPC service
# (< 30 min on 2 cores) -> benchmarks/results/reliability.md (+ .json, soak PNG).
reliability: setup
	$(PY) -m benchmarks.reliability

clean:
	rm -rf .venv .cache
