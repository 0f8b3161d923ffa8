"""Shared fixtures: corpora, a prepared character dataset, a tiny trained checkpoint, subprocess runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import forkrun as fr
import pytest
import torch
from forkrun import REPO, make_text

SHAKESPEARE = REPO.parent / "shared/data/shakespeare_char/input.txt"

# The test machine has 2 cores that other jobs may share. With one intra-op thread per process,
# small models run fast and predictably; with several, OpenMP threads spin against each other.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """Tiny Shakespeare from the shared data folder beside the repository. Absent, the tests that need it
    are skipped on a developer's machine, and fail in CI (CI=true), where it is always provided."""
    if not SHAKESPEARE.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"tiny Shakespeare must be at {SHAKESPEARE} in CI (shared/ beside the checkout)")
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE}")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def training_text() -> str:
    """Tiny Shakespeare when it is available, else ~1 MB of generated text, so end-to-end tests always run."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    return make_text(1_000_000)


@pytest.fixture
def shakespeare_path(shakespeare_text: str) -> Path:
    return SHAKESPEARE


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A few KB of generated text in tmp_path/corpus.txt."""
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def _prepare(input_path: Path, data_dir: Path, *extra: str) -> Path:
    from nanogpt.prepare import main as prepare_main

    prepare_main(["--dataset=tiny", "--tokenizer=char", f"--input={input_path}", f"--data_dir={data_dir}", *extra])
    return data_dir


@pytest.fixture
def prepare_char_dataset(tmp_path: Path, capsys) -> Callable[..., Path]:
    """prepare(text_or_path=None, data_dir=None) -> data_dir holding train.bin, val.bin and meta.json.

    Runs `nanogpt.prepare.main` in-process on a string (written to a file), a path, or, by default, a
    generated corpus; the data folder defaults to tmp_path/data/tiny.
    """

    def prepare(text: str | Path | None = None, data_dir: Path | None = None, *extra: str) -> Path:
        data_dir = data_dir or tmp_path / "data" / "tiny"
        if isinstance(text, Path):
            input_path = text
        else:
            input_path = tmp_path / "prepare_input.txt"
            input_path.write_text(make_text() if text is None else text, encoding="utf-8")
        _prepare(input_path, data_dir, *extra)
        capsys.readouterr()  # keep prepare's report out of the caller's captured output
        return data_dir

    return prepare


# A model small enough to train a few steps in about a second on one CPU core.
TINY_MODEL_ARGS = (
    "--device=cpu",
    "--compile=False",
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--batch_size=4",
    "--gradient_accumulation_steps=1",
    "--dropout=0.0",
    "--eval_iters=2",
    "--log_interval=1",
    "--plot=False",  # loss.png is tested in test_plot.py; drawing it costs every other run ~0.3 s
)


@pytest.fixture(scope="session")
def tiny_model_args() -> tuple[str, ...]:
    return TINY_MODEL_ARGS


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """out_dir of a tiny char-level model trained in-process for a few steps (holds ckpt.pt)."""
    from nanogpt.train import main as train_main

    root = tmp_path_factory.mktemp("tiny_ckpt")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    data_dir = _prepare(corpus, root / "data")
    out_dir = root / "out"
    train_main(
        [
            *TINY_MODEL_ARGS,
            f"--data_dir={data_dir}",
            f"--out_dir={out_dir}",
            "--max_iters=4",
            "--eval_interval=2",
            "--warmup_iters=0",
        ]
    )
    assert (out_dir / "ckpt.pt").is_file()
    return out_dir


@pytest.fixture
def script_env() -> dict[str, str]:
    """The environment run_script uses (repository on PYTHONPATH), for tests that need subprocess.Popen."""
    return fr.script_env()


@pytest.fixture
def run_script(tmp_path: Path) -> Callable[..., fr.Result]:
    """run_script(*args, cwd=tmp_path, timeout=120, env=None, input=None) runs `python *args` (see
    forkrun.run_script) in a temporary folder, so scripts that write relative paths (data/<dataset>,
    out_dir) never touch the repository."""

    def run(script: str | os.PathLike, *args: str | os.PathLike, cwd: Path | None = None, **kwargs) -> fr.Result:
        return fr.run_script(script, *args, cwd=cwd or tmp_path, **kwargs)

    return run


@pytest.fixture(scope="session")
def assert_user_error() -> Callable[..., None]:
    return fr.assert_user_error


@pytest.fixture
def run_in_process(capsys) -> Callable[..., tuple[int, str, str]]:
    """run_in_process(main, argv) -> (exit status, stdout, stderr) of `run_main(main, argv)`, in this process."""
    from nanogpt.errors import run_main

    def run(main: Callable, argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            run_main(main, argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run
