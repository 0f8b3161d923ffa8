"""OpenWebText preparation, run on a small local datasets.Dataset (no download)."""

import numpy as np
import pytest

from nanogpt.errors import UserError
from nanogpt.openwebtext import OpenWebTextOptions, main, prepare_openwebtext
from nanogpt.tokenizer import GPT2_EOT, GPT2Tokenizer

datasets = pytest.importorskip("datasets")


def test_prepare_writes_every_document_with_eot(tmp_path):
    docs = [f"Document number {i}: the cat sat on the mat. <|endoftext|> stays text." for i in range(300)]
    ds = datasets.Dataset.from_dict({"text": docs})
    opts = OpenWebTextOptions(data_dir=str(tmp_path), num_proc=2, val_fraction=0.01, shards=5)
    counts = prepare_openwebtext(ds, opts)

    tok = GPT2Tokenizer()
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert counts == {"train": len(train), "val": len(val)}
    # 1% of 300 documents -> 3 validation documents, each ending in EOT
    assert int((val == GPT2_EOT).sum()) == 3
    assert int((train == GPT2_EOT).sum()) == 297
    assert train[-1] == GPT2_EOT and val[-1] == GPT2_EOT
    # the files hold exactly the documents' tokens: decode and compare as multisets of documents
    decoded = tok.decode(train.tolist() + val.tolist()).split("<|endoftext|>")
    # the literal marker inside each document was encoded as ordinary text, so it decodes back too;
    # rebuild documents by rejoining the two halves each document was split into
    rebuilt = sorted(a + "<|endoftext|>" + b for a, b in zip(decoded[0:-1:2], decoded[1:-1:2]))
    assert rebuilt == sorted(docs)
    assert not list(tmp_path.glob("*.tmp"))


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="internet"):
        main(["--num_proc=1"])


def test_options_are_validated():
    with pytest.raises(UserError):
        OpenWebTextOptions(val_fraction=0.0)


def test_a_write_that_fails_part_way_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from nanogpt.openwebtext import write_split

    path = tmp_path / "train.bin"
    path.write_bytes(b"\x01\x00")  # a previous, complete file
    tokenized = datasets.Dataset.from_dict({"ids": [[1, 2], [3, 4], [5, 6]], "len": [2, 2, 2]})
    real_shard, calls = datasets.Dataset.shard, []

    def shard_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_shard(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "shard", shard_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_split(tokenized, path, shards=3)
    assert path.read_bytes() == b"\x01\x00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin"]
    monkeypatch.undo()
    assert write_split(tokenized, path, shards=3) == 6
    assert np.fromfile(path, dtype=np.uint16).tolist() == [1, 2, 3, 4, 5, 6]
