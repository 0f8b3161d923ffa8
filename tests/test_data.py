"""nanogpt.data: random training windows from the token files, and checks on them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from nanogpt.data import TokenBatches, read_meta
from nanogpt.errors import UserError


def write_split(folder, name: str, ids) -> None:
    np.asarray(ids, dtype=np.uint16).tofile(folder / f"{name}.bin")


@pytest.fixture
def counting_data(tmp_path):
    """train.bin holds 0, 1, 2, ... so a window's first token tells where it starts."""
    write_split(tmp_path, "train", np.arange(3000))
    write_split(tmp_path, "val", np.arange(100, 400))
    return tmp_path


def test_batches_are_windows_and_shifted_targets(counting_data):
    batches = TokenBatches(counting_data, block_size=16)
    assert batches.tokens("train") == 3000 and batches.tokens("val") == 300
    x, y = batches.get_batch("train", 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert torch.equal(row_x, torch.arange(start, start + 16))
        assert torch.equal(row_y, row_x + 1)
    assert len({int(r[0]) for r in x}) > 1  # random starting points
    xv, _ = batches.get_batch("val", 64, torch.Generator().manual_seed(0))
    assert int(xv.min()) >= 100 and int(xv.max()) < 400


def test_every_window_fits_and_the_last_one_is_reachable(tmp_path):
    write_split(tmp_path, "train", np.arange(20))
    write_split(tmp_path, "val", np.arange(20))
    batches = TokenBatches(tmp_path, block_size=16)
    x, y = batches.get_batch("train", 2000, torch.Generator().manual_seed(1))
    assert int(y.max()) == 19  # the final token is used as a target
    assert {int(s) for s in x[:, 0]} == set(range(4))


def test_the_generator_decides_the_batch(counting_data):
    batches = TokenBatches(counting_data, block_size=8)
    a = batches.get_batch("train", 4, torch.Generator().manual_seed(3))
    b = batches.get_batch("train", 4, torch.Generator().manual_seed(3))
    c = batches.get_batch("train", 4, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_missing_odd_short_and_mismatched_files(tmp_path):
    with pytest.raises(UserError, match="train.bin does not exist"):
        TokenBatches(tmp_path, block_size=8)
    write_split(tmp_path, "train", np.arange(100))
    (tmp_path / "val.bin").write_bytes(b"\x00" * 21)
    with pytest.raises(UserError, match="odd size"):
        TokenBatches(tmp_path, block_size=8)
    write_split(tmp_path, "val", np.arange(8))
    with pytest.raises(UserError, match="holds 8 tokens, too few for block_size=8"):
        TokenBatches(tmp_path, block_size=8)
    write_split(tmp_path, "val", np.arange(9))
    TokenBatches(tmp_path, block_size=8)  # block_size + 1 tokens are enough
    with pytest.raises(UserError, match="contains token id 99"):
        TokenBatches(tmp_path, block_size=8, vocab_size=50)


def test_read_meta(tmp_path):
    assert read_meta(tmp_path) == {"vocab_size": None, "tokenizer": {"kind": "gpt2"}}  # nanoGPT's openwebtext
    (tmp_path / "meta.json").write_text(
        json.dumps({"vocab_size": 2, "tokenizer": {"kind": "char", "chars": ["a", "b"]}})
    )
    assert read_meta(tmp_path)["vocab_size"] == 2
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": "2"}))
    with pytest.raises(UserError, match="vocab_size"):
        read_meta(tmp_path)


def test_every_token_id_is_checked_even_past_the_first_chunk_and_the_scan_is_cached(tmp_path):
    from nanogpt.data import max_token_id

    ids = np.zeros(100_000, dtype=np.uint16)
    ids[-1] = 70  # one bad id, in the last of many chunks
    ids.tofile(tmp_path / "train.bin")
    np.zeros(100, dtype=np.uint16).tofile(tmp_path / "val.bin")
    path = tmp_path / "train.bin"
    assert max_token_id(path, np.memmap(path, dtype=np.uint16, mode="r"), chunk=1000) == 70
    with pytest.raises(UserError, match="contains token id 70, but the model's vocabulary has 65 tokens"):
        TokenBatches(tmp_path, block_size=8, vocab_size=65)
    cache = tmp_path / ".train.bin.max_id.json"
    assert json.loads(cache.read_text())["max_id"] == 70
    # the cache is keyed by size and mtime: a rewritten file is scanned again
    ids[-1] = 3
    ids.tofile(path)
    os.utime(path, ns=(1, 1))
    TokenBatches(tmp_path, block_size=8, vocab_size=65)
    assert json.loads(cache.read_text())["max_id"] == 3
