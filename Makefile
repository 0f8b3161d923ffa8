# Two commands for a fresh machine (only Python and pip needed):
#   make demo   set up .venv, prepare tiny Shakespeare, train a small model on the CPU, sample from it
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
DEMO_ARGS := --device=cpu --compile=False --eval_iters=20 --log_interval=50 --block_size=64 --batch_size=12 \
	--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

.PHONY: setup demo serve test test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) data/shakespeare_char/prepare.py $(if $(INPUT),--input=$(INPUT))
	$(PY) train.py config/train_shakespeare_char.py $(DEMO_ARGS)
	$(PY) sample.py --out_dir=out-shakespeare-char --device=cpu --num_samples=3 --max_new_tokens=300
	$(PY) -m nanogpt eval --out_dir=out-shakespeare-char --device=cpu

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
