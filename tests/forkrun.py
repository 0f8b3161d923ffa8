"""Helpers for test_resume.py and test_bad_inputs.py: tiny datasets, and entry points run in child processes.

A fresh interpreter spends ~2 s importing torch, too slow for dozens of kills and error cases on a
2-core machine. `start`/`run` therefore fork this (torch-importing) test process instead: the child
is a real, separate process that changes directory, sends its stdout/stderr to files, calls
`run_main(main, argv)` exactly as train.py / sample.py do, prints a traceback for any other
exception (as the interpreter would) and exits with the real status; the parent can SIGKILL it.
The tests also run each script once as a genuine `python train.py ...` subprocess.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDS = "the king and queen of a far land spoke to their loyal people about wine bread and war".split()

# n_layer=1, n_embd=16, block_size=8: a training step takes a few milliseconds on one core
TINY = (
    "--device=cpu",
    "--compile=False",
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--block_size=8",
    "--batch_size=2",
    "--gradient_accumulation_steps=1",
    "--eval_iters=1",
    "--log_interval=1",
    "--warmup_iters=2",
    "--lr_decay_iters=100",
    "--learning_rate=1e-2",
    "--plot=False",
)


def make_text(n_chars: int = 6000, seed: int = 0) -> str:
    """Deterministic pseudo-English: words from a small vocabulary, speaker names, punctuation, line breaks."""
    import random

    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "KING", "NURSE"]
    out: list[str] = []
    size = 0
    while size < n_chars:
        line = f"{rng.choice(names)}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        line += rng.choice([".", "!", "?", ";", ","]) + "\n\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


def make_dataset(folder: Path, text: str | None = None) -> Path:
    """A prepared character-level dataset (train.bin, val.bin, meta.json) in `folder`; returns it."""
    from nanogpt.prepare import PrepareOptions, prepare

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.txt").write_text(make_text(9000) if text is None else text, encoding="utf-8")
    prepare(PrepareOptions(dataset="tiny", data_dir=str(folder), tokenizer="char"))
    return folder


@dataclass
class Result:
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str


def _child(main: Callable, argv: Sequence[str], cwd: Path, out: Path, err: Path, setup: Callable | None) -> None:
    code = 1
    try:
        os.chdir(cwd)
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # what a fresh interpreter has
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import torch

        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for the real scripts (see script_env)
        sys.argv = ["nanogpt", *argv]
        if setup is not None:
            setup()
        from nanogpt.errors import run_main

        run_main(main, list(argv))
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        with _suppress():
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


@dataclass
class Child:
    pid: int
    out: Path
    err: Path
    status: int | None = None

    def poll(self) -> int | None:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def wait(self, timeout: float = 60) -> Result:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"child {self.pid} ran longer than {timeout}s:\n{self.out.read_text()}")
            time.sleep(0.005)
        return Result(self.status, self.out.read_text(encoding="utf-8"), self.err.read_text(encoding="utf-8"))

    def signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> Result:
        self.signal(signal.SIGKILL)
        return self.wait()


_logs: list[Path] = []


def _log_dir() -> Path:
    if not _logs:
        _logs.append(Path(tempfile.mkdtemp(prefix="nanogpt-forkrun-")))
        atexit.register(shutil.rmtree, _logs[0], True)
    return _logs[0]


def _warm_up() -> None:
    """Pay once, here, for what every training run does lazily at start-up, so forked children start in
    milliseconds: creating an optimizer imports torch._dynamo (2-5 s), and MFU measures the CPU's matmul
    peak (0.2 s)."""
    import torch

    from nanogpt.mfu import peak_flops

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    peak_flops("cpu", torch.float32)
    _warm.append(True)


_warm: list[bool] = []


def start(main: Callable, argv: Sequence[str], cwd: Path, setup: Callable | None = None) -> Child:
    """Fork a child that runs run_main(main, argv) in cwd, its stdout and stderr going to files.

    `setup`, if given, runs in the child first (e.g. to monkeypatch something there only)."""
    if not hasattr(os, "fork"):  # pragma: no cover - Windows
        pytest.skip("this test forks child processes")
    if not _warm:
        _warm_up()
    fd, name = tempfile.mkstemp(dir=_log_dir())
    os.close(fd)
    out, err = Path(name + ".out"), Path(name + ".err")
    out.touch()
    err.touch()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        _child(main, argv, Path(cwd), out, err, setup)
    return Child(pid, out, err)


def run(main: Callable, argv: Sequence[str], cwd: Path, setup: Callable | None = None, timeout: float = 60) -> Result:
    return start(main, argv, cwd, setup).wait(timeout)


def loss_recorder(path: Path) -> Callable[[], None]:
    """A child `setup` that appends 'train|eval <loss.hex()>' to path for every loss the model computes:
    the exact values, so two runs' losses can be compared bit for bit."""

    def setup() -> None:
        from nanogpt.model import GPT

        log = open(path, "w", buffering=1)
        forward = GPT.forward

        def recording_forward(self, idx, targets=None, cache=None):
            logits, loss = forward(self, idx, targets, cache)
            if loss is not None:
                log.write(f"{'train' if self.training else 'eval'} {loss.item().hex()}\n")
            return logits, loss

        GPT.forward = recording_forward

    return setup


# Loaded by a fresh interpreter through PYTHONPATH (see run_script): records losses as loss_recorder does.
SITECUSTOMIZE = """
import os, sys
if os.environ.get("NANOGPT_TEST_LOSSES"):
    sys.path.insert(0, os.environ["NANOGPT_TEST_DIR"])
    import forkrun
    forkrun.loss_recorder(os.environ["NANOGPT_TEST_LOSSES"])()
"""


# A torchrun worker script (`python -m torch.distributed.run ... <file> <records_dir> <train.py options>`):
# nanogpt's real training loop, recording in records_dir/rank<RANK>.json what number formats it computed in:
# - "linear": "<phase> <output dtype> <weight dtype>" of every nn.Linear forward, phase "train" (with
#   gradients: a training micro-step) or "eval" (an evaluation or a sample); the weight as the layer holds it
#   during the forward (under FSDP the unsharded, cast copy);
# - "master": "<type> <dtype>" of every parameter the optimizer updates, and "grads": "<dtype>" of their
#   gradients, seen just before each optimizer step;
# - "reduce_scatter": the dtype of every reduce-scatter's input (FSDP's gradient reduction).
PRECISION_DRIVER = """
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from nanogpt.train import main

seen = {"linear": set(), "master": set(), "grads": set(), "reduce_scatter": set()}


def linear_hook(module, args, output):
    if isinstance(module, torch.nn.Linear):
        phase = "train" if torch.is_grad_enabled() else "eval"
        seen["linear"].add(f"{phase} {output.dtype} {module.weight.dtype}")


def record_step(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen["master"].add(f"{type(p).__name__} {p.dtype}")
            if p.grad is not None:
                seen["grads"].add(str(p.grad.dtype))


reduce_scatter_single = dist.reduce_scatter_single


def recording_reduce_scatter(output, input, *args, **kwargs):
    seen["reduce_scatter"].add(str(input.dtype))
    return reduce_scatter_single(output, input, *args, **kwargs)


dist.reduce_scatter_single = recording_reduce_scatter  # FSDP2 calls it as dist.reduce_scatter_single
torch.nn.modules.module.register_module_forward_hook(linear_hook)
register_optimizer_step_pre_hook(record_step)
main(sys.argv[2:])
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({k: sorted(v) for k, v in seen.items()}, f)
"""


def precision_driver(folder: Path) -> tuple[Path, Path]:
    """PRECISION_DRIVER written to folder, and the empty folder its records go to: (script, records_dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    script, records = folder / "precision_driver.py", folder / "precision_records"
    script.write_text(PRECISION_DRIVER, encoding="utf-8")
    records.mkdir()
    return script, records


def precision_records(records: Path, ranks: int) -> list[dict[str, list[str]]]:
    """What each rank's PRECISION_DRIVER recorded, in rank order."""
    return [json.loads((records / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(ranks)]


def failing_atomic_open(real_atomic_open: Callable, error: Callable[[], BaseException], after: int = 4096):
    """atomic_open whose files raise error() once more than `after` bytes are written: a disk that fills up,
    or a Ctrl-C, in the middle of torch.save."""
    import contextlib

    class FailingFile:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > after:
                raise error()
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    @contextlib.contextmanager
    def failing(path):
        with real_atomic_open(path) as f:
            yield FailingFile(f)

    return failing


def train_main():
    from nanogpt.train import main

    return main


def sample_main():
    from nanogpt.sample import main

    return main


def prepare_main():
    from nanogpt.prepare import main

    return main


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a script run by a test: the repository on PYTHONPATH, one thread (see
    conftest.py), never mistaken for a torchrun worker, plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.update(extra)
    return env


def popen_script(
    script: str | os.PathLike,
    *args: str | os.PathLike,
    cwd: Path,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    stdout: Path | None = None,
    stderr: Path | None = None,
):
    """A genuine `python <script> args...` subprocess (a path relative to the repository, or a flag such as
    -m or -c), text output piped, or written to the files `stdout`/`stderr` (a file outlives the child: what
    torchrun's workers write after torchrun ended; tqdm's bar never fills it). With new_session, it leads a
    process group of its own (its pid is the group's id). Everything it starts carries a tag in its
    environment, so kill_group finds it too: torchrun starts each worker in a session of its own, which no
    signal to the child's group reaches."""
    cmd = [sys.executable, script if str(script).startswith("-") else str(REPO / script), *map(str, args)]
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    with contextlib.ExitStack() as files:
        out, err = (files.enter_context(open(p, "w")) if p else subprocess.PIPE for p in (stdout, stderr))
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**(env or script_env()), TAG: tag},
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=new_session,
        )
    proc.tag = tag  # type: ignore[attr-defined]
    return proc


def torchrun_command(args: list[str], out: Path, *extra: str, nproc: int = 2, script: list | None = None) -> list:
    """torchrun of train.py, or of `script` (a worker script and its own arguments) given train.py's options."""
    return [
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *(script or [REPO / "train.py"]),
        *args, f"--out_dir={out}", *extra,
    ]  # fmt: skip


def worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of that rank (`parent`: torchrun's pid), or None."""
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if int(stat[1]) == parent and f"RANK={rank}".encode() in env and int(proc.name) != parent:
            return int(proc.name)
    return None


TAG = "NANOGPT_TEST_TAG"  # in the environment of a popen_script child and of everything it starts


def tagged(tag: str) -> list[int]:
    """The processes whose environment holds TAG=tag: a child and its descendants, orphans included."""
    found, marker = [], f"{TAG}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send sig to a popen_script child's process group and to every process it started, wherever they are
    (torchrun's workers, even after torchrun itself ended), and reap the child if the signal ends it."""
    with _suppress():
        os.killpg(proc.pid, sig)
    for pid in tagged(getattr(proc, "tag", "-")):
        with _suppress():
            os.kill(pid, sig)
    if sig == signal.SIGKILL:
        with _suppress():
            proc.wait(timeout=30)


def run_script(
    script: str | os.PathLike,
    *args: str | os.PathLike,
    cwd: Path,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    input: str | None = None,
    record_losses: Path | None = None,
) -> Result:
    """Run popen_script to the end, with `env` added to script_env() and `input` on stdin. With
    record_losses, the fresh interpreter writes every loss there (as loss_recorder does) through a
    sitecustomize module put first on its PYTHONPATH."""
    full_env = script_env(**(env or {}))
    if record_losses is not None:
        site = Path(tempfile.mkdtemp(dir=_log_dir()))
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), full_env["PYTHONPATH"]])
        full_env.update(NANOGPT_TEST_LOSSES=str(record_losses), NANOGPT_TEST_DIR=str(Path(__file__).parent))
    proc = popen_script(script, *args, cwd=cwd, env=full_env, new_session=True)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)  # the script and anything it started (torchrun's workers hold the pipes too)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "(no output: the pipes stayed open)", ""
        raise AssertionError(f"{script} {args} ran longer than {timeout}s:\n{out}\n{err}") from None
    finally:
        kill_group(proc)  # no worker outlives its run
    return Result(proc.returncode, out, err)


def logged_losses(out_dir: Path) -> list[tuple]:
    """Every loss a training run logged in out_dir/metrics.jsonl, in full precision (as the floats were
    computed; the printed lines have 4 decimals): ("train", iter, loss) for each logged iteration and
    ("eval", iter, train loss, val loss) for each evaluation, in the order written."""
    from nanogpt.metrics import METRICS_NAME, read_metrics

    return [
        (r["kind"], r["iter"], *(r[k] for k in ("train_loss", "val_loss") if k in r))
        for r in read_metrics(out_dir / METRICS_NAME)
        if r["kind"] in ("train", "eval")
    ]


def assert_user_error(result: Result, *fragments: str) -> None:
    """Exit status 2, stderr starting with `error:` and holding each fragment, and no traceback."""
    detail = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, detail
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, detail
    assert result.stderr.startswith("error: "), detail
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def signal_at_line(
    args: Sequence[str | os.PathLike],
    cwd: Path,
    prefix: str,
    sig: int,
    timeout: float = 240,
    group: bool = False,
) -> Result:
    """Run `python *args` (popen_script) and send `sig` as soon as it prints a line starting with `prefix`:
    to the child alone (torchrun passes SIGTERM on to its workers), or with group=True to it and everything it
    started (torchrun and its workers: a SIGKILL that ends them all); returns the finished run. The child
    leads a process group of its own, and whatever is left of it when this returns (or fails) is killed,
    so no worker outlives the test. The lines are read on a thread, so a child that goes quiet (or never
    prints `prefix`) is killed after `timeout` seconds and the test fails with what it printed, instead of
    blocking in readline."""
    proc = popen_script(*args, cwd=cwd, new_session=True)
    try:
        return _signal_at_line(proc, args, prefix, sig, timeout, group)
    finally:
        kill_group(proc)


def _signal_at_line(proc: subprocess.Popen, args, prefix: str, sig: int, timeout: float, group: bool) -> Result:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None and proc.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stream) -> None:  # the workers' output comes unbuffered (torchrun runs them with python -u)
        for line in stream:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
    reader.start()
    err_parts: list[str] = []
    err_reader = threading.Thread(target=lambda: err_parts.append(proc.stderr.read()), daemon=True)
    err_reader.start()  # a child that fills the stderr pipe would block before printing `prefix`
    out: list[str] = []
    signalled = False
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
            if not signalled:
                kill_group(proc)
                reader.join(5)
                err_reader.join(5)
                raise AssertionError(
                    f"{args}: no line starting with {prefix!r} within {timeout}s:\n{''.join(out)}\n{''.join(err_parts)}"
                ) from None
        if line is None:
            break
        out.append(line)
        if not signalled and line.startswith(prefix):
            if group:
                kill_group(proc, sig)
            else:
                proc.send_signal(sig)
            signalled = True
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        reader.join(5)
        err_reader.join(5)
        raise AssertionError(
            f"{args} did not end within {timeout}s of starting:\n{''.join(out)}\n{''.join(err_parts)}"
        ) from None
    reader.join(5)
    err_reader.join(5)
    return Result(proc.returncode, "".join(out), "".join(err_parts))
