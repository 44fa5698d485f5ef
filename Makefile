# The two commands a newcomer needs:  `make reproduce`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# Offline machines have no ImageNet weights: the demo trains the encoder from scratch.
# With internet (or the weights in $TORCH_HOME/hub/checkpoints) use: make reproduce ARGS="--out runs/demo"
ARGS ?= --out runs/demo --no-pretrained

.PHONY: install reproduce test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

reproduce: install
	$(BIN)/lesionseg reproduce $(ARGS)

test: install
	$(BIN)/python -m pytest -q
