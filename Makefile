# Two commands for a fresh machine (only Python and pip needed):
#   make demo   set up .venv, prepare tiny Shakespeare, train a small model on the CPU (the CPU speedrun,
#               about 2.5 min), sample from it, evaluate it
#   make test   set up .venv and run ruff and every test, the slow ones included (what CI runs);
#               a plain `pytest` skips the few marked slow, for a quicker inner loop
#   make serve  the playground and OpenAI-compatible API for the demo's model, on http://127.0.0.1:8000
# TORCH pins the PyTorch wheel installed first; the default is the CPU build this project is tested with.
# On a GPU machine use e.g. `make demo TORCH=torch`. INPUT may name a text file to train on.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
INPUT ?=
DEMO_DIR := out-shakespeare-char

.PHONY: setup demo serve test test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The demo trains the CPU speedrun (config/speedrun_shakespeare_char_cpu.py, docs/recipe.md): the seed CPU
# command's model with RoPE, QK-norm, ReLU², a token shift, Muon and WSD, under a 120 s training budget
# (max_seconds), into the folder `make serve` opens. The seed's own CPU command is in the README and its tests.
demo: setup
	$(PY) data/shakespeare_char/prepare.py $(if $(INPUT),--input=$(INPUT))
	$(PY) train.py config/speedrun_shakespeare_char_cpu.py --out_dir=$(DEMO_DIR)
	$(PY) sample.py --out_dir=$(DEMO_DIR) --device=cpu --num_samples=3 --max_new_tokens=300
	$(PY) -m nanogpt eval --out_dir=$(DEMO_DIR) --device=cpu
	@echo
	@echo "Open the playground on this model: make serve   (then http://127.0.0.1:8000)"

serve: setup
	$(PY) -m nanogpt serve --out_dir=out-shakespeare-char

test: setup
	$(PY) -m ruff check nanogpt tests scripts train.py sample.py bench.py data
	$(PY) -m ruff format --check nanogpt tests scripts train.py sample.py bench.py data
	$(PY) -m pytest -q -m "slow or not slow"

test-all: test

bench: setup
	$(PY) bench.py

clean:
	rm -rf $(VENV) out-* build *.egg-info .pytest_cache
