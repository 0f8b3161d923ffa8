"""nanogpt.sample: generating from a checkpoint, streaming, and clean refusals of bad options."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import pytest

from nanogpt.checkpoint import load_checkpoint
from nanogpt.sample import SEPARATOR
from nanogpt.sample import main as sample_main


@pytest.fixture
def vocab(tiny_checkpoint) -> list[str]:
    return load_checkpoint(tiny_checkpoint / "ckpt.pt")["tokenizer"]["chars"]


def sample(run_in_process, out_dir, *args: str) -> tuple[int, str, str]:
    return run_in_process(sample_main, [f"--out_dir={out_dir}", "--device=cpu", *args])


def test_samples_are_separated_and_use_the_vocabulary(run_in_process, tiny_checkpoint, vocab):
    code, out, err = sample(run_in_process, tiny_checkpoint, "--num_samples=3", "--max_new_tokens=20", "--start=KING")
    assert code == 0, err
    chunks = out.split(f"\n{SEPARATOR}\n")
    assert chunks[-1] == ""
    samples = chunks[:-1]
    assert len(samples) == 3
    for s in samples:
        assert len(s) == len("KING") + 20
        assert s.startswith("KING")
        assert set(s) <= set(vocab)


def test_same_seed_same_text_and_cache_does_not_change_it(run_in_process, tiny_checkpoint):
    args = ("--num_samples=2", "--max_new_tokens=28", "--start=KING", "--top_k=None")  # 32 = block_size
    first = sample(run_in_process, tiny_checkpoint, *args)
    again = sample(run_in_process, tiny_checkpoint, *args)
    no_cache = sample(run_in_process, tiny_checkpoint, *args, "--use_cache=False")
    other_seed = sample(run_in_process, tiny_checkpoint, *args, "--seed=7")
    assert first[0] == 0
    assert first[1] == again[1] == no_cache[1]
    assert other_seed[1] != first[1]


def test_greedy_sampling_is_deterministic_across_seeds(run_in_process, tiny_checkpoint):
    a = sample(run_in_process, tiny_checkpoint, "--num_samples=2", "--max_new_tokens=40", "--temperature=0")
    b = sample(run_in_process, tiny_checkpoint, "--num_samples=2", "--max_new_tokens=40", "--temperature=0", "--seed=5")
    assert a[0] == 0 and a[1] == b[1]
    first, second = a[1].split(f"\n{SEPARATOR}\n")[:2]
    assert first == second  # the same prompt and greedy decoding: the batch rows agree


def test_interrupt_checkpoint_is_used_when_there_is_no_ckpt(run_in_process, tiny_checkpoint, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.copy(tiny_checkpoint / "ckpt.pt", out_dir / "interrupt.pt")
    code, out, err = sample(run_in_process, out_dir, "--num_samples=1", "--max_new_tokens=5")
    assert code == 0, err
    assert out.endswith(f"\n{SEPARATOR}\n")


def test_prompt_from_file(run_in_process, tiny_checkpoint, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:\nthe king", encoding="utf-8")
    code, out, err = sample(run_in_process, tiny_checkpoint, f"--start=FILE:{prompt}", "--num_samples=1")
    assert code == 0, err
    assert out.startswith("ROMEO:\nthe king")


def test_single_sample_streams(tiny_checkpoint, repo_root, script_env, tmp_path):
    """With --num_samples=1 the text appears while it is being generated, not at the end."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(repo_root / "sample.py"),
            f"--out_dir={tiny_checkpoint}",
            "--device=cpu",
            "--num_samples=1",
            "--max_new_tokens=1000000",
            "--start=KING",
        ],
        cwd=tmp_path,
        env=script_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite if nothing is printed
    watchdog.start()
    try:
        head = proc.stdout.read(len("KING") + 10)  # the prompt and the first ten generated characters
        assert proc.poll() is None, proc.stderr.read().decode()  # ...arrive while generation goes on
    finally:
        watchdog.cancel()
        proc.kill()
        proc.communicate()
    assert head.startswith(b"KING") and len(head) == len("KING") + 10


# ----------------------------------------------------------------------------- bad input


def test_prompt_characters_outside_the_vocabulary_are_named(run_in_process, tiny_checkpoint, vocab):
    assert "€" not in vocab and "~" not in vocab and "K" in vocab
    code, out, err = sample(run_in_process, tiny_checkpoint, "--start=K€~K€")
    assert code == 2
    assert out == ""
    message = " ".join(err.split())
    assert message.startswith("error:")
    assert "2 character(s)" in message and "'€'" in message and "'~'" in message
    assert "'K'" not in message


def test_out_of_vocabulary_prompt_in_a_subprocess(run_script, repo_root, tiny_checkpoint, assert_user_error):
    proc = run_script(repo_root / "sample.py", f"--out_dir={tiny_checkpoint}", "--device=cpu", "--start=€")
    assert_user_error(proc, "not in the model's vocabulary", "'€'")


def test_missing_checkpoint(run_in_process, tmp_path):
    code, _, err = sample(run_in_process, tmp_path / "empty")
    assert code == 2
    message = " ".join(err.split())
    assert f"no checkpoint at {tmp_path / 'empty' / 'ckpt.pt'}" in message


def test_missing_prompt_file(run_in_process, tiny_checkpoint, tmp_path):
    code, _, err = sample(run_in_process, tiny_checkpoint, f"--start=FILE:{tmp_path / 'nope.txt'}")
    assert code == 2
    assert "nope.txt" in err and "does not exist" in err


def test_prompt_file_that_is_not_utf8(run_in_process, tiny_checkpoint, tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9")
    code, _, err = sample(run_in_process, tiny_checkpoint, f"--start=FILE:{tmp_path / 'p.txt'}")
    assert code == 2 and "not UTF-8" in " ".join(err.split())


def test_empty_prompt(run_in_process, tiny_checkpoint):
    code, _, err = sample(run_in_process, tiny_checkpoint, "--start=")
    assert code == 2 and "prompt is empty" in err


@pytest.mark.parametrize(
    "arg, fragment",
    [
        ("--top_p=0", "--top_p must be in (0, 1]"),
        ("--top_p=1.5", "--top_p must be in (0, 1]"),
        ("--top_p=-0.1", "--top_p must be in (0, 1]"),
        ("--top_k=0", "--top_k must be at least 1"),
        ("--temperature=-1", "--temperature must be >= 0"),
        ("--num_samples=0", "--num_samples must be at least 1"),
        ("--max_new_tokens=-1", "--max_new_tokens"),
        ("--top_p=high", "--top_p expects"),
        ("--device=tpu", "unknown --device"),
        ("--dtype=float8", "unknown --dtype"),
    ],
)
def test_option_validation(arg, fragment, run_in_process, tiny_checkpoint):
    code, out, err = sample(run_in_process, tiny_checkpoint, arg)
    assert code == 2
    assert out == ""
    assert fragment in " ".join(err.split())


def test_top_p_and_top_k_options_are_accepted(run_in_process, tiny_checkpoint):
    code, out, err = sample(
        run_in_process, tiny_checkpoint, "--top_p=0.5", "--top_k=None", "--num_samples=1", "--max_new_tokens=10"
    )
    assert code == 0, err
    assert out.endswith(f"\n{SEPARATOR}\n")
