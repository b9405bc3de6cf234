# Quick start: `make demo` (set up + run the main job on the synthetic videos), `make test` (set up + tests).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/activate: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	touch $(BIN)/activate

setup: $(BIN)/activate

# The whole pipeline on the built-in synthetic videos: DeltaTok -> DeltaWorld (from a token cache) and the
# DINO-world baseline -> segmentation and depth heads -> eval.py's table and figures, all in $(OUT).
# Defaults: a tiny random DINOv3 at 64 px, minutes on a CPU. On a GPU with the real weights, for example:
#   make demo VFM=facebook/dinov3-vitb16-pretrain-lvd1689m SIZE=256 DTYPE=bf16 OUT=runs/demo_vitb
VFM ?= tiny
SIZE ?= 64
MODEL ?= tiny
DTYPE ?= fp32
SEED ?= 0
OUT ?= runs/demo
TOK_STEPS ?= 3600
WORLD_STEPS ?= 500
DINO_STEPS ?= 600
HEAD_STEPS ?= 500
EVAL_SEQUENCES ?= 128
RUN ?= $(BIN)/python
# `make demo SETUP= RUN=python3` (or bench) uses an existing Python environment instead of .venv
SETUP ?= setup
COMMON = --size $(SIZE) --dtype $(DTYPE) --seed $(SEED) --num-workers 2 --log-every 50

# one compute thread per process: on a small CPU the data-loader workers need the other cores (on 2 cores the
# tokenizer trains 1.5x faster than with PyTorch's default of one thread per core)
demo: export OMP_NUM_THREADS ?= 1
demo: $(SETUP)
	$(RUN) tokenizer.py $(COMMON) --vfm $(VFM) --model $(MODEL) --steps $(TOK_STEPS) --global-batch 64 \
		--batch-size 64 --lr 2e-3 --warmup 40 --no-rope-jitter --eval-every $(TOK_STEPS) --ckpt-every 1000 \
		--out $(OUT)/tokenizer
	$(RUN) predictor.py $(COMMON) --tokenizer $(OUT)/tokenizer/ckpt.pt --model $(MODEL) --bom 64 \
		--cache-tokens $(OUT)/token_cache --cache-crops 8 --steps $(WORLD_STEPS) --global-batch 32 \
		--batch-size 32 --lr 1e-3 --warmup 50 --eval-every $(WORLD_STEPS) --ckpt-every $(WORLD_STEPS) \
		--out $(OUT)/deltaworld
	$(RUN) baseline_dinoworld.py $(COMMON) --vfm $(VFM) --model $(MODEL) --steps $(DINO_STEPS) --global-batch 16 \
		--batch-size 16 --lr 1e-3 --warmup 50 --eval-every $(DINO_STEPS) --ckpt-every $(DINO_STEPS) \
		--out $(OUT)/dinoworld
	$(RUN) heads.py $(COMMON) --task seg --vfm $(VFM) --steps $(HEAD_STEPS) --batch-size 32 --lr 1e-2 --warmup 20 \
		--eval-every $(HEAD_STEPS) --ckpt-every $(HEAD_STEPS) --out $(OUT)/seg_head
	$(RUN) heads.py $(COMMON) --task depth --vfm $(VFM) --steps $(HEAD_STEPS) --batch-size 32 --lr 1e-2 --warmup 20 \
		--eval-every $(HEAD_STEPS) --ckpt-every $(HEAD_STEPS) --out $(OUT)/depth_head
	$(RUN) eval.py --ckpt $(OUT)/tokenizer/ckpt.pt $(OUT)/dinoworld/ckpt.pt $(OUT)/deltaworld/ckpt.pt \
		--heads $(OUT)/seg_head/ckpt.pt $(OUT)/depth_head/ckpt.pt --size $(SIZE) --dtype $(DTYPE) --seed $(SEED) \
		--samples 20 --max-sequences $(EVAL_SEQUENCES) --figures 2 --num-workers 1 --out $(OUT)/eval
	@echo "table: $(OUT)/eval/results.json and above; figures: $(OUT)/eval/*.png"

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# the paper's claims on a smaller run of the demo (about 8 minutes on 2 cores; skipped by `make test`)
test-claims: setup
	HF_HUB_OFFLINE=1 RUN_SLOW=1 $(BIN)/python -m pytest -q tests/test_demo.py

.PHONY: setup demo test test-claims

# GPU benchmarks of BENCHMARKS.md (random ViT-B weights, 256 px, bf16 + torch.compile), one after the other
BENCH ?= --vfm vitb16-random --size 256 --dtype bf16 --compile --bench 20
bench: $(SETUP)
	$(RUN) tokenizer.py $(BENCH) --model base --batch-size 64
	$(RUN) baseline_dinoworld.py $(BENCH) --model base --batch-size 32
	$(RUN) predictor.py $(BENCH) --model base --batch-size 32 --bom 256
	$(RUN) predictor.py $(BENCH) --model base --batch-size 32 --no-bom
	$(RUN) predictor.py $(BENCH) --model base --batch-size 32 --bench-mode frame --bom 256
	$(RUN) baseline_dinoworld.py $(BENCH) --model base --batch-size 32 --bom 16
	$(RUN) predictor.py $(BENCH) --model base --batch-size 32 --bom 256 --cache-tokens bench

.PHONY: bench
