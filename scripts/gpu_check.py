"""The GPU check behind `bash .ci/gpu [RESULTS_DIR]`: what only a real NVIDIA GPU can show, in one run.

It runs in a folder of its own (a fresh temporary folder, removed at the end): the prepared tiny
Shakespeare files are copied there from data/shakespeare_char (read, never written), and train.py,
sample.py, bench.py and config/ are linked there, so the seed commands run verbatim without touching
anything in the working tree: your out-* folders are neither read, written nor deleted. In order:
  1. every test with a CUDA case: `pytest -k cuda` over every tests/test_*.py that mentions cuda (the
     cases parametrized with device "cuda", today those of tests/test_mixed_precision.py; any test that
     gains a "cuda" case is picked up);
  2. the seed GPU command `python train.py config/train_shakespeare_char.py`, verbatim, until the
     first evaluation with val loss <= 1.47 (then SIGTERM: it saves interrupt.pt and stops) or its
     5000 iterations, with the wall time at which each evaluation was printed;
  3. the speedrun config `python train.py config/speedrun_shakespeare_char.py` (its closing line: final
     val loss, and when val <= 1.47 was first reached, in seconds of training);
  4. the seed sampling command `python sample.py --out_dir=out-shakespeare-char`, verbatim;
  5. with 2 GPUs or more: the seed GPU config for 100 iterations under FSDP on 2 of them
     (`torchrun --nproc_per_node=2 ... --fsdp=True`), then resumed from its sharded checkpoint to 150;
     skipped, and said so, on one GPU;
  6. bench.py on the GPT-2 124M shape (batch 12, compiled) for ms/iter and MFU, and on the seed
     GPU model.
Every figure goes to RESULTS_DIR/gpu_check.json, with the logs beside it.

Time: TOTAL_SECONDS (480, 8 minutes) in all, by construction. One deadline is set when the check
starts, RESERVE_SECONDS before the end; each step gets the lesser of its own limit (LIMITS) and the time
left to that deadline, and a step with less than MIN_STEP_SECONDS left is skipped and reported as such.
A step past its time has its whole process tree stopped (SIGTERM to every process group in it, then
SIGKILL after KILL_GRACE_SECONDS, which the reserve covers) and reaped, torchrun's workers included
(torchrun starts each worker in a session of its own), so nothing is left to skew the next step.

The GPU machines this is written for are offline and have Python with a CUDA build of PyTorch, numpy,
tiktoken, transformers, tqdm and pytest, but only the repository's working tree: the package is used
from the tree (PYTHONPATH), nothing is installed or downloaded, and tiny Shakespeare must arrive
prepared, as the ignored files data/shakespeare_char/{train.bin,val.bin,meta.json}.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_FILES = ("train.bin", "val.bin", "meta.json")
TARGET_VAL_LOSS = 1.47
TOTAL_SECONDS = 480  # the whole check, preflight to report: 8 minutes
RESERVE_SECONDS = 20  # kept back from the steps: a last step's kill grace, and writing the report
KILL_GRACE_SECONDS = 5  # after SIGTERM to a timed-out step's processes, before SIGKILL
MIN_STEP_SECONDS = 3  # a step with less time left than this is skipped, not started
# each step's own limit in seconds (on an H100/H200 the steps should need about half of it); they sum to
# 450, within TOTAL_SECONDS - RESERVE_SECONDS, and the deadline caps each one to the time left anyway
LIMITS = {
    "tests": 75, "train": 170, "speedrun": 60, "sample": 25, "fsdp": 30, "fsdp resume": 20, "bench gpt2": 50,
    "bench shakespeare_char": 20,
}  # fmt: skip
LINKED = ("train.py", "sample.py", "bench.py", "config")  # linked into the work folder, read only
STEP = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms, mfu (-?[\d.]+)%")

clock = time.monotonic  # the tests replace it to run the whole schedule without waiting


class Deadline:
    """One deadline for the whole check: a step may run for min(its limit, the time left), never longer."""

    def __init__(self, start: float | None = None):
        self.start = clock() if start is None else start
        self.end = self.start + TOTAL_SECONDS - RESERVE_SECONDS

    def left(self) -> float:
        return self.end - clock()

    def budget(self, name: str) -> float:
        return max(0.0, min(LIMITS[name], self.left()))


def fail(message: str) -> None:
    print(f".ci/gpu: {message}", file=sys.stderr)
    sys.exit(1)


def preflight() -> dict[str, Any]:
    """Everything that must hold before spending GPU time; one line and exit 1 otherwise."""
    try:
        import torch
    except ImportError:
        fail(f"PyTorch is not importable by {sys.executable}; set PYTHON to a Python with a CUDA build of PyTorch.")
    if not torch.cuda.is_available():
        fail(
            f"no CUDA GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            "this check needs a machine with an NVIDIA GPU. Nothing was run."
        )
    sys.path.insert(0, str(REPO))  # the package from this tree, not installed
    try:
        from nanogpt.device import native_bf16
    except ImportError as e:
        fail(f"the nanogpt package in {REPO} cannot be imported ({e}); its dependencies must be installed.")
    data = REPO / "data" / "shakespeare_char"
    missing = [name for name in DATA_FILES if not (data / name).is_file()]
    if missing:
        fail(
            f"data/shakespeare_char/{missing[0]} is missing. Prepare tiny Shakespeare where the text is at hand "
            "(python data/shakespeare_char/prepare.py) and bring the ignored files data/shakespeare_char/"
            "train.bin, val.bin and meta.json with the working tree (device tool: carry data/shakespeare_char)."
        )
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "native_bf16": native_bf16(),
    }


def prepare_work(work: Path) -> Path:
    """The check's own folder: copies of the prepared data (the originals are only read) and links to the
    scripts and configs, so `python train.py config/...` runs verbatim there and writes only there."""
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    for name in DATA_FILES:
        shutil.copyfile(REPO / "data" / "shakespeare_char" / name, data / name)
    for name in LINKED:
        (work / name).symlink_to(REPO / name)
    return work


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [e.get("PYTHONPATH")])])
    e.pop("RANK", None)
    return e


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), fields[0]


def descendants(pid: int) -> list[int]:
    """The live processes below pid (from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        info = _ppid_and_state(int(entry.name))
        if info is not None:
            children.setdefault(info[0], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    info = _ppid_and_state(pid)
    if info is not None:
        return info[1] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc").is_dir()  # no /proc: trust kill(0) (a zombie then looks alive)


def _signal_tree(groups: set[int], pids: list[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(proc: subprocess.Popen, grace: float) -> None:
    """Stop proc, started in a session of its own, and everything below it: SIGTERM to its process group,
    to the group of every descendant (torchrun puts each worker in a session of its own) and to each
    descendant; SIGKILL to the same after `grace` seconds for whatever is still running. Never our own group.
    The caller reaps proc (proc.wait())."""
    ours = os.getpgrp()
    pids = [proc.pid, *descendants(proc.pid)]

    def groups_of(pids: list[int]) -> set[int]:
        groups = {proc.pid}
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        return groups - {ours}

    groups = groups_of(pids)
    if grace > 0:
        _signal_tree(groups, pids, signal.SIGTERM)
        t_end = time.monotonic() + grace
        while time.monotonic() < t_end and any(alive(pid) for pid in pids):
            time.sleep(0.05)
    more = [pid for pid in descendants(proc.pid) if pid not in pids]  # any started meanwhile
    pids += more
    _signal_tree(groups | groups_of(more), pids, signal.SIGKILL)


def run_logged(
    name: str,
    cmd: list[str],
    results: Path,
    timeout: float,
    on_line: Callable[[str, float, subprocess.Popen], None] | None = None,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Run cmd in cwd (the check's work folder), in a session of its own, its output to results/<name>.log with
    each line's time since the start; on_line(line, seconds, proc) may react to lines (e.g. stop the run).
    After `timeout` seconds its whole process tree is stopped (kill_tree); when it ends, anything it left
    running in its process group is killed, and it is reaped."""
    print(f"\n== {name} ({timeout:.0f} s at most): {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        kill_tree(proc, KILL_GRACE_SECONDS)

    watchdog = threading.Timer(timeout, expire)
    watchdog.start()
    try:
        with (results / f"{name}.log").open("w", encoding="utf-8") as log:
            for line in proc.stdout:
                seconds = time.monotonic() - t0
                log.write(f"[{seconds:8.2f}s] {line}")
                print(line, end="", flush=True)
                if on_line is not None:
                    on_line(line.rstrip("\n"), seconds, proc)
    finally:
        watchdog.cancel()
        if watchdog.is_alive():
            watchdog.join()  # a kill under way finishes before the leftovers are swept
        if not expired.is_set():
            kill_tree(proc, grace=0)  # its group's leftovers, if any; SIGKILL to proc itself if it still runs
        proc.wait()
        proc.stdout.close()
    return {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "seconds": time.monotonic() - t0,
        "limit_seconds": timeout,
        "timed_out": expired.is_set(),
    }


class Check:
    """The state the steps share: where results and the work folder are, and the deadline."""

    def __init__(self, results: Path, work: Path, deadline: Deadline):
        self.results, self.work, self.deadline = results, work, deadline

    def run(self, name: str, limit: str, cmd: list[str], on_line=None) -> dict[str, Any] | None:
        """run_logged in the work folder for min(LIMITS[limit], time left); None (and said so) if out of time."""
        budget = self.deadline.budget(limit)
        if budget < MIN_STEP_SECONDS:
            print(f"\n== {name}: skipped, {self.deadline.left():.0f} s left of the {TOTAL_SECONDS} s", flush=True)
            return None
        return run_logged(name, cmd, self.results, budget, on_line, cwd=self.work)

    def log(self, name: str) -> str:
        path = self.results / f"{name}.log"
        return path.read_text() if path.is_file() else ""


OUT_OF_TIME = {"skipped": f"out of time (the check's {TOTAL_SECONDS} s)", "passed": False}


def cuda_test_files() -> list[str]:
    """tests/test_*.py that mention cuda: the files that can hold a CUDA case."""
    files = sorted((REPO / "tests").glob("test_*.py"))
    return [str(path) for path in files if "cuda" in path.read_text(encoding="utf-8").lower()]


def run_tests(c: Check) -> dict[str, Any]:
    # every test with a CUDA case ("cuda" in its id, e.g. a device parametrization) in every test file that
    # mentions cuda (the others, some needing packages the GPU machine lacks, are not even collected); the
    # CPU cases run in CI on every change
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={c.work / 'pytest'}",
        *cuda_test_files(), "-k", "cuda",
    ]  # fmt: skip
    r = c.run("tests", "tests", cmd)
    if r is None:
        return dict(OUT_OF_TIME)
    summary = c.log("tests").strip().splitlines()[-1:] or [""]
    r["summary"] = re.sub(r"^\[\s*[\d.]+s\] ", "", summary[0])
    r["passed"] = r["returncode"] == 0 and not r["timed_out"]
    return r


def run_training(c: Check) -> dict[str, Any]:
    evals: list[dict[str, float]] = []
    iters: list[tuple[int, float, float]] = []
    state: dict[str, Any] = {"reached": None}

    def on_line(line: str, seconds: float, proc: subprocess.Popen) -> None:
        if m := STEP.match(line):
            evals.append({"iter": int(m[1]), "train": float(m[2]), "val": float(m[3]), "seconds": seconds})
            if state["reached"] is None and float(m[3]) <= TARGET_VAL_LOSS:
                state["reached"] = evals[-1]
                proc.send_signal(signal.SIGTERM)  # saves interrupt.pt after ckpt.pt and stops: no more to learn
        elif m := ITER.match(line):
            iters.append((int(m[1]), float(m[2]), float(m[3])))

    # a fresh run, as the seed command makes: the work folder is new, so there is no out-shakespeare-char yet
    r = c.run("train", "train", [sys.executable, "train.py", "config/train_shakespeare_char.py"], on_line)
    if r is None:
        return dict(OUT_OF_TIME)
    steady = sorted(ms for it, ms, _ in iters if it >= 100)
    r.update(
        evals=evals,
        target_val_loss=TARGET_VAL_LOSS,
        reached=state["reached"],
        seconds_to_target=state["reached"]["seconds"] if state["reached"] else None,
        median_ms_per_iter=steady[len(steady) // 2] if steady else None,
        last_mfu_percent=iters[-1][2] if iters else None,
        passed=r["returncode"] in (0, -15, 143) and state["reached"] is not None and not r["timed_out"],
    )  # -15/143: our SIGTERM
    return r


DONE = re.compile(r"^done: final val loss ([\d.]+); ([\d,]+) iterations.*?; ([\d.]+) s of training")
REACHED = re.compile(rf"val <= {TARGET_VAL_LOSS} first at iteration (\d+): ([\d.]+) s of training")


def run_speedrun(c: Check) -> dict[str, Any]:
    """config/speedrun_shakespeare_char.py: the issue-10 target is val <= 1.47 within 30 s of training."""
    cmd = [sys.executable, "train.py", "config/speedrun_shakespeare_char.py", "--out_dir=out-speedrun"]
    r = c.run("speedrun", "speedrun", cmd)
    if r is None:
        return dict(OUT_OF_TIME)
    log = c.log("speedrun")
    done = next((m for line in log.splitlines() if (m := DONE.search(line))), None)
    reached = REACHED.search(log)
    r.update(
        final_val_loss=float(done[1]) if done else None,
        iterations=int(done[2].replace(",", "")) if done else None,
        train_seconds=float(done[3]) if done else None,
        seconds_to_target=float(reached[2]) if reached else None,
        passed=r["returncode"] == 0 and done is not None,
    )
    return r


def run_sampling(c: Check) -> dict[str, Any]:
    r = c.run("sample", "sample", [sys.executable, "sample.py", "--out_dir=out-shakespeare-char"])
    if r is None:
        return dict(OUT_OF_TIME)
    r["passed"] = r["returncode"] == 0 and "---------------" in c.log("sample")
    return r


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_fsdp(c: Check) -> dict[str, Any]:
    """FSDP across 2 GPUs (NCCL): trains and writes sharded checkpoints, resumes from them, consolidates."""
    if gpu_count() < 2:
        print("\n== fsdp: skipped (one GPU; the FSDP leg needs two)", flush=True)
        return {"skipped": "one GPU", "passed": True}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
        "config/train_shakespeare_char.py", "--fsdp=True", "--eval_interval=50", "--out_dir=out-fsdp",
    ]  # fmt: skip
    r = c.run("fsdp", "fsdp", [*cmd, "--max_iters=100"])
    if r is None:
        return dict(OUT_OF_TIME)
    resumed = c.run("fsdp_resume", "fsdp resume", [*cmd, "--max_iters=150", "--init_from=resume"])
    logs = [c.log(name) for name in ("fsdp", "fsdp_resume")]
    r["resume_returncode"] = resumed["returncode"] if resumed else None
    r["passed"] = (
        resumed is not None
        and r["returncode"] == resumed["returncode"] == 0
        and all("done: final val loss" in log and "consolidated the sharded checkpoint" in log for log in logs)
        and "resuming from" in logs[1]
        and "ckpt.dcp" in logs[1]
        and (c.work / "out-fsdp" / "ckpt.pt").is_file()
    )
    return r


def run_bench(c: Check) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = {  # name -> bench options; LIMITS[f"bench {name}"] seconds each
        "gpt2": ["--models=gpt2", "--batch_size=12", "--compile=True", "--sample_tokens=100"],
        "shakespeare_char": ["--models=shakespeare_char"],
    }
    for name, args in runs.items():
        json_path = c.results / f"bench_{name}.json"
        r = c.run(f"bench_{name}", f"bench {name}", [sys.executable, "bench.py", *args, f"--json={json_path}"])
        if r is None:
            out[name] = dict(OUT_OF_TIME)
            continue
        r["passed"] = r["returncode"] == 0 and json_path.is_file()
        if r["passed"]:
            m = json.loads(json_path.read_text())["models"][name]
            r.update(
                ms_per_iter=m["train"]["ms_per_iter"],
                tokens_per_s=m["train"]["tokens_per_s"],
                mfu=m["train"]["mfu"],
                generate_tokens_per_s=m["generate_tokens_per_s"],
                sample_workload=m["sample_workload"],
                peak_memory_mb=m["peak_memory_mb"],
            )
        out[name] = r
    return out


STEPS = (
    ("tests", run_tests), ("train", run_training), ("speedrun", run_speedrun), ("sample", run_sampling),
    ("fsdp", run_fsdp), ("bench", run_bench),
)  # fmt: skip


def summarize(report: dict[str, Any], results: Path) -> bool:
    ok = {name: report[name]["passed"] for name, _ in STEPS if name != "bench"}
    ok.update({f"bench {k}": v["passed"] for k, v in report["bench"].items()})
    machine = report["machine"]
    print(f"\n== summary ({machine['gpu']}, torch {machine['torch']}, {report['total_seconds']:.0f} s)")
    print(f"tests: {report['tests'].get('summary', report['tests'].get('skipped'))}")
    t = report["train"]
    if t.get("reached"):
        print(
            f"seed GPU config: val {t['reached']['val']} at iter {t['reached']['iter']}, {t['seconds_to_target']:.1f} s"
        )
    if "median_ms_per_iter" in t:
        print(f"seed GPU config: median {t['median_ms_per_iter']} ms/iter, MFU {t['last_mfu_percent']}%")
    for name, b in report["bench"].items():
        if b["passed"]:
            print(f"bench {name}: {b['ms_per_iter']:.1f} ms/iter, MFU {b['mfu'] * 100:.1f}%")
    for name, passed in ok.items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
    print(f"wrote {results / 'gpu_check.json'}")
    return all(ok.values())


def main(argv: list[str]) -> int:
    deadline = Deadline()  # from the very start: preflight counts too
    results = Path(argv[0] if argv else "gpu-results").resolve()
    machine = preflight()
    results.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine,
        "limit_seconds": TOTAL_SECONDS,
        "step_limits": LIMITS,
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    report["commit"] = commit.stdout.strip() or None
    with tempfile.TemporaryDirectory(prefix="nanogpt-gpu-check-") as tmp:
        check = Check(results, prepare_work(Path(tmp)), deadline)
        print(f"== working in {check.work} (removed at the end); {TOTAL_SECONDS} s at most in all", flush=True)
        for name, step in STEPS:
            report[name] = step(check)
            (results / "gpu_check.json").write_text(json.dumps(report, indent=1))  # kept even if a later step dies
        report["total_seconds"] = clock() - deadline.start
        (results / "gpu_check.json").write_text(json.dumps(report, indent=1))
    return 0 if summarize(report, results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
