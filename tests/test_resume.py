"""Training reliability: crash-safe checkpoints, exact resume, graceful stop, the NaN guard, safe loading
and determinism.

Training runs are tiny (n_layer=1, n_embd=16, block_size=8) and most run as forked child processes
(see forkrun.py); the runs stopped by SIGINT and SIGTERM, and the resume command printed after SIGINT,
are the real `python train.py` in a fresh interpreter. "Bit-identical" compares every tensor's bytes
(weights, AdamW state, random states) and every loss as float.hex, recorded in the child by wrapping
GPT.forward.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shlex
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import forkrun as fr
import pytest
import torch

from nanogpt.checkpoint import FORMAT_VERSION, load_checkpoint, model_from_checkpoint, save_checkpoint
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig

N = 30  # iterations of the reference run
EVAL_INTERVAL = 5
GRAD_ACCUM = 2
# dropout exercises the torch random state, gradient accumulation the per-micro-step batches
ARGS = (*fr.TINY, "--dropout=0.1", f"--gradient_accumulation_steps={GRAD_ACCUM}", f"--eval_interval={EVAL_INTERVAL}")


# ----------------------------------------------------------------------------- helpers


recorder = fr.loss_recorder


def records(path: Path, mode: str) -> list[str]:
    return [line.split()[1] for line in path.read_text().splitlines() if line.startswith(mode)]


def log_lines(stdout: str, start: int = 0) -> list[str]:
    """The 'step N: ...' and 'iter N: loss ...' lines for N >= start, without the timing columns."""
    out = []
    for line in stdout.splitlines():
        m = re.match(r"(step|iter) (\d+):", line)
        if m and int(m.group(2)) >= start:
            out.append(re.sub(r", time .*", "", line))
    return out


def assert_bitwise_equal(a, b, where: str = "checkpoint") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: tensor kind"
        assert a.numpy().tobytes() == b.numpy().tobytes(), f"{where}: tensor bytes differ"
    elif isinstance(a, float):
        assert isinstance(b, float) and a.hex() == b.hex(), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(a: dict, b: dict) -> None:
    """Everything but the options (init_from, max_iters may differ) and the measured training time is
    bit-identical; the time is only positive."""
    assert a["train_seconds"] > 0 and b["train_seconds"] > 0
    skip = ("config", "train_seconds")
    assert_bitwise_equal({k: v for k, v in a.items() if k not in skip}, {k: v for k, v in b.items() if k not in skip})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_files(out_dir: Path) -> list[str]:
    """The temporary files of checkpoint saves (not those of metrics.jsonl or loss.png)."""
    return [n for n in os.listdir(out_dir) if n.endswith(".tmp") and n.startswith((".ckpt.pt.", ".interrupt.pt."))]


def expected_after_resume(ref, r: int, reason: str) -> tuple[list[str], list[str], list[str]]:
    """What a run resumed at iteration r must print and compute: the reference run from r on, minus the
    evaluation at r when the checkpoint was saved right after it."""
    lines = log_lines(ref.result.stdout, r)
    skip_eval = reason == "eval"
    if skip_eval:
        lines = [line for line in lines if not line.startswith(f"step {r}:")]
    evals_after = sum(1 for it in range(r + skip_eval, ref.n + 1) if it % EVAL_INTERVAL == 0)
    n_eval = 2 * evals_after  # eval_iters=1 batch for each of train and val
    train = records(ref.losses, "train")[r * GRAD_ACCUM :]
    evals = records(ref.losses, "eval")
    return lines, train, evals[len(evals) - n_eval :]


def assert_resumed_exactly(ref, result, losses: Path, out_dir: Path, r: int, reason: str) -> None:
    assert result.returncode == 0, result.stderr
    assert f"at iteration {r}" in result.stdout, result.stdout
    lines, train, evals = expected_after_resume(ref, r, reason)
    assert log_lines(result.stdout) == lines
    assert records(losses, "train") == train
    assert records(losses, "eval") == evals
    assert_same_training_state(ref.ckpt, load_checkpoint(out_dir / "ckpt.pt"))


def end_after(r: int) -> int:
    """Where to end a run stopped at iteration r: N, or (if the machine was slow to stop it) the next evaluation."""
    return max(N, r + EVAL_INTERVAL - r % EVAL_INTERVAL)


def wait_for(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


# ----------------------------------------------------------------------------- the reference run


class Straight:
    """Uninterrupted runs with every loss recorded: the references for exact resume. `ref(n)` trains n
    iterations (once per n); the attributes are those of ref(N)."""

    def __init__(self, root: Path, data: Path):
        self.root, self.data = root, data
        self.args = [*ARGS, f"--data_dir={data}"]
        self._refs: dict[int, SimpleNamespace] = {}
        vars(self).update(vars(self.ref(N)))

    def ref(self, n: int) -> SimpleNamespace:
        if n not in self._refs:
            out, losses = f"straight{n}", self.root / f"straight{n}.losses"
            result = fr.run(
                fr.train_main(), [*self.args, f"--out_dir={out}", f"--max_iters={n}"], self.root, recorder(losses)
            )
            assert result.returncode == 0, result.stderr
            ckpt = load_checkpoint(self.root / out / "ckpt.pt")
            assert ckpt["iter_num"] == n and ckpt["reason"] == "eval"
            self._refs[n] = SimpleNamespace(
                n=n, result=result, losses=losses, ckpt=ckpt, path=self.root / out / "ckpt.pt"
            )
        return self._refs[n]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Straight:
    root = tmp_path_factory.mktemp("resume")
    return Straight(root, fr.make_dataset(root / "data"))


# ----------------------------------------------------------------------------- 1. crash-safe checkpoints


def slow_saves() -> None:
    """In the child: each save pauses 0.2 s after writing its bytes, before the rename (a slow disk), so a
    kill sent the moment the temporary file appears lands inside the save."""
    real_save = torch.save

    def save(*args, **kwargs):
        real_save(*args, **kwargs)
        time.sleep(0.2)

    torch.save = save


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(straight, tmp_path):
    """24 SIGKILLs of a run that checkpoints every iteration: 12 at random times, 12 in the middle of a
    save (each leaves the save's temporary file behind, which proves it). After each, ckpt.pt loads and
    the next run resumes from it."""
    rng = random.Random(20240601)
    out = tmp_path / "out"
    args = [*straight.args, "--out_dir=out", "--eval_interval=1", "--always_save_checkpoint=True"]
    first = fr.run(fr.train_main(), [*args, "--max_iters=2"], tmp_path)
    assert first.returncode == 0, first.stderr
    last_iter = load_checkpoint(out / "ckpt.pt")["iter_num"]
    start_iter = last_iter
    mid_save = 0
    for k in range(24):
        stale = set(temp_files(out))  # left by earlier kills; the next run deletes them at start-up
        targeted = k % 2 == 1
        argv = [*args, "--max_iters=1000000", "--init_from=resume"]
        child = fr.start(fr.train_main(), argv, tmp_path, setup=slow_saves if targeted else None)
        if targeted:
            saving = lambda: set(temp_files(out)) - stale or child.poll() is not None  # noqa: B023, E731
            wait_for(saving, 10, "a save")
        else:
            time.sleep(rng.uniform(0.05, 0.5))
        result = child.kill()
        assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)
        torn = bool(set(temp_files(out)) - stale)  # the kill interrupted a save: its temporary file is left
        assert torn or not targeted, f"kill {k} was meant to land inside a save"
        mid_save += torn
        assert "Traceback" not in result.stderr
        if "resuming from" in result.stdout:
            assert f"resuming from out/ckpt.pt at iteration {last_iter}" in result.stdout
        ckpt = load_checkpoint(out / "ckpt.pt")  # raises UserError if torn or missing
        model_from_checkpoint(ckpt)
        assert ckpt["iter_num"] >= last_iter
        last_iter = ckpt["iter_num"]
    assert mid_save >= 12
    assert last_iter > start_iter, "the runs made no progress between kills"
    print(f"24 SIGKILLs, {mid_save} during a save; reached iteration {last_iter}")

    # a last resume cleans up the torn temporary files and finishes
    result = fr.run(fr.train_main(), [*args, f"--max_iters={last_iter + 3}", "--init_from=resume"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"resuming from out/ckpt.pt at iteration {last_iter}" in result.stdout
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == last_iter + 3
    assert temp_files(out) == []


# ----------------------------------------------------------------------------- 2. exact resume


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_stopped_and_resumed_run_is_bit_identical(straight, tmp_path, how):
    """Stop a run at about iteration 12 (SIGKILL: back to the last eval checkpoint, 10 or later; SIGTERM:
    interrupt.pt just after), resume to N (or a later evaluation if the stop came late): the same weights,
    optimizer and random states, losses and log lines as the uninterrupted run."""
    args = [*straight.args, "--out_dir=out", "--max_iters=1000000"]
    child = fr.start(fr.train_main(), args, tmp_path)
    wait_for(lambda: "iter 12:" in child.out.read_text() or child.poll() is not None, what="iteration 12")
    if how == "sigkill":
        assert child.kill().returncode == -signal.SIGKILL
        saved = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    else:
        child.signal(signal.SIGTERM)
        assert child.wait().returncode == 143
        saved = load_checkpoint(tmp_path / "out" / "interrupt.pt")
    r, reason = saved["iter_num"], saved["reason"]
    assert reason == ("eval" if how == "sigkill" else "interrupt")
    assert r >= 10

    losses = tmp_path / "resumed.losses"
    end = end_after(r)
    result = fr.run(fr.train_main(), [*args, f"--max_iters={end}", "--init_from=resume"], tmp_path, recorder(losses))
    assert_resumed_exactly(straight.ref(end), result, losses, tmp_path / "out", r, reason)
    assert not (tmp_path / "out" / "interrupt.pt").exists()  # ckpt.pt is further along now


def test_extending_max_iters_resumes_exactly(straight, tmp_path):
    """Train to 12 (last checkpoint at 10), then resume with --max_iters=N: identical to training to N."""
    args = [*straight.args, "--out_dir=out"]
    first = fr.run(fr.train_main(), [*args, "--max_iters=12"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 10
    losses = tmp_path / "resumed.losses"
    result = fr.run(fr.train_main(), [*args, f"--max_iters={N}", "--init_from=resume"], tmp_path, recorder(losses))
    assert_resumed_exactly(straight, result, losses, tmp_path / "out", 10, "eval")


@pytest.mark.parametrize(
    "option, message",
    [
        ("--n_layer=2", "n_layer: checkpoint 1, requested 2"),
        ("--n_embd=32", "n_embd: checkpoint 16, requested 32"),
        ("--block_size=64", "block_size: checkpoint 8, requested 64"),
        ("--bias=True", "bias: checkpoint False, requested True"),
    ],
)
def test_resume_refuses_a_different_model_shape(straight, tmp_path, option, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(straight.path.read_bytes())
    before = digest(out / "ckpt.pt")
    result = fr.run(fr.train_main(), [*straight.args, "--out_dir=out", option, "--init_from=resume"], tmp_path)
    fr.assert_user_error(result, "cannot resume from out/ckpt.pt", "different shape", message, "new --out_dir")
    assert digest(out / "ckpt.pt") == before
    assert sorted(os.listdir(out)) == ["ckpt.pt"]


def test_resume_prefers_the_newer_of_ckpt_and_interrupt(straight, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = dict(straight.ckpt)
    save_checkpoint(out / "ckpt.pt", {**ckpt, "iter_num": 20})
    save_checkpoint(out / "interrupt.pt", {**ckpt, "iter_num": 23, "reason": "interrupt"})
    result = fr.run(
        fr.train_main(), [*straight.args, "--out_dir=out", "--max_iters=24", "--init_from=resume"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "resuming from out/interrupt.pt at iteration 23" in result.stdout


# ----------------------------------------------------------------------------- 3. graceful stop


def test_sigint_and_sigterm_save_interrupt_pt_and_the_printed_command_resumes_exactly(straight, tmp_path):
    """The real `python train.py`, stopped by SIGINT and by SIGTERM (two runs, side by side): the signal
    saves interrupt.pt and prints a resume command; that command, run to N iterations (in a fresh
    interpreter after SIGINT, in a forked child after SIGTERM), reproduces the reference run bit for bit."""
    args = [*straight.args, "--out_dir=out", "--max_iters=1000000"]
    runs = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            cwd = tmp_path / signal.Signals(signum).name
            cwd.mkdir()
            runs[signum] = (cwd, fr.popen_script("train.py", *args, cwd=cwd))
        waiting = dict(runs)

        def signal_those_that_saved() -> bool:  # each run as soon as it has written its first ckpt.pt
            for signum, (cwd, proc) in list(waiting.items()):
                if (cwd / "out" / "ckpt.pt").exists() or proc.poll() is not None:
                    proc.send_signal(signum)
                    del waiting[signum]
            return not waiting

        wait_for(signal_those_that_saved, 120, "the first checkpoints")
        for signum, (cwd, proc) in runs.items():
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == (130 if signum == signal.SIGINT else 143), stderr
            assert "Traceback" not in stderr
            name = signal.Signals(signum).name
            m = re.search(rf"stopped by {name} at iteration (\d+); saved out/interrupt.pt\.", stderr)
            assert m, stderr
            saved = load_checkpoint(cwd / "out" / "interrupt.pt")
            r = saved["iter_num"]
            assert r == int(m.group(1)) > EVAL_INTERVAL and saved["reason"] == "interrupt"
            command = shlex.split(stderr.split("resume with: ", 1)[1].strip())
            assert command[:2] == ["python", "train.py"] and command[2:] == [*args, "--init_from=resume"]

            end, losses = end_after(r), cwd / "resumed.losses"
            if signum == signal.SIGINT:  # the losses are recorded through a sitecustomize (see forkrun)
                result = fr.run_script("train.py", *command[2:], f"--max_iters={end}", cwd=cwd, record_losses=losses)
            else:
                result = fr.run(fr.train_main(), [*command[2:], f"--max_iters={end}"], cwd, recorder(losses))
            assert f"resuming from out/interrupt.pt at iteration {r}" in result.stdout
            assert_resumed_exactly(straight.ref(end), result, losses, cwd / "out", r, "interrupt")
            assert not (cwd / "out" / "interrupt.pt").exists()
    finally:
        for _, proc in runs.values():
            proc.kill()
            proc.communicate()


def test_resume_command_quotes_arguments():
    from nanogpt.resume import resume_command

    cmd = resume_command(["--out_dir=my run", "--init_from=scratch", "--n_layer=2"])
    assert shlex.split(cmd) == ["python", "train.py", "--out_dir=my run", "--n_layer=2", "--init_from=resume"]


# ----------------------------------------------------------------------------- 4. numerical guard


def inject_nan_at(iteration: int, start: int):
    """A child `setup` that makes the training loss NaN at `iteration` of a run resumed at `start`."""

    def setup() -> None:
        forward, calls = GPT.forward, [0]

        def nan_forward(self, idx, targets=None, cache=None):
            logits, loss = forward(self, idx, targets, cache)
            if self.training:
                if start + calls[0] // GRAD_ACCUM == iteration:
                    loss = loss * float("nan")
                calls[0] += 1
            return logits, loss

        GPT.forward = nan_forward

    return setup


@pytest.mark.parametrize(
    "log_interval, max_iters",
    [(1, N + 10), (100, N + 10), (100, N + 3)],
    ids=["next-log-line", "next-evaluation", "after-the-last-iteration"],
)
def test_nan_loss_stops_training_and_keeps_the_checkpoint(straight, tmp_path, log_interval, max_iters):
    """A NaN loss at iteration N+2 stops the run with the iteration and the usual causes, whether it is seen at
    the next log line, at the next evaluation (which would otherwise save NaN weights over ckpt.pt, as
    always_save_checkpoint is on) or after the last iteration; ckpt.pt stays byte-identical."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(straight.path.read_bytes())
    before = digest(out / "ckpt.pt")
    args = [*straight.args, "--out_dir=out", f"--log_interval={log_interval}", f"--max_iters={max_iters}"]
    result = fr.run(fr.train_main(), [*args, "--init_from=resume"], tmp_path, inject_nan_at(N + 2, start=N))
    fr.assert_user_error(result, f"NaN or infinite at iteration {N + 2}", "no checkpoint", "learning rate too high")
    assert digest(out / "ckpt.pt") == before
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl"]


def test_absurd_learning_rate_is_caught_before_the_checkpoint_is_overwritten(straight, tmp_path):
    out = tmp_path / "out"
    first = fr.run(fr.train_main(), [*straight.args, "--out_dir=out", "--max_iters=5"], tmp_path)
    assert first.returncode == 0
    before = digest(out / "ckpt.pt")
    args = [*straight.args, "--out_dir=out", "--max_iters=20", "--learning_rate=1e6", "--log_interval=100"]
    result = fr.run(fr.train_main(), [*args, "--init_from=resume"], tmp_path)
    fr.assert_user_error(result, "NaN or infinite at iteration", "Usual causes", "--learning_rate")
    assert digest(out / "ckpt.pt") == before


# ----------------------------------------------------------------------------- 5. safe loading


class Payload:
    """Unpickling this would create a file: what a malicious checkpoint could do with plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16))
    torch.save(
        {"model_args": model.config.to_dict(), "model": model.state_dict(), "x": Payload(marker)}, tmp_path / "c"
    )
    with pytest.raises(UserError, match="could run arbitrary code"):
        load_checkpoint(tmp_path / "c")
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("import os\nos.system('touch pwned')\n", "found an import"),
        ("n_layer = __import__('os').system('touch pwned')\n", "Function calls are not allowed"),
        ("n_layer = 1\nopen('pwned', 'w')\n", "only simple assignments"),
    ],
)
def test_config_file_with_code_is_rejected_and_nothing_runs(straight, tmp_path, text, fragment):
    (tmp_path / "evil.py").write_text(text)
    result = fr.run(fr.train_main(), ["evil.py", *straight.args, "--out_dir=out", "--max_iters=1"], tmp_path)
    fr.assert_user_error(result, "evil.py, line", fragment, "never executed")
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists()


def nanogpt_style(ckpt: dict) -> dict:
    """What Karpathy's nanoGPT saves: no format_version, no tokenizer, torch.compile's `_orig_mod.` prefixes,
    and model_args with keys nanogpt does not have."""
    return {
        "model": {f"_orig_mod.{k}": v for k, v in ckpt["model"].items()},
        "optimizer": ckpt["optimizer"],
        "model_args": {**ckpt["model_args"], "flash": True},
        "iter_num": ckpt["iter_num"],
        "best_val_loss": ckpt["best_val_loss"],
        "config": {**ckpt["config"], "dataset": "tiny", "data_dir": ""},
    }


def test_nanogpt_checkpoint_migrates_and_resumes(straight, tmp_path, monkeypatch):
    """A nanoGPT-format char-level checkpoint finds its vocabulary in data/<dataset>/meta.json, loads, resumes
    training and samples; the new checkpoint has the current format and the tokenizer."""
    monkeypatch.chdir(tmp_path)  # nanoGPT's data/<dataset> is relative to the working directory
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny").symlink_to(straight.data)
    out = tmp_path / "out"
    out.mkdir()
    torch.save(nanogpt_style(straight.ckpt), out / "ckpt.pt")
    migrated = load_checkpoint(out / "ckpt.pt")
    assert migrated["format_version"] == FORMAT_VERSION
    assert migrated["tokenizer"]["kind"] == "char"
    assert "flash" not in migrated["model_args"]
    assert_bitwise_equal(migrated["model"], straight.ckpt["model"])
    model_from_checkpoint(migrated)

    # no rng in a nanoGPT checkpoint, so not bit-exact: check it trains on from iteration N
    result = fr.run(
        fr.train_main(), [*straight.args, "--out_dir=out", f"--max_iters={N + 5}", "--init_from=resume"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert f"resuming from out/ckpt.pt at iteration {N}" in result.stdout
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["format_version"] == FORMAT_VERSION and resumed["iter_num"] == N + 5
    assert resumed["tokenizer"] == migrated["tokenizer"]

    result = fr.run(
        fr.sample_main(), ["--out_dir=out", "--device=cpu", "--num_samples=2", "--max_new_tokens=5"], tmp_path
    )
    assert result.returncode == 0, result.stderr


def test_gpt2_vocabulary_nanogpt_checkpoint_needs_no_meta(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    torch.save(
        {"model": model.state_dict(), "model_args": model.config.to_dict(), "iter_num": 7, "best_val_loss": 2.0},
        tmp_path / "ckpt.pt",
    )
    migrated = load_checkpoint(tmp_path / "ckpt.pt")
    assert migrated["tokenizer"] == {"kind": "gpt2"} and migrated["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("version, message", [(FORMAT_VERSION + 1, "newer nanogpt"), ("1", "format_version")])
def test_future_or_bogus_format_version_says_why(straight, tmp_path, version, message):
    torch.save({**straight.ckpt, "format_version": version}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match=message):
        load_checkpoint(tmp_path / "ckpt.pt")
    result = fr.run(fr.sample_main(), ["--out_dir=.", "--device=cpu"], tmp_path)
    fr.assert_user_error(result, message)


# ----------------------------------------------------------------------------- 7. determinism


def test_same_seed_gives_identical_runs(straight, tmp_path):
    losses = tmp_path / "again.losses"
    again = fr.run(fr.train_main(), [*straight.args, "--out_dir=again", f"--max_iters={N}"], tmp_path, recorder(losses))
    assert again.returncode == 0, again.stderr
    assert log_lines(again.stdout) == log_lines(straight.result.stdout)
    assert losses.read_text() == straight.losses.read_text()
    assert_same_training_state(straight.ckpt, load_checkpoint(tmp_path / "again" / "ckpt.pt"))

    # and the comparison can tell runs apart: another seed changes the losses
    other = fr.run(fr.train_main(), [*straight.args, "--out_dir=other", "--max_iters=3", "--seed=7"], tmp_path)
    assert log_lines(other.stdout) != log_lines(straight.result.stdout, 0)[: len(log_lines(other.stdout))]


def test_a_second_ctrl_c_stops_at_once_and_abandons_the_save(straight, tmp_path):
    """The first SIGINT asks for a clean stop and interrupt.pt; a second one, while that save is under way
    (slowed here), interrupts at once: exit 130, the save abandoned, no interrupt.pt and no temporary file."""

    def slow_interrupt_saves() -> None:
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if obj.get("reason") == "interrupt":
                time.sleep(30)  # the second Ctrl-C arrives during this

        torch.save = save

    out = tmp_path / "out"
    args = [*straight.args, "--out_dir=out", "--max_iters=1000000", "--eval_interval=1000000"]
    child = fr.start(fr.train_main(), args, tmp_path, setup=slow_interrupt_saves)
    wait_for(lambda: "iter 3:" in child.out.read_text() or child.poll() is not None, what="iteration 3")
    child.signal(signal.SIGINT)
    wait_for(lambda: temp_files(out) or child.poll() is not None, 10, "the interrupt save")
    child.signal(signal.SIGINT)
    result = child.wait(timeout=20)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().endswith("interrupted") and "Traceback" not in result.stderr
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]  # no checkpoint; the log of iterations 0 to 3


def test_workers_whose_torchrun_was_killed_save_and_stop(straight, tmp_path):
    """torchrun starts each worker in a session of its own, so a SIGKILL of torchrun alone (the OOM killer,
    a kill -9) reaches no worker. They notice their parent changed, stop after the same iteration, save
    interrupt.pt together and exit, instead of training on unseen."""
    out, stdout, stderr = tmp_path / "out", tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    args = [*straight.args, "--max_iters=1000000", "--eval_interval=1000000"]
    # files, not pipes: the workers write after torchrun is gone
    proc = fr.popen_script(
        *fr.torchrun_command(args, out), cwd=tmp_path, new_session=True, stdout=stdout, stderr=stderr
    )
    try:
        deadline = time.monotonic() + 120
        while "iter 3:" not in stdout.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [pid for pid in fr.tagged(proc.tag) if pid != proc.pid]
        assert len(workers) == 2, stdout.read_text() + stderr.read_text()
        os.kill(proc.pid, signal.SIGKILL)  # torchrun alone
        proc.wait(timeout=30)
        while fr.tagged(proc.tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fr.tagged(proc.tag) == [], "the workers trained on without their torchrun"
    finally:
        fr.kill_group(proc)
    stop = re.search(r"stopped by the end of torchrun at iteration (\d+); saved (\S+)\.", stderr.read_text())
    assert stop and stop[2] == str(out / "interrupt.pt"), stderr.read_text()
    hint = "resume with: torchrun --standalone --nproc_per_node=2 train.py"  # as many processes again
    assert hint in stderr.read_text() and stderr.read_text().count("resume with:") == 1
    ckpt = load_checkpoint(out / "interrupt.pt")
    assert ckpt["iter_num"] == int(stop[1]) > 3 and ckpt["reason"] == "interrupt" and len(ckpt["rng_ranks"]) == 2
