"""Bit-for-bit compatibility with the code as it was before the restructuring of issue 18.

tests/fixtures/compat/ holds a checkpoint written by that code (RoPE, QK-norm, ReLU^2 and the token
shift on) and the figures that code gave (record.py): a seeded run's full-precision losses, a seeded
sample, a greedy sample of the checkpoint and its evaluation. Today's code must give the same, bit for
bit, in the same pinned environment (record.PINNED_ENV: figures independent of the CPU's instructions).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "compat"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def record():
    spec = importlib.util.spec_from_file_location("compat_record", FIXTURE / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_old_checkpoint_samples_and_evaluates_bit_for_bit(record, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "old"
    ckpt_dir.mkdir()
    shutil.copy(FIXTURE / "ckpt.pt", ckpt_dir / "ckpt.pt")
    shutil.copy(FIXTURE / "corpus.txt", tmp_path / "corpus.txt")
    got = record.use_checkpoint(ckpt_dir, tmp_path / "corpus.txt", tmp_path)
    assert got["greedy_sample"] == EXPECTED["greedy_sample"]
    assert got["eval_output"] == EXPECTED["eval_output"]
    assert got["eval_nats"] == EXPECTED["eval_nats"]


def test_seeded_run_gives_the_recorded_losses_and_sample(record, tmp_path: Path) -> None:
    got = record.train_and_sample(FIXTURE / "corpus.txt", tmp_path)
    assert got["train_losses"] == EXPECTED["train_losses"]  # every iteration, full precision
    assert got["eval_losses"] == EXPECTED["eval_losses"]
    assert got["seeded_sample"] == EXPECTED["seeded_sample"]
    assert len(got["train_losses"]) == 201 and got["train_losses"][-1] < got["train_losses"][0] - 2
