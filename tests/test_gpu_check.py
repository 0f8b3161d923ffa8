"""`bash .ci/gpu` (scripts/gpu_check.py): its refusals on machines it cannot use, and the log formats it reads."""

from __future__ import annotations

import subprocess
import sys
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
