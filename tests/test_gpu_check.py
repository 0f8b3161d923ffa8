"""`bash .ci/gpu` (scripts/gpu_check.py): its refusals on machines it cannot use, and the log formats it reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def run_gpu_check(tmp_path: Path, python: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / ".ci" / "gpu"), str(tmp_path / "results")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": python},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_at_once_with_one_line(tmp_path):
    proc = run_gpu_check(tmp_path, sys.executable)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(".ci/gpu: no CUDA GPU here") and "Nothing was run." in proc.stderr
    assert not (tmp_path / "results").exists()


def test_without_pytorch_it_says_which_python_to_set(tmp_path):
    shim = tmp_path / "python-without-torch"
    hide_torch = "import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{hide_torch}" "$@"\n')
    shim.chmod(0o755)
    proc = run_gpu_check(tmp_path, str(shim))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "PyTorch is not importable" in proc.stderr and "set PYTHON" in proc.stderr


def test_missing_prepared_data_is_named_before_any_gpu_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare_char" / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(SystemExit) as info:
        gpu_check.preflight()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data/shakespeare_char/val.bin is missing" in err
    assert "carry data/shakespeare_char" in err


def test_the_log_lines_it_reads_are_the_ones_train_prints(prepare_char_dataset, tiny_model_args, tmp_path):
    data_dir = prepare_char_dataset()
    argv = [*tiny_model_args, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--max_iters=4"]
    seen: list[tuple[str, str]] = []
    (tmp_path / "results").mkdir()
    cmd = [sys.executable, str(REPO / "train.py"), *argv, "--eval_interval=2"]
    result = gpu_check.run_logged("train", cmd, tmp_path / "results", 60, lambda line, s, p: seen.append((line, s)))
    assert result["returncode"] == 0 and not result["timed_out"]
    steps = [gpu_check.STEP.match(line) for line, _ in seen if line.startswith("step ")]
    iters = [gpu_check.ITER.match(line) for line, _ in seen if line.startswith("iter ")]
    assert [int(m[1]) for m in steps] == [0, 2, 4]
    assert [int(m[1]) for m in iters] == [0, 1, 2, 3, 4]
    assert "] step 4: train loss" in (tmp_path / "results" / "train.log").read_text()


# A child that starts two grandchildren, one in its own process group and one in a session of its own (as
# torchrun starts its workers), both ignoring SIGTERM, prints the three pids and sleeps.
FAMILY = r"""
import os, signal, subprocess, sys, time
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
same_group = subprocess.Popen([sys.executable, "-c", stubborn])
own_session = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
time.sleep(0.5)  # both have set SIG_IGN
print("pids", os.getpid(), same_group.pid, own_session.pid, flush=True)
time.sleep(120)
"""


def wait_gone(pids: list[int], seconds: float = 10) -> list[int]:
    end = time.monotonic() + seconds
    while (left := [pid for pid in pids if gpu_check.alive(pid)]) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def test_a_timed_out_step_has_its_whole_process_tree_killed_and_reaped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "KILL_GRACE_SECONDS", 1)
    pids: list[int] = []
    (tmp_path / "results").mkdir()
    t0 = time.monotonic()
    result = gpu_check.run_logged(
        "family",
        [sys.executable, "-c", FAMILY],
        tmp_path / "results",
        timeout=3,
        on_line=lambda line, s, p: pids.extend(int(x) for x in line.split()[1:]) if line.startswith("pids") else None,
        cwd=tmp_path,
    )
    assert len(pids) == 3 and result["timed_out"] and result["returncode"] == -signal.SIGTERM
    assert time.monotonic() - t0 < 3 + 1 + 5  # the limit, the grace, and slack for a busy machine
    assert wait_gone(pids) == []  # the child, its grandchild in its group, and the one in a session of its own
    assert gpu_check.descendants(os.getpid()) == []


def test_what_a_finished_step_left_running_in_its_group_is_killed(tmp_path):
    leaves = (
        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print('pid', p.pid, flush=True)"
    )
    seen: list[int] = []
    (tmp_path / "results").mkdir()
    result = gpu_check.run_logged(
        "leaves",
        [sys.executable, "-c", leaves],
        tmp_path / "results",
        timeout=60,
        on_line=lambda line, s, p: seen.append(int(line.split()[1])),
        cwd=tmp_path,
    )
    assert result["returncode"] == 0 and not result["timed_out"] and len(seen) == 1
    assert wait_gone(seen) == []


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A working tree with prepared data and a run of the user's in each out-* folder the check uses."""
    repo = tmp_path / "repo"
    (repo / "data" / "shakespeare_char").mkdir(parents=True)
    for name in gpu_check.DATA_FILES:
        (repo / "data" / "shakespeare_char" / name).write_text(f"prepared {name}")
    for name in (*gpu_check.LINKED, "tests"):
        (repo / name).mkdir() if "." not in name else (repo / name).write_text("# the repository's script\n")
    (repo / "tests" / "test_cuda_case.py").write_text('DEVICES = ["cpu", "cuda"]\n')
    (repo / "tests" / "test_cpu_only.py").write_text("def test_cpu(): pass\n")
    for out in ("out-shakespeare-char", "out-speedrun", "out-fsdp"):
        (repo / out).mkdir()
        (repo / out / "ckpt.pt").write_text(f"the user's run in {out}")
    monkeypatch.setattr(gpu_check, "REPO", repo)
    monkeypatch.setattr(gpu_check, "preflight", lambda: {"gpu": "a test GPU", "torch": torch.__version__})
    monkeypatch.setattr(gpu_check, "gpu_count", lambda: 2)  # plan the FSDP steps too
    return repo


@pytest.mark.parametrize("overrun", [0, gpu_check.KILL_GRACE_SECONDS], ids=["at-limit", "past-limit-by-the-grace"])
def test_every_step_runs_in_its_own_folder_within_its_limit_and_the_check_within_its_total(
    fake_repo, tmp_path, monkeypatch, overrun
):
    """The whole schedule on a fake clock, every step running to its limit (and past it by the kill grace):
    each step's limit is min(its own, the time left), the total stays within TOTAL_SECONDS, and every command
    runs in the check's own folder, which holds copies of the data and links to the scripts."""
    now = [1000.0]
    monkeypatch.setattr(gpu_check, "clock", lambda: now[0])
    calls: list[dict] = []

    def fake_run_logged(name, cmd, results, timeout, on_line=None, cwd=None):
        work = Path(cwd)
        assert (work / "data" / "shakespeare_char" / "train.bin").read_text() == "prepared train.bin"
        assert not (work / "data" / "shakespeare_char" / "train.bin").is_symlink()
        assert (work / "train.py").resolve() == fake_repo / "train.py"
        assert (work / "config").resolve() == fake_repo / "config"
        for out in ("out-shakespeare-char", "out-speedrun", "out-fsdp"):
            (work / out).mkdir(exist_ok=True)  # what the real commands would write, here
            (work / out / "ckpt.pt").write_text("the check's run")
        (results / f"{name}.log").write_text("")
        calls.append({"name": name, "cmd": cmd, "timeout": timeout, "cwd": work, "start": now[0]})
        now[0] += timeout + overrun
        return {"returncode": 1, "timed_out": True, "seconds": timeout + overrun}

    monkeypatch.setattr(gpu_check, "run_logged", fake_run_logged)
    before = tree(fake_repo)
    start = now[0]
    assert gpu_check.main([str(tmp_path / "results")]) == 1  # every step "timed out"

    assert tree(fake_repo) == before  # nothing in the working tree written, deleted or replaced
    work = calls[0]["cwd"]
    assert all(c["cwd"] == work for c in calls) and not work.is_relative_to(fake_repo)
    assert not work.exists()  # its own folder, removed at the end
    limit_of = {"fsdp_resume": "fsdp resume", "bench_gpt2": "bench gpt2"}
    limit_of["bench_shakespeare_char"] = "bench shakespeare_char"
    for c in calls:
        assert 0 < c["timeout"] <= gpu_check.LIMITS[limit_of.get(c["name"], c["name"])]
        assert c["start"] + c["timeout"] <= start + gpu_check.TOTAL_SECONDS - gpu_check.RESERVE_SECONDS
    assert now[0] - start <= gpu_check.TOTAL_SECONDS - gpu_check.RESERVE_SECONDS + gpu_check.KILL_GRACE_SECONDS
    report = json.loads((tmp_path / "results" / "gpu_check.json").read_text())
    assert report["total_seconds"] <= gpu_check.TOTAL_SECONDS and report["limit_seconds"] == gpu_check.TOTAL_SECONDS
    names = [c["name"] for c in calls]
    if overrun == 0:  # the limits fit the total: every step ran, with its full limit
        assert names == [
            "tests",
            "train",
            "speedrun",
            "sample",
            "fsdp",
            "fsdp_resume",
            "bench_gpt2",
            "bench_shakespeare_char",
        ]
        assert [c["timeout"] for c in calls] == list(gpu_check.LIMITS.values())
    else:  # the late steps got what was left, or were skipped and said so
        assert calls[-1]["timeout"] < gpu_check.LIMITS[limit_of.get(names[-1], names[-1])] or len(calls) < 8
        assert report["bench"]["shakespeare_char"]["passed"] is False
    tests = next(c["cmd"] for c in calls if c["name"] == "tests")
    assert tests[tests.index("-k") + 1] == "cuda"
    assert [arg for arg in tests if arg.endswith(".py")] == [str(fake_repo / "tests" / "test_cuda_case.py")]
    assert f"--basetemp={work / 'pytest'}" in tests
    train = next(c["cmd"] for c in calls if c["name"] == "train")
    assert train[1:] == ["train.py", "config/train_shakespeare_char.py"]  # the seed command, verbatim


def test_the_files_searched_for_cuda_cases_include_every_one_that_has_them():
    files = [Path(f).name for f in gpu_check.cuda_test_files()]
    assert "test_mixed_precision.py" in files and "test_gpu_check.py" in files
    assert "test_serve_page.py" not in files  # selenium, not on the GPU machine, is never imported


def test_the_limits_fit_the_stated_total():
    assert sum(gpu_check.LIMITS.values()) <= gpu_check.TOTAL_SECONDS - gpu_check.RESERVE_SECONDS
    assert gpu_check.KILL_GRACE_SECONDS < gpu_check.RESERVE_SECONDS
    deadline = gpu_check.Deadline(start=gpu_check.clock() - gpu_check.TOTAL_SECONDS)  # all time spent
    assert all(deadline.budget(name) == 0 for name in gpu_check.LIMITS)
    stated = f"{gpu_check.TOTAL_SECONDS} s"
    assert f"({gpu_check.TOTAL_SECONDS}, {gpu_check.TOTAL_SECONDS // 60} minutes)" in gpu_check.__doc__
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Checking on a real GPU") :]
    section = section[: section.index("\n### ", 4)]
    assert f"{stated} ({gpu_check.TOTAL_SECONDS // 60} minutes) at most" in section
    assert (
        f"{gpu_check.RESERVE_SECONDS} s before" in section
        and f"SIGKILL {gpu_check.KILL_GRACE_SECONDS} s later" in section
    )
    assert f"under {gpu_check.MIN_STEP_SECONDS} s" in section


def test_the_seed_commands_run_in_the_check_folder_on_the_cpu(
    prepare_char_dataset, tiny_model_args, tmp_path, monkeypatch
):
    """The real training and sampling steps' commands, on the CPU in a work folder prepared as the check does:
    their runs land there, and the working tree's data is only read."""
    data = prepare_char_dataset(data_dir=tmp_path / "repo" / "data" / "shakespeare_char")
    repo = tmp_path / "repo"
    for name in gpu_check.LINKED:
        (repo / name).symlink_to(REPO / name)
    monkeypatch.setattr(gpu_check, "REPO", repo)
    before = tree(data)
    work = gpu_check.prepare_work(tmp_path / "work")
    (tmp_path / "results").mkdir()
    check = gpu_check.Check(tmp_path / "results", work, gpu_check.Deadline())
    cpu = ["--device=cpu", "--compile=False", *tiny_model_args]
    train = check.run(
        "train",
        "train",
        [
            sys.executable,
            "train.py",
            "config/train_shakespeare_char.py",
            *cpu,
            "--max_iters=2",
            "--eval_interval=2",
            "--eval_iters=1",
        ],
    )
    assert train["returncode"] == 0, check.log("train")
    sample = check.run(
        "sample",
        "sample",
        [
            sys.executable,
            "sample.py",
            "--out_dir=out-shakespeare-char",
            "--device=cpu",
            "--max_new_tokens=5",
            "--num_samples=1",
        ],
    )
    assert sample["returncode"] == 0 and "---------------" in check.log("sample"), check.log("sample")
    assert (work / "out-shakespeare-char" / "ckpt.pt").is_file()
    assert tree(data) == before and not (repo / "out-shakespeare-char").exists()
