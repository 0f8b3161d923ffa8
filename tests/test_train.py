"""nanogpt.train: the learning-rate schedule, training runs in-process and as scripts, and clean failures."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nanogpt.checkpoint import load_checkpoint
from nanogpt.errors import UserError
from nanogpt.optim import get_lr
from nanogpt.sample import SEPARATOR
from nanogpt.train import main as train_main
from nanogpt.train_options import TrainOptions

STEP = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)$", re.M)
ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time [\d.]+ms, mfu -?[\d.]+%$", re.M)


def eval_losses(output: str) -> dict[int, tuple[float, float]]:
    return {int(m[1]): (float(m[2]), float(m[3])) for m in STEP.finditer(output)}


# ----------------------------------------------------------------------------- learning rate


def test_lr_warmup_cosine_and_floor():
    o = TrainOptions(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    lrs = [get_lr(it, o) for it in range(130)]
    # linear warm-up from near zero, proportional to it + 1
    assert 0 < lrs[0] < lrs[1] < lrs[9] < 1e-3
    for it in range(10):
        assert lrs[it] == pytest.approx(1e-3 * (it + 1) / 11)
    # the peak right after warm-up, then a cosine down to min_lr at lr_decay_iters
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:111], lrs[11:111]))
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way through the decay
    assert lrs[35] == pytest.approx(1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lrs[110] == pytest.approx(1e-4)
    # and min_lr forever after
    assert all(lr == 1e-4 for lr in lrs[111:])


def test_lr_without_warmup_or_decay():
    assert get_lr(0, TrainOptions(learning_rate=1e-3, warmup_iters=0, lr_decay_iters=100)) == pytest.approx(1e-3)
    constant = TrainOptions(learning_rate=5e-4, decay_lr=False)
    assert {get_lr(it, constant) for it in (0, 10, 10**6)} == {5e-4}


# ----------------------------------------------------------------------------- in-process runs


def train(args, data_dir: Path, out_dir: Path, *extra: str) -> None:
    train_main([*args, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra])


def test_training_in_process_learns_and_writes_a_checkpoint(prepare_char_dataset, tiny_model_args, tmp_path, capsys):
    data_dir = prepare_char_dataset()
    out_dir = tmp_path / "out"
    train(
        tiny_model_args,
        data_dir,
        out_dir,
        "--max_iters=30",
        "--eval_interval=10",
        "--learning_rate=1e-2",
        "--warmup_iters=0",
    )
    out = capsys.readouterr().out
    assert f"tokens per iteration will be: {4 * 32:,}" in out
    losses = eval_losses(out)
    assert sorted(losses) == [0, 10, 20, 30]
    assert losses[0][0] == pytest.approx(math.log(len(load_meta_chars(data_dir))), abs=0.15)
    assert losses[30][0] < losses[0][0] - 0.5
    assert losses[30][1] < losses[0][1] - 0.5
    assert [int(m[1]) for m in ITER.finditer(out)] == list(range(31))

    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter_num"] == 30
    assert ckpt["reason"] == "eval"
    assert ckpt["tokenizer"] == {"kind": "char", "chars": load_meta_chars(data_dir)}
    assert ckpt["model_args"]["n_layer"] == 1 and ckpt["model_args"]["n_embd"] == 32
    assert ckpt["config"]["max_iters"] == 30
    assert ckpt["best_val_loss"] == pytest.approx(losses[30][1], abs=1e-4)
    assert "optimizer" in ckpt and "rng" in ckpt


def load_meta_chars(data_dir: Path) -> list[str]:
    return json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))["tokenizer"]["chars"]


def test_resume_continues_exactly_like_an_uninterrupted_run(prepare_char_dataset, tiny_model_args, tmp_path, capsys):
    data_dir = prepare_char_dataset()
    common = ("--eval_interval=2", "--learning_rate=3e-3", "--warmup_iters=2", "--lr_decay_iters=8")
    train(tiny_model_args, data_dir, tmp_path / "straight", *common, "--max_iters=8")
    train(tiny_model_args, data_dir, tmp_path / "resumed", *common, "--max_iters=4")
    assert load_checkpoint(tmp_path / "resumed" / "ckpt.pt")["iter_num"] == 4
    capsys.readouterr()
    train(tiny_model_args, data_dir, tmp_path / "resumed", *common, "--max_iters=8", "--init_from=resume")
    out = capsys.readouterr().out
    assert "resuming from" in out and "at iteration 4" in out
    assert sorted(eval_losses(out)) == [6, 8]  # the evaluation at 4 was done before saving

    straight = load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    assert straight["iter_num"] == resumed["iter_num"] == 8
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert straight["best_val_loss"] == resumed["best_val_loss"]


def test_resume_refuses_a_different_model_shape(tiny_checkpoint, tiny_model_args, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(tiny_checkpoint, out_dir)
    data_dir = tiny_checkpoint.parent / "data"
    with pytest.raises(UserError, match="different shape.*n_layer: checkpoint 1, requested 2"):
        train(tiny_model_args, data_dir, out_dir, "--init_from=resume", "--n_layer=2")


def test_eval_only_writes_nothing(prepare_char_dataset, tiny_model_args, tmp_path, capsys):
    data_dir = prepare_char_dataset()
    train(tiny_model_args, data_dir, tmp_path / "out", "--eval_only=True")
    out = capsys.readouterr().out
    assert sorted(eval_losses(out)) == [0]
    assert not ITER.search(out)
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------- the scripts, end to end


def test_seed_commands_end_to_end(run_script, repo_root, training_text, tmp_path):
    """nanoGPT's CPU recipe, as scripts in a scratch folder: prepare, train a few iterations, sample."""
    data_dir = tmp_path / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True)
    (data_dir / "input.txt").write_text(training_text, encoding="utf-8")
    proc = run_script("-m", "nanogpt", "prepare", "shakespeare_char")
    assert proc.returncode == 0, proc.stderr
    vocab = load_meta_chars(data_dir)

    out_dir = tmp_path / "out-shakespeare-char"
    proc = run_script(
        repo_root / "train.py",
        "config/train_shakespeare_char.py",  # not in the scratch folder: the bundled config is used
        "--device=cpu",
        "--compile=False",
        "--eval_iters=2",
        "--log_interval=1",
        "--block_size=64",
        "--batch_size=12",
        "--n_layer=4",
        "--n_head=4",
        "--n_embd=128",
        "--max_iters=30",
        "--lr_decay_iters=2000",
        "--dropout=0.0",
        "--eval_interval=10",
        f"--out_dir={out_dir}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    losses = eval_losses(proc.stdout)
    assert sorted(losses) == [0, 10, 20, 30]
    assert losses[0][1] == pytest.approx(math.log(len(vocab)), abs=0.2)
    assert losses[30][0] < losses[0][0] - 0.3 and losses[30][1] < losses[0][1] - 0.3
    assert losses[10][1] > losses[30][1]
    # the README's command as it is, so loss.png too where matplotlib is installed (the [dev] extra has it)
    drawn = ["loss.png"] if importlib.util.find_spec("matplotlib") else []
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", *drawn, "metrics.jsonl"]
    assert load_checkpoint(out_dir / "ckpt.pt")["model_args"]["n_embd"] == 128

    # two samples, generated as one batch, each followed by the separator line
    proc = run_script(
        repo_root / "sample.py", f"--out_dir={out_dir}", "--device=cpu", "--num_samples=2", "--max_new_tokens=50"
    )
    assert proc.returncode == 0, proc.stderr
    n = 1 + 50  # the default prompt "\n" plus 50 characters
    block = n + len(SEPARATOR) + 2
    assert len(proc.stdout) == 2 * block
    for i in range(2):
        sample = proc.stdout[i * block : i * block + n]
        assert sample.startswith("\n")
        assert set(sample) <= set(vocab)
        assert proc.stdout[i * block + n :][: len(SEPARATOR) + 2] == f"\n{SEPARATOR}\n"

    # one sample streams, with the prompt read from a file
    (tmp_path / "prompt.txt").write_text("ROMEO:\n", encoding="utf-8")
    proc = run_script(
        repo_root / "sample.py",
        f"--out_dir={out_dir}",
        "--device=cpu",
        "--start=FILE:prompt.txt",
        "--num_samples=1",
        "--max_new_tokens=50",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ROMEO:\n")
    assert proc.stdout.endswith(f"\n{SEPARATOR}\n")
    assert len(proc.stdout) == len("ROMEO:\n") + 50 + len(SEPARATOR) + 2


@pytest.mark.slow
def test_longer_training_gets_well_below_the_uniform_loss(run_script, repo_root, training_text, tmp_path):
    data_dir = tmp_path / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True)
    (data_dir / "input.txt").write_text(training_text, encoding="utf-8")
    assert run_script("-m", "nanogpt", "prepare", "shakespeare_char").returncode == 0
    proc = run_script(
        repo_root / "train.py",
        "config/train_shakespeare_char.py",
        "--device=cpu",
        "--compile=False",
        "--eval_iters=20",
        "--log_interval=50",
        "--block_size=64",
        "--batch_size=12",
        "--n_layer=4",
        "--n_head=4",
        "--n_embd=128",
        "--max_iters=300",
        "--lr_decay_iters=300",
        "--warmup_iters=20",
        "--dropout=0.0",
        "--eval_interval=100",
        "--out_dir=out",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    losses = eval_losses(proc.stdout)
    assert losses[300][1] < 2.7  # uniform guessing over 65 characters is ln(65) = 4.17


def test_ctrl_c_saves_an_interrupt_checkpoint(tiny_checkpoint, tiny_model_args, repo_root, script_env, tmp_path):
    data_dir = tiny_checkpoint.parent / "data"
    out_dir = tmp_path / "out"
    args = [*tiny_model_args, f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_iters=100000"]
    proc = subprocess.Popen(
        [sys.executable, str(repo_root / "train.py"), *args, "--eval_interval=100000"],
        cwd=tmp_path,
        env={**script_env, "PYTHONUNBUFFERED": "1"},  # see each log line as it is printed
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(180, proc.kill)  # never hang the suite, whatever happens below
    watchdog.start()
    try:
        deadline = time.time() + 60
        for line in proc.stdout:
            if line.startswith("iter 3:") or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "stopped by SIGINT" in err
    assert "--init_from=resume" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["interrupt.pt", "metrics.jsonl"]
    ckpt = load_checkpoint(out_dir / "interrupt.pt")
    assert ckpt["reason"] == "interrupt" and ckpt["iter_num"] >= 4

    # resuming picks interrupt.pt up; the next checkpoint at an evaluation replaces it
    stopped_at = ckpt["iter_num"]
    train_main([*args[:-1], f"--max_iters={stopped_at + 1}", "--eval_interval=1", "--init_from=resume"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    assert load_checkpoint(out_dir / "ckpt.pt")["iter_num"] == stopped_at + 1


# ----------------------------------------------------------------------------- clean failures


@pytest.fixture
def good_run(tiny_checkpoint, tmp_path) -> tuple[Path, Path, bytes]:
    """(data_dir, out_dir, ckpt bytes): a prepared dataset and a copy of a good checkpoint."""
    out_dir = tmp_path / "out"
    shutil.copytree(tiny_checkpoint, out_dir)
    return tiny_checkpoint.parent / "data", out_dir, (out_dir / "ckpt.pt").read_bytes()


def short_dataset(tmp_path: Path) -> Path:
    from nanogpt.prepare import main as prepare_main

    src = tmp_path / "short.txt"
    src.write_text("abcdefghij" * 20, encoding="utf-8")  # val split: 20 tokens, too few for block_size 32
    prepare_main(["--tokenizer=char", f"--input={src}", f"--data_dir={tmp_path / 'short'}"])
    return tmp_path / "short"


@pytest.mark.parametrize(
    "case, fragments, as_script",
    [
        ("missing data", ["train.bin does not exist", "prepare"], True),
        ("heads", ["--n_embd=30 is not divisible by --n_head=4"], False),
        ("short corpus", ["val.bin holds 20 tokens, too few for block_size=32"], False),
        ("cuda", ["--device=cuda", "CUDA is not available"], True),
    ],
)
def test_bad_runs_fail_cleanly_and_keep_the_checkpoint(
    case,
    fragments,
    as_script,
    good_run,
    tiny_model_args,
    run_script,
    run_in_process,
    repo_root,
    tmp_path,
    assert_user_error,
):
    """Exit status 2 and a message, no traceback, and the previous ckpt.pt untouched. Two cases run
    train.py as a script; the others run in-process (faster; a traceback would fail the test there too)."""
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data_dir, out_dir, before = good_run
    extra = {
        "missing data": [f"--data_dir={tmp_path / 'nothing_here'}"],
        "heads": [f"--data_dir={data_dir}", "--n_embd=30", "--n_head=4"],
        "short corpus": [f"--data_dir={short_dataset(tmp_path)}"],
        "cuda": [f"--data_dir={data_dir}", "--device=cuda"],
    }[case]
    argv = [*tiny_model_args, f"--out_dir={out_dir}", "--max_iters=2", *extra]
    if as_script:
        proc = run_script(repo_root / "train.py", *argv)
    else:
        code, out, err = run_in_process(train_main, argv)
        proc = subprocess.CompletedProcess(argv, code, out, err)
    assert_user_error(proc, *fragments)
    assert (out_dir / "ckpt.pt").read_bytes() == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]


def test_missing_dataset_uses_the_default_data_folder(run_in_process, tiny_model_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process(train_main, [*tiny_model_args, "--dataset=nowhere", "--out_dir=out"])
    assert code == 2
    message = " ".join(err.split())
    assert str(Path("data/nowhere/train.bin")) in message and "nanogpt prepare nowhere" in message
    assert not Path("out").exists()


def test_dataset_and_model_vocabularies_must_match(tiny_checkpoint, tiny_model_args, tmp_path):
    """Resuming a char model on a dataset with more characters than its vocabulary."""
    from nanogpt.prepare import main as prepare_main

    out_dir = tmp_path / "out"
    shutil.copytree(tiny_checkpoint, out_dir)
    src = tmp_path / "big_vocab.txt"
    src.write_text("".join(chr(c) for c in range(0x4E00, 0x4E00 + 200)) * 10, encoding="utf-8")
    prepare_main(["--tokenizer=char", f"--input={src}", f"--data_dir={tmp_path / 'big'}"])
    before = (out_dir / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match="do not match"):
        train(tiny_model_args, tmp_path / "big", out_dir, "--init_from=resume", "--max_iters=8")
    assert (out_dir / "ckpt.pt").read_bytes() == before


def test_cuda_out_of_memory_prints_the_ways_down(
    prepare_char_dataset, tiny_model_args, run_in_process, tmp_path, monkeypatch
):
    from nanogpt.model import GPT

    def oom(self, idx, targets=None, cache=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    data_dir = prepare_char_dataset()
    monkeypatch.setattr(GPT, "forward", oom)
    code, _, err = run_in_process(
        train_main, [*tiny_model_args, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--max_iters=5"]
    )
    assert code == 2 and "Traceback" not in err
    assert "ran out of memory" in err and "--batch_size" in err and "--block_size" in err and "bfloat16" in err


# ----------------------------------------------------------------------------- divergence


def poison_micro_step(monkeypatch, at_call: int, then_sigterm: bool = False) -> None:
    """Make the loss of the `at_call`-th training forward pass (counting from 0) NaN, as a diverging
    forward pass would; the NaN gradients then poison the weights at that iteration's step."""
    from nanogpt.model import GPT

    real_forward, calls = GPT.forward, []

    def forward(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if self.training:
            calls.append(1)
            if len(calls) == at_call + 1:
                loss = loss * float("nan")
                if then_sigterm:
                    signal.raise_signal(signal.SIGTERM)  # caught by the run: stop after this iteration
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def test_nonfinite_loss_in_an_early_micro_step_names_its_iteration(
    prepare_char_dataset, tiny_model_args, run_in_process, tmp_path, monkeypatch
):
    """Iteration 3's first of 2 micro-steps diverges; its last is still finite (the weights change only
    at the step). The error names iteration 3 and no checkpoint is written after it."""
    data_dir = prepare_char_dataset()
    out_dir = tmp_path / "out"
    poison_micro_step(monkeypatch, at_call=2 * 3)
    argv = [*tiny_model_args, f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--gradient_accumulation_steps=2"]
    code, _, err = run_in_process(train_main, [*argv, "--max_iters=6", "--eval_interval=5", "--log_interval=100"])
    assert code == 2 and "Traceback" not in err
    assert "the training loss became NaN or infinite at iteration 3;" in " ".join(err.split())
    assert not (out_dir / "ckpt.pt").exists()  # the evaluation at 5 never came


def test_sigterm_after_divergence_writes_no_interrupt_checkpoint(
    prepare_char_dataset, tiny_model_args, run_in_process, tmp_path, monkeypatch
):
    data_dir = prepare_char_dataset()
    out_dir = tmp_path / "out"
    argv = [*tiny_model_args, f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--gradient_accumulation_steps=2"]
    assert run_in_process(train_main, [*argv, "--max_iters=2", "--eval_interval=2"])[0] == 0
    before = (out_dir / "ckpt.pt").read_bytes()
    poison_micro_step(monkeypatch, at_call=0, then_sigterm=True)  # the resumed run's first micro-step
    code, _, err = run_in_process(train_main, [*argv, "--max_iters=6", "--eval_interval=2", "--init_from=resume"])
    assert code == 2 and "NaN or infinite at iteration 2;" in " ".join(err.split())  # resumed at 2
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    assert (out_dir / "ckpt.pt").read_bytes() == before


def test_eval_only_resume_of_a_finished_checkpoint_prints_its_losses(
    prepare_char_dataset, tiny_model_args, tmp_path, capsys
):
    """The checkpoint is at iteration 4; the default eval_interval (2000) does not divide it."""
    data_dir = prepare_char_dataset()
    train(tiny_model_args, data_dir, tmp_path / "out", "--max_iters=4", "--eval_interval=2")
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    train(tiny_model_args, data_dir, tmp_path / "out", "--init_from=resume", "--eval_only=True")
    out = capsys.readouterr().out
    assert list(eval_losses(out)) == [4]
    assert not ITER.search(out)
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


def test_resuming_a_finished_run_trains_nothing_and_says_so(prepare_char_dataset, tiny_model_args, tmp_path, capsys):
    data_dir = prepare_char_dataset()
    out_dir = tmp_path / "out"
    train(tiny_model_args, data_dir, out_dir, "--max_iters=4", "--eval_interval=2")
    before = (out_dir / "ckpt.pt").read_bytes()
    for max_iters in (4, 3):  # the run's own end (its final evaluation saved iteration 4), and before it
        capsys.readouterr()
        train(tiny_model_args, data_dir, out_dir, f"--max_iters={max_iters}", "--eval_interval=2", "--init_from=resume")
        out = capsys.readouterr().out
        assert f"the checkpoint is at iteration 4, the end of --max_iters={max_iters}: nothing to do." in out
        assert not ITER.search(out) and not STEP.search(out)
    assert (out_dir / "ckpt.pt").read_bytes() == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]


def test_without_always_save_only_an_improved_val_loss_is_saved(
    prepare_char_dataset, tiny_model_args, tmp_path, capsys, monkeypatch
):
    """always_save_checkpoint=False (the shakespeare_char config's choice): ckpt.pt is the best model so far.
    The evaluated losses are scripted, so which evaluations improve is known."""
    import nanogpt.train

    val = iter([3.0, 2.5, 2.8, 2.4, 2.6])  # evaluations at iterations 0, 2, 4, 6, 8
    monkeypatch.setattr(nanogpt.train, "estimate_loss", lambda *args: {"train": 1.0, "val": next(val)})
    data_dir = prepare_char_dataset()
    out_dir = tmp_path / "out"
    train(tiny_model_args, data_dir, out_dir, "--max_iters=8", "--eval_interval=2", "--always_save_checkpoint=False")
    saves = re.findall(r"^step (\d+): .*\nsaving checkpoint", capsys.readouterr().out, re.M)
    assert saves == ["2", "6"]  # 2.5 and 2.4 improved; 2.8 and 2.6 did not (0 is never saved)
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["iter_num"] == 6 and ckpt["best_val_loss"] == 2.4


def test_cuda_random_states_of_another_gpu_count_are_skipped_with_a_warning(monkeypatch, capsys):
    """A checkpoint from a 2-GPU machine resumed on a 1-GPU one: the CUDA generators start afresh, and say so."""
    from nanogpt.resume import rng_state, set_rng_state

    gen = torch.Generator().manual_seed(0)
    state = {**rng_state([gen]), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("must not be called"))
    set_rng_state(state, [gen])
    assert "holds the random states of 2 GPU(s) and this machine has 1" in capsys.readouterr().err


def test_batch_generators_restore_one_per_micro_batch_and_read_older_checkpoints(capsys):
    """A step's micro-batches each have a generator; checkpoints before that held one state, not a list."""
    from nanogpt.resume import rng_state, set_rng_state

    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    saved = rng_state([a, b])
    expected = [torch.randint(100, (4,), generator=g) for g in (a, b)]
    fresh = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    set_rng_state(saved, fresh)
    assert all(torch.equal(torch.randint(100, (4,), generator=g), e) for g, e in zip(fresh, expected))
    older = {**saved, "data": saved["data"][1]}  # a single tensor: the one generator of older versions
    one = [torch.Generator()]
    set_rng_state(older, one)
    assert torch.equal(torch.randint(100, (4,), generator=one[0]), expected[1])
    set_rng_state(saved, one)  # two saved, one drawn now: --gradient_accumulation_steps changed
    assert "came from 2 generator(s) per process and this run draws from 1" in " ".join(capsys.readouterr().err.split())
