"""Bad-input catalogue: every case exits with status 2 and an `error: ...` message (no traceback), and
leaves every existing file byte-identical (the dataset, ckpt.pt, input.txt...).

Each case runs in a copy of a small workspace (data/tiny prepared, out/ckpt.pt trained) as a separate
process: a forked child running the entry point's run_main (see forkrun.py), or, for prepare and a few
train/sample cases, a genuine `python ...` subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import forkrun as fr
import pytest
import torch

from nanogpt.errors import UserError

TRAIN = (*fr.TINY, "--data_dir=data/tiny", "--out_dir=out", "--max_iters=6", "--eval_interval=2")
RESUME = (*TRAIN, "--init_from=resume")
SAMPLE = ("--out_dir=out", "--device=cpu", "--num_samples=2", "--max_new_tokens=5")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs")
    fr.make_dataset(root / "data" / "tiny")
    result = fr.run(fr.train_main(), [*TRAIN[:-2], "--max_iters=4", "--eval_interval=2"], root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def work(base, tmp_path) -> Path:
    """A private copy of the workspace: data/tiny/{input.txt,train.bin,val.bin,meta.json}, out/ckpt.pt."""
    shutil.copytree(base, tmp_path / "w")
    return tmp_path / "w"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's hash, except the token-id scan caches (.<split>.bin.max_id.json): derived data that a
    run may refresh when a split changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
        if not p.name.endswith(".max_id.json")
    }


def check(
    work: Path, damage: Callable[[Path], object] | None, run: Callable[[], fr.Result], *fragments: str
) -> fr.Result:
    """Apply `damage` to the workspace, run, and check the message and that no file changed."""
    if damage is not None:
        damage(work)
    before = snapshot(work)
    result = run()
    fr.assert_user_error(result, *fragments)
    assert snapshot(work) == before
    return result


def train(work: Path, *argv: str, setup=None) -> Callable[[], fr.Result]:
    return lambda: fr.run(fr.train_main(), argv, work, setup)


def sample(work: Path, *argv: str, setup=None) -> Callable[[], fr.Result]:
    return lambda: fr.run(fr.sample_main(), [*SAMPLE, *argv], work, setup)


def write(relpath: str, content: bytes) -> Callable[[Path], None]:
    def damage(work: Path) -> None:
        (work / relpath).parent.mkdir(parents=True, exist_ok=True)
        (work / relpath).write_bytes(content)

    return damage


def remove(relpath: str) -> Callable[[Path], None]:
    return lambda work: (work / relpath).unlink()


def truncate_odd(relpath: str) -> Callable[[Path], None]:
    return lambda work: (work / relpath).write_bytes((work / relpath).read_bytes()[:-1])


def cut_in_half(relpath: str) -> Callable[[Path], None]:
    return lambda work: (work / relpath).write_bytes(
        (work / relpath).read_bytes()[: (work / relpath).stat().st_size // 2]
    )


def zero_middle(relpath: str) -> Callable[[Path], None]:
    """Silent corruption: 64 zero bytes in the middle of the file, which keeps its structure intact."""

    def damage(work: Path) -> None:
        data = (work / relpath).read_bytes()
        mid = len(data) // 2
        (work / relpath).write_bytes(data[:mid] + bytes(64) + data[mid + 64 :])

    return damage


def save_tensor(relpath: str) -> Callable[[Path], None]:
    return lambda work: torch.save(torch.zeros(3), work / relpath)


# ----------------------------------------------------------------------------- prepare (fresh interpreters)

PREPARE_CASES = {
    "missing input.txt": (remove("data/tiny/input.txt"), "data/tiny/input.txt does not exist"),
    "empty input.txt": (write("data/tiny/input.txt", b""), "is empty"),
    "blank input.txt": (write("data/tiny/input.txt", b" \n\t\n"), "is empty"),
    "binary input.txt": (write("data/tiny/input.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50), "binary"),
    "non-UTF-8 input.txt": (write("data/tiny/input.txt", "né à Paris\n".encode("latin-1") * 50), "not valid UTF-8"),
    "too short to split": (write("data/tiny/input.txt", b"ab"), "too short"),
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_prepare(work, case):
    damage, fragment = PREPARE_CASES[case]
    run = lambda: fr.run_script("-m", "nanogpt", "prepare", "tiny", "--tokenizer=char", cwd=work)  # noqa: E731
    check(work, damage, run, fragment)


def test_corpus_shorter_than_block_size(work):
    """prepare accepts a 20-character text, but a sample needs block_size + 1 = 9 tokens: val.bin has 2."""
    (work / "data" / "short").mkdir()
    (work / "data" / "short" / "input.txt").write_text("abcdefghij" * 2, encoding="utf-8")
    prepared = fr.run_script("-m", "nanogpt", "prepare", "short", "--tokenizer=char", cwd=work)
    assert prepared.returncode == 0, prepared.stderr
    check(work, None, train(work, *TRAIN, "--data_dir=data/short"), "val.bin holds 2 tokens", "block_size=8")


# ----------------------------------------------------------------------------- train: options

OPTION_CASES = {
    "unknown option": (["--n_layers=2"], ["unknown option 'n_layers'", "Did you mean --n_layer?"]),
    "unknown in a config file": (["cfg.py"], ["unknown option 'lr' in config file 'cfg.py'"]),
    "config file missing": (["nowhere.py"], ["config file 'nowhere.py' does not exist"]),
    "config file with an import": (["evil.py"], ["found an import", "never executed"]),
    "no value": (["--n_layer"], ["has no value", "--n_layer=VALUE"]),
    "single dash": (["-n", "2"], ["unrecognised argument '-n'"]),
    "int expected": (["--n_layer=two"], ["--n_layer expects an integer, got 'two'"]),
    "float expected": (["--dropout=high"], ["--dropout expects a number"]),
    "bool expected": (["--compile=maybe"], ["--compile expects True or False"]),
    "zero layers": (["--n_layer=0"], ["--n_layer must be a positive integer, got 0"]),
    "negative batch": (["--batch_size=-1"], ["--batch_size must be a positive integer, got -1"]),
    "zero block_size": (["--block_size=0"], ["--block_size must be a positive integer"]),
    "zero eval_iters": (["--eval_iters=0"], ["--eval_iters must be a positive integer"]),
    "zero grad accumulation": (["--gradient_accumulation_steps=0"], ["--gradient_accumulation_steps must be"]),
    "negative max_iters": (["--max_iters=-1"], ["--max_iters must not be negative"]),
    "dropout 1": (["--dropout=1.0"], ["--dropout must be in [0, 1), got 1.0"]),
    "negative dropout": (["--dropout=-0.1"], ["--dropout must be in [0, 1)"]),
    "heads do not divide n_embd": (["--n_embd=10", "--n_head=3"], ["--n_embd=10 is not divisible by --n_head=3"]),
    "zero learning rate": (["--learning_rate=0"], ["--learning_rate must be positive"]),
    "beta2 of 1": (["--beta2=1"], ["--beta2 must be in [0, 1)"]),
    "unknown device": (["--device=tpu"], ["unknown --device='tpu'"]),
    "no mps here": (["--device=mps"], ["--device=mps", "not available"]),
    "a batch larger than memory": (
        ["--batch_size=100000000"],
        ["a training step of --batch_size=100000000 needs at least", "GB", "--gradient_accumulation_steps"],
    ),
    "unknown dtype": (["--dtype=float8"], ["unknown --dtype='float8'"]),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_train_options(work, case):
    argv, fragments = OPTION_CASES[case]
    (work / "cfg.py").write_text("n_layer = 1\nlr = 0.1\n")
    (work / "evil.py").write_text("import os\nos.system('touch pwned')\n")
    check(work, None, train(work, *TRAIN, *argv), *fragments)
    assert not (work / "pwned").exists()


def test_train_unknown_option_in_a_fresh_interpreter(work):
    check(work, None, lambda: fr.run_script("train.py", *TRAIN, "--n_layers=2", cwd=work), "unknown option 'n_layers'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_in_a_fresh_interpreter(work):
    run = lambda: fr.run_script("train.py", *TRAIN, "--device=cuda", cwd=work)  # noqa: E731
    check(work, None, run, "--device=cuda was requested but CUDA is not available", "--device=cpu")


def old_gpu() -> None:
    """In the child: pretend to have a CUDA GPU without bfloat16 (pre-Ampere)."""
    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: False
    torch.cuda.device_count = lambda: 1


def one_gpu() -> None:
    """In the child: pretend to have one CUDA GPU (with bfloat16), so the device name itself is checked."""
    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    torch.cuda.device_count = lambda: 1


DEVICE_CASES = {
    "cuda:x": ["--device=cuda:x is not a device", "cuda:N", "device index"],
    "cuda:-1": ["--device=cuda:-1 is not a device", "cuda:N"],
    "cuda:1.5": ["--device=cuda:1.5 is not a device", "cuda:N"],
    "cuda:": ["--device=cuda: is not a device", "cuda:N"],
    "cuda:0:1": ["--device=cuda:0:1 is not a device"],
    "cuda:3": ["--device=cuda:3: this machine has 1 CUDA device(s)", "cuda:0"],
}


@pytest.mark.parametrize("device", DEVICE_CASES)
def test_malformed_cuda_device(work, device):
    check(work, None, train(work, *TRAIN, f"--device={device}", setup=one_gpu), *DEVICE_CASES[device])


def test_bfloat16_on_an_old_gpu(work):
    run = train(work, *TRAIN, "--device=cuda", "--dtype=bfloat16", setup=old_gpu)
    check(work, None, run, "--dtype=bfloat16 is not supported by this GPU", "float16")


def test_auto_dtype_on_an_old_gpu_is_float16(monkeypatch):
    """A V100 or T4 as recent PyTorch describes it: bfloat16 "supported", but only by emulation."""
    from nanogpt.device import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("auto", "cuda") == "float16"
    with pytest.raises(UserError, match="not supported by this GPU"):
        resolve_dtype("bfloat16", "cuda")


def test_float16_training_on_mps_is_refused_and_sampling_is_not():
    from nanogpt.device import resolve_dtype

    with pytest.raises(UserError, match="float16 training on mps is not supported.*--dtype=bfloat16"):
        resolve_dtype("float16", "mps", training=True)
    assert resolve_dtype("float16", "mps") == "float16"


def test_bfloat16_on_the_cpu_is_supported(work):
    result = fr.run(fr.train_main(), [*TRAIN, "--dtype=bfloat16", "--out_dir=bf16", "--max_iters=2"], work)
    assert result.returncode == 0, result.stderr
    assert (work / "bf16" / "ckpt.pt").is_file()


# ----------------------------------------------------------------------------- train: data and files

CKPT = "out/ckpt.pt"
DATA_CASES = {
    "train.bin missing": (remove("data/tiny/train.bin"), TRAIN, ["data/tiny/train.bin does not exist", "prepare"]),
    "train.bin truncated": (truncate_odd("data/tiny/train.bin"), TRAIN, ["train.bin has an odd size", "truncated"]),
    "val.bin empty": (write("data/tiny/val.bin", b""), TRAIN, ["val.bin holds 0 tokens"]),
    "token ids beyond the vocabulary": (
        write("data/tiny/val.bin", b"\xff\xff" * 100),
        TRAIN,
        ["contains token id 65535", "41 tokens", "do not match"],
    ),
    "meta.json not JSON": (write("data/tiny/meta.json", b'{"vocab_size": 27,'), TRAIN, ["meta.json is damaged"]),
    "meta.json without vocab_size": (
        write("data/tiny/meta.json", b'{"tokenizer": {"kind": "char", "chars": ["a"]}}'),
        TRAIN,
        ["missing 'vocab_size' or 'tokenizer'"],
    ),
    "meta.json vocabulary of the wrong size": (
        write(
            "data/tiny/meta.json",
            json.dumps({"vocab_size": 27, "tokenizer": {"kind": "char", "chars": ["a"]}}).encode(),
        ),
        TRAIN,
        ["meta.json is damaged", "27-token vocabulary"],
    ),
    "checkpoint missing": (remove(CKPT), RESUME, ["no checkpoint at out/ckpt.pt"]),
    "checkpoint cut in half": (cut_in_half(CKPT), RESUME, ["out/ckpt.pt is truncated or is not a PyTorch checkpoint"]),
    "checkpoint truncated by one byte": (
        truncate_odd(CKPT),
        RESUME,
        ["out/ckpt.pt is truncated or is not a PyTorch checkpoint"],
    ),
    "checkpoint silently corrupted": (zero_middle(CKPT), RESUME, ["out/ckpt.pt is damaged", "checksum"]),
    "checkpoint is text": (
        write(CKPT, b"not a checkpoint\n"),
        RESUME,
        ["out/ckpt.pt is truncated or is not a PyTorch checkpoint"],
    ),
    "checkpoint holds a tensor": (save_tensor(CKPT), RESUME, ["not a nanogpt checkpoint"]),
    "larger block_size than the checkpoint": (
        None,
        (*RESUME, "--block_size=64"),
        ["block_size: checkpoint 8, requested 64"],
    ),
    "out_dir inside a file": (write("blocker", b"x"), (*TRAIN, "--out_dir=blocker/out"), ["cannot create --out_dir"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_train_files(work, case):
    damage, argv, fragments = DATA_CASES[case]
    check(work, damage, train(work, *argv), *fragments)


def unwritable_out() -> None:
    import os

    access = os.access
    os.access = lambda path, mode, **kw: (
        False if Path(path).name == "out" and mode & os.W_OK else access(path, mode, **kw)
    )


def test_out_dir_not_writable(work):
    check(work, None, train(work, *TRAIN, setup=unwritable_out), "--out_dir=out is not writable")


def disk_fills_up() -> None:
    """In the child: checkpoint writes fail with ENOSPC after the first 4 KB, in the middle of torch.save."""
    import os

    from nanogpt.checkpoint import file as checkpoint  # the single-file format writes through atomic_open

    checkpoint.atomic_open = fr.failing_atomic_open(
        checkpoint.atomic_open, lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    )


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(work):
    """Resume at 4 and save at 6: the write fails half-way; ckpt.pt from 4 survives and no temp file stays.
    The metrics log is the one file that changes: it records iterations 4 to 6, which did run."""
    from nanogpt.metrics import read_metrics

    metrics = work / "out" / "metrics.jsonl"
    kept = [r for r in read_metrics(metrics) if r["iter"] < 4]
    before = {k: v for k, v in snapshot(work).items() if k != "out/metrics.jsonl"}
    fr.assert_user_error(
        train(work, *RESUME, setup=disk_fills_up)(),
        "could not write the checkpoint out/ckpt.pt",
        "No space left on device",
        "unchanged",
    )
    assert {k: v for k, v in snapshot(work).items() if k != "out/metrics.jsonl"} == before
    after = [r["iter"] for r in read_metrics(metrics)]
    assert after[: len(kept)] == [r["iter"] for r in kept]
    assert after[len(kept) :] == sorted(after[len(kept) :]) and after[-1] == 6


# ----------------------------------------------------------------------------- sample

SAMPLE_CASES = {
    "prompt outside the vocabulary": (
        None,
        ["--start=Zebra@"],
        ["character(s) that are not in the model's vocabulary", "'Z'", "'@'"],
    ),
    "empty prompt": (None, ["--start="], ["the prompt is empty"]),
    "FILE: prompt missing": (None, ["--start=FILE:nope.txt"], ["the prompt file nope.txt", "does not exist"]),
    "FILE: prompt not UTF-8": (write("p.txt", "été".encode("latin-1")), ["--start=FILE:p.txt"], ["not UTF-8"]),
    "checkpoint missing": (remove(CKPT), [], ["no checkpoint at out/ckpt.pt"]),
    "checkpoint cut in half": (
        cut_in_half(CKPT),
        [],
        ["out/ckpt.pt is truncated or is not a PyTorch checkpoint, so it cannot be read. Restore it"],
    ),
    "checkpoint silently corrupted": (zero_middle(CKPT), [], ["checksum"]),
    "block_size is not a sampling option": (None, ["--block_size=64"], ["unknown option 'block_size'"]),
    "zero samples": (None, ["--num_samples=0"], ["--num_samples must be at least 1"]),
    "negative temperature": (None, ["--temperature=-1"], ["--temperature must be >= 0"]),
    "top_p above 1": (None, ["--top_p=2"], ["--top_p must be in (0, 1]"]),
    "more tokens than memory holds": (
        None,
        ["--num_samples=3000000", "--max_new_tokens=3000000"],
        ["generating 3000000 x 3000000 tokens needs at least", "KV cache", "fewer --num_samples"],
    ),
}


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_sample(work, case):
    damage, argv, fragments = SAMPLE_CASES[case]
    check(work, damage, sample(work, *argv), *fragments)


def test_sample_missing_checkpoint_in_a_fresh_interpreter(work):
    run = lambda: fr.run_script("sample.py", *SAMPLE, "--out_dir=elsewhere", cwd=work)  # noqa: E731
    check(work, None, run, "no checkpoint at elsewhere/ckpt.pt", "--out_dir")


def test_prompt_longer_than_block_size_is_cropped_not_an_error(work):
    result = fr.run(fr.sample_main(), [*SAMPLE, "--start=" + "the king and queen " * 5], work)
    assert result.returncode == 0, result.stderr


def test_nanogpt_checkpoint_without_its_vocabulary_file(work):
    """A nanoGPT char-level checkpoint keeps no vocabulary; it needs data/<dataset>/meta.json."""

    def as_nanogpt_checkpoint_without_meta(work: Path) -> None:
        ckpt = torch.load(work / CKPT, weights_only=True)
        del ckpt["format_version"], ckpt["tokenizer"]
        torch.save(ckpt, work / CKPT)
        (work / "data" / "tiny" / "meta.json").unlink()

    fragments = ["nanoGPT checkpoint with a 41-token vocabulary", "data/tiny/meta.json", "is missing", "meta.pkl"]
    check(work, as_nanogpt_checkpoint_without_meta, sample(work), *fragments)
    check(work, None, train(work, *RESUME), *fragments)


# ----------------------------------------------------------------------------- eval

EVAL = ("--out_dir=out", "--device=cpu")


def evaluate(work: Path, *argv: str) -> Callable[[], fr.Result]:
    from nanogpt.evaluate import main

    return lambda: fr.run(main, [*EVAL, *argv], work)


EVAL_CASES = {
    "val.bin empty": (write("data/tiny/val.bin", b""), [], ["data/tiny/val.bin holds 0 tokens", "at least 2"]),
    "val.bin of one token": (write("data/tiny/val.bin", b"\x01\x00"), [], ["data/tiny/val.bin holds 1 token,"]),
    "val.bin truncated": (truncate_odd("data/tiny/val.bin"), [], ["val.bin has an odd size", "truncated"]),
    "token ids beyond the vocabulary": (
        write("data/tiny/val.bin", b"\xff\xff" * 100),
        [],
        ["data/tiny/val.bin contains token id 65535", "41 tokens", "do not match"],
    ),
    "--max_tokens=1": (None, ["--max_tokens=1"], ["--max_tokens=1 leaves 1 token", "at least 2"]),
    "--text missing": (None, ["--text=nope.txt"], ["the text file nope.txt (from --text=nope.txt) does not exist"]),
    "--text not UTF-8": (write("t.txt", "été".encode("latin-1")), ["--text=t.txt"], ["text file t.txt", "not UTF-8"]),
    "--text empty": (write("t.txt", b""), ["--text=t.txt"], ["t.txt holds 0 tokens", "at least 2"]),
    "--text a folder": (None, ["--text=data"], ["cannot read the text file data (from --text=data)"]),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval(work, case):
    damage, argv, fragments = EVAL_CASES[case]
    result = check(work, damage, evaluate(work, *argv), *fragments)
    assert "--start" not in result.stderr  # an option of sample, not of eval
