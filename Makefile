# Two commands do all the set-up on a fresh machine:
#   make demo   - the main job: the trainer on the embedded tiny default (2 CPU ranks)
#   make test   - the test suite
# Both create .venv if missing and install torch==2.14.1 torchvision==0.29.1 first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mogan_installed

# Idle OpenMP threads sleep rather than spin: ranks and loader workers share few cores here.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test test-fast lint format bench experiment clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m mogan_ds demo

test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests -m "not slow"

# ruff: one linter and formatter (config in pyproject.toml); CI runs `make lint`.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/motion_path.py
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/data.py
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/train_step.py

# The toy-world MoGAN experiment (experiments/toy_motion/README.md): seven cached, resumable stages.
# SCALE=smoke runs the CI size; results of the full size land in experiments/toy_motion/results/.
SCALE ?= full
experiment: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m experiments.toy_motion.run --scale $(SCALE)

clean:
	rm -rf .cache runs
