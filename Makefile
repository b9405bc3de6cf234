# Quick start: `make demo` (set up + run the main job on the synthetic videos), `make test` (set up + tests).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/activate: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	touch $(BIN)/activate

setup: $(BIN)/activate

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tokenizer.py --vfm tiny --model tiny --size 64 --global-batch 32 \
		--batch-size 32 --steps 400 --warmup 40 --lr 1e-3 --eval-every 200 --ckpt-every 200 \
		--num-workers 1 --out runs/demo/tokenizer

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

.PHONY: setup demo test

# GPU benchmarks of BENCHMARKS.md (random ViT-B weights, 256 px, bf16 + torch.compile), one after the other
BENCH = --vfm vitb16-random --size 256 --dtype bf16 --compile --bench 20
bench: setup
	$(BIN)/python tokenizer.py $(BENCH) --model base --batch-size 64
	$(BIN)/python baseline_dinoworld.py $(BENCH) --model base --batch-size 32
	$(BIN)/python baseline_dinoworld.py $(BENCH) --model base --batch-size 32 --bom 16
	$(BIN)/python predictor.py $(BENCH) --model base --batch-size 32 --bench-mode frame --bom 256
	$(BIN)/python predictor.py $(BENCH) --model base --batch-size 32 --bom 256
	$(BIN)/python predictor.py $(BENCH) --model base --batch-size 32 --no-bom
	$(BIN)/python predictor.py $(BENCH) --model base --batch-size 32 --bom 256 --cache-tokens bench

.PHONY: bench
