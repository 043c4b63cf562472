# Two entry points for a fresh machine: `make demo` (install + train + evaluate on the
# embedded shapes data) and `make test` (install + the test suite). CI runs `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On CPU machines this is a local CPU wheel; GPU clusters keep the CUDA torch already in
# their environment (make install VENV=... TORCH_SPEC=) and pip will not replace it.
TORCH_SPEC ?= torch==2.13.0
RUN ?= shapes_fast_cpu

.PHONY: install demo test data data-video clean-demo

$(BIN)/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	@# torch first: a package's build environment would otherwise pull a multi-GB CUDA torch
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q wheel "setuptools>=64"
	@# deepspeed ships only an sdist; building it needs torch, hence no build isolation
	@# fp8: torchao, for trainer.fp8's emulated CPU tests (its CUDA kernels only log on a CPU)
	$(BIN)/pip install -q --no-build-isolation -e '.[test,hf,remote,fp8]'
	touch $@

install: $(VENV)/.installed

data/shapes/val: | $(VENV)/.installed
	$(BIN)/mmgen data make-shapes --out data/shapes

# the caption BPE of experiment=shapes_fast_cpu (data.tokenizer=hf:data/shapes/tokenizer)
data/shapes/tokenizer/tokenizer.json: | data/shapes/val
	$(BIN)/mmgen data train-tokenizer data/shapes/train --out data/shapes/tokenizer

data: data/shapes/val data/shapes/tokenizer/tokenizer.json

# the moving-shapes clips (experiment=shapes_video_cpu, data=shapes_mix): 16 frames at 8 fps
data/shapes_video/val: | $(VENV)/.installed
	$(BIN)/mmgen data make-shapes-video --out data/shapes_video --train 10000

data-video: data/shapes_video/val

# experiment=shapes_fast_cpu: 1,600 steps, ~4 minutes of training on 2 quiet CPU cores and
# ~8.5 on a machine twice as slow (its max_minutes=9 keeps the demo within 15 minutes on a
# loaded one), then scores on 100 held-out prompts and images and the sample grid's path.
# The slower original benchmark preset: experiment=shapes_cpu (bench/shapes_quality.py).
demo: install data
	$(BIN)/mmgen-train experiment=shapes_fast_cpu name=$(RUN)
	$(BIN)/mmgen eval shapes runs/$(RUN) --num-samples 100

test: install
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf runs/$(RUN)
