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
# Held-out checks every 600 / 100 steps draw each stage's curves.png (they do not change the training).
# A second `make demo` continues every stage from its checkpoint (--resume: with more steps, e.g. TOK_STEPS=6000, a
# stage goes on from where it stopped). A tokenizer checkpoint newer than the token cache gives other tokens: the
# cache and DeltaWorld, made from the old ones, then start afresh (an interrupted cache build resumes).
demo: export OMP_NUM_THREADS ?= 1
demo: $(SETUP)
	$(RUN) tokenizer.py $(COMMON) --vfm $(VFM) --model $(MODEL) --steps $(TOK_STEPS) --global-batch 64 \
		--batch-size 64 --lr 2e-3 --warmup 40 --no-rope-jitter --eval-every 600 --ckpt-every 1000 \
		--out $(OUT)/tokenizer --resume
	if [ ! $(OUT)/token_cache/shard_00000.pt -nt $(OUT)/tokenizer/ckpt.pt ]; then \
		rm -rf $(OUT)/token_cache $(OUT)/deltaworld; fi
	$(RUN) predictor.py $(COMMON) --tokenizer $(OUT)/tokenizer/ckpt.pt --model $(MODEL) --bom 64 \
		--cache-tokens $(OUT)/token_cache --cache-crops 8 --steps $(WORLD_STEPS) --global-batch 32 \
		--batch-size 32 --lr 1e-3 --warmup 50 --eval-every 100 --ckpt-every $(WORLD_STEPS) \
		--out $(OUT)/deltaworld --resume
	$(RUN) baseline_dinoworld.py $(COMMON) --vfm $(VFM) --model $(MODEL) --steps $(DINO_STEPS) --global-batch 16 \
		--batch-size 16 --lr 1e-3 --warmup 50 --eval-every 100 --ckpt-every $(DINO_STEPS) \
		--out $(OUT)/dinoworld --resume
	$(RUN) heads.py $(COMMON) --task seg --vfm $(VFM) --steps $(HEAD_STEPS) --batch-size 32 --lr 1e-2 --warmup 20 \
		--eval-every 100 --ckpt-every $(HEAD_STEPS) --out $(OUT)/seg_head --resume
	$(RUN) heads.py $(COMMON) --task depth --vfm $(VFM) --steps $(HEAD_STEPS) --batch-size 32 --lr 1e-2 --warmup 20 \
		--eval-every 100 --ckpt-every $(HEAD_STEPS) --out $(OUT)/depth_head --resume
	$(RUN) eval.py --ckpt $(OUT)/tokenizer/ckpt.pt $(OUT)/dinoworld/ckpt.pt $(OUT)/deltaworld/ckpt.pt \
		--heads $(OUT)/seg_head/ckpt.pt $(OUT)/depth_head/ckpt.pt --size $(SIZE) --dtype $(DTYPE) --seed $(SEED) \
		--samples 20 --max-sequences $(EVAL_SEQUENCES) --figures 2 --num-workers 1 --out $(OUT)/eval
	$(RUN) eval.py --video synthetic --ckpt $(OUT)/deltaworld/ckpt.pt --heads $(OUT)/seg_head/ckpt.pt \
		$(OUT)/depth_head/ckpt.pt --size $(SIZE) --dtype $(DTYPE) --seed $(SEED) --samples 8 --out $(OUT)/forecast
	@echo "table: $(OUT)/eval/results.json and above; figures: $(OUT)/eval/*.png; forecast: $(OUT)/forecast/; curves: $(OUT)/*/curves.png"

$(VENV)/test-requirements: requirements-test.txt $(BIN)/activate  # the suite's own: pytest, wandb (offline)
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

test: $(VENV)/test-requirements
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# the paper's claims on a smaller run of the demo (about 8 minutes on 2 cores; skipped by `make test`)
test-claims: $(VENV)/test-requirements
	HF_HUB_OFFLINE=1 RUN_SLOW=1 $(BIN)/python -m pytest -q tests/test_demo.py tests/test_bench.py

.PHONY: setup demo test test-claims

# The GPU benchmarks of BENCHMARKS.md in one command: random ViT-B weights, bf16 + torch.compile, every row its own
# process with a time limit, so that one slow compile costs only its row. Each bench appends a JSON line to
# $(BENCH_OUT)/bench.jsonl; the table then replaces the <!-- bench-gpu --> block of $(BENCH_MD).
# On a CPU at tiny size (what tests/test_bench.py runs): make bench-gpu BENCH_VFM=tiny BENCH_MODEL=tiny ...
BENCH_VFM ?= vitb16-random
BENCH_MODEL ?= base
BENCH_S ?= 256
BENCH_L ?= 512
BENCH_B ?= 32
BENCH_TB ?= 64
BENCH_K ?= 256
BENCH_STEPS ?= 10
BENCH_FLAGS ?= --dtype bf16 --compile
BENCH_TIME ?= 1
BENCH_OUT ?= runs/bench
BENCH_MD ?= BENCHMARKS.md
BENCH_WORKERS ?= 14
BENCH_VIDEO ?= runs/videos/720p_gop125
BENCH_SEQUENCES ?= 64
B = --vfm $(BENCH_VFM) --model $(BENCH_MODEL) --bench $(BENCH_STEPS) $(BENCH_FLAGS)
# the token cache and eval.py rows use checkpoints of one training step from random weights (no compile)
ONE = --steps 1 --batch-size 1 --num-workers 0 $(filter-out --compile,$(BENCH_FLAGS))
# $(call row,name,seconds,script and flags): a bench that fails or runs past its seconds (x BENCH_TIME, compilation
# included) is recorded as such, and the rest go on. The limits add up to 7 min 40 s.
row = BENCH_ROW="$(1)" BENCH_JSON=$(BENCH_OUT)/bench.jsonl timeout $$(($(2) * $(BENCH_TIME))) $(RUN) $(3) || \
	echo '{"row": "$(1)", "failed": true}' >> $(BENCH_OUT)/bench.jsonl
bench-gpu: $(SETUP) $(BENCH_VIDEO)/video.mp4
	rm -rf $(BENCH_OUT)/bench.jsonl $(BENCH_OUT)/cache && mkdir -p $(BENCH_OUT)
	$(call row,DeltaWorld BoM $(BENCH_K) $(BENCH_S) px,60,predictor.py $(B) --size $(BENCH_S) --batch-size $(BENCH_B) --bom $(BENCH_K))
	$(call row,DeltaWorld sampling 20 x 3 steps $(BENCH_L) px,55,predictor.py $(B) --size $(BENCH_L) --batch-size 8 --bench-mode sample)
	$(call row,DINO-world + BoM 16 $(BENCH_S) px,60,baseline_dinoworld.py $(B) --size $(BENCH_S) --batch-size $(BENCH_B) --bom 16)
	$(call row,DeltaWorld BoM $(BENCH_K) $(BENCH_L) px,50,predictor.py $(B) --size $(BENCH_L) --batch-size $(BENCH_B) --bom $(BENCH_K))
	$(call row,DeltaTok $(BENCH_L) px,45,tokenizer.py $(B) --size $(BENCH_L) --batch-size $(BENCH_TB))
	$(call row,DeltaTok $(BENCH_S) px,35,tokenizer.py $(B) --size $(BENCH_S) --batch-size $(BENCH_TB))
	$(call row,loader 720p H.264 GOP 125 $(BENCH_WORKERS) workers,25,data.py --bench $(BENCH_VIDEO) --workers $(BENCH_WORKERS))
	$(RUN) data.py --prepare $(BENCH_VIDEO) $(BENCH_OUT)/prepared --workers $(BENCH_WORKERS)
	$(call row,loader prepared copy $(BENCH_WORKERS) workers,25,data.py --bench $(BENCH_OUT)/prepared --workers $(BENCH_WORKERS))
	$(RUN) tokenizer.py --vfm $(BENCH_VFM) --model $(BENCH_MODEL) --size $(BENCH_S) $(ONE) --global-batch 1 --val-clips 1 --out $(BENCH_OUT)/tok
	$(call row,token cache $(BENCH_S) px 8 frames,45,predictor.py --tokenizer $(BENCH_OUT)/tok/ckpt.pt --model $(BENCH_MODEL) --size $(BENCH_S) --cache-tokens $(BENCH_OUT)/cache --cache-crops 0.25 $(ONE) --global-batch $(BENCH_B) --batch-size $(BENCH_B) --bom $(BENCH_K) --val-clips 1 --val-samples 2 --num-workers $(BENCH_WORKERS) --out $(BENCH_OUT)/world)
	$(RUN) heads.py --task seg --vfm $(BENCH_VFM) --size $(BENCH_L) $(ONE) --val-sequences 1 --out $(BENCH_OUT)/seg
	$(call row,eval.py 20 samples $(BENCH_L) px,60,eval.py --ckpt $(BENCH_OUT)/world/ckpt.pt --heads $(BENCH_OUT)/seg/ckpt.pt --size $(BENCH_L) --samples 20 --max-sequences $(BENCH_SEQUENCES) --figures 0 --num-workers $(BENCH_WORKERS) --out $(BENCH_OUT)/eval)
	$(RUN) data.py --bench-table $(BENCH_OUT)/bench.jsonl $(BENCH_MD)
	@echo "rows: $(BENCH_OUT)/bench.jsonl; table: $(BENCH_MD)"

$(BENCH_VIDEO)/video.mp4:  # the loader rows' test videos (tests/videos.py), made once
	$(RUN) tests/videos.py $(dir $(patsubst %/,%,$(dir $@)))

.PHONY: bench-gpu

# Loader speed on reproducible H.264 test videos (BENCHMARKS.md): 360p / 720p, key frame every 60 / 125 frames,
# read as they are and after `data.py --prepare`; clips/s of the training loader, 20 s each
WORKERS ?= 1
bench-data: $(SETUP)
	$(RUN) tests/videos.py runs/videos
	$(RUN) data.py --prepare runs/videos runs/videos_prepared --workers $(WORKERS)
	for d in runs/videos/* runs/videos_prepared/*; do echo $$d; $(RUN) data.py --bench $$d --workers $(WORKERS); done

.PHONY: bench-data

# Start-up on a Kinetics-size corpus (issue 17): N hard links of one 10 s 360p video in train/<class>/ folders; the
# first start (index built on all cores), a later start and --trust-index, extrapolated to 545,000 videos, and the
# index's memory per process and per DataLoader worker
N ?= 20000
bench-index: $(SETUP)
	$(RUN) tests/bench_index.py $(N)

.PHONY: bench-index
