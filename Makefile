# The two commands a newcomer needs:  `make reproduce`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# ImageNet weights wherever they can be had: $LESIONSEG_WEIGHTS, else the shared copy on the project's own
# machines, else torchvision's cache or download; only without all three does the demo train from scratch,
# and it says so on stderr and in results.md.
SHARED_WEIGHTS := $(abspath $(wildcard ../shared/weights/mobilenet_v2_imagenet_from_keras_int8.pth))
LESIONSEG_WEIGHTS ?= $(SHARED_WEIGHTS)
export LESIONSEG_WEIGHTS
ARGS ?= --out runs/demo --weights auto

.PHONY: install reproduce test lint release
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

reproduce: install
	$(BIN)/lesionseg reproduce $(ARGS)

test: install lint
	$(BIN)/python -m pytest -q
	.ci/wheel-check

lint: install
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/lint-imports

# The released model, rebuilt from ImageNet weights on the shared data (hours on a CPU): train, export, score, ship
# into src/lesionseg/release/. A rerun resumes training or skips what is done.
RELEASE_ARGS ?= --out runs/release --weights $(SHARED_WEIGHTS) --shared ../shared/data
release: install
	$(BIN)/python tools/release.py $(RELEASE_ARGS)
