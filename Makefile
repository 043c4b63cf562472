# Two entry points for a fresh machine: `make demo` (install + train + evaluate on the
# embedded shapes data) and `make test` (install + the test suite). CI runs `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On CPU machines this is a local CPU wheel; GPU clusters keep the CUDA torch already in
# their environment (make install VENV=... TORCH_SPEC=) and pip will not replace it.
TORCH_SPEC ?= torch==2.13.0
RUN ?= shapes_cpu

.PHONY: install demo test data clean-demo

$(BIN)/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	@# torch first: a package's build environment would otherwise pull a multi-GB CUDA torch
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q wheel "setuptools>=64"
	@# deepspeed ships only an sdist; building it needs torch, hence no build isolation
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $@

install: $(VENV)/.installed

data/shapes/val: | $(VENV)/.installed
	$(BIN)/mmgen data make-shapes --out data/shapes

data: data/shapes/val

demo: install data
	$(BIN)/mmgen-train experiment=shapes_cpu name=$(RUN)
	$(BIN)/mmgen eval shapes runs/$(RUN)

test: install
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf runs/$(RUN)
