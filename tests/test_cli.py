"""The `nanogpt` command: subcommands, help and unknown commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.cli import COMMANDS
from nanogpt.cli import main as cli_main


def test_module_help_lists_the_subcommands(run_script):
    proc = run_script("-m", "nanogpt", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: nanogpt COMMAND")
    for name in ("prepare", "train", "sample", *COMMANDS):
        assert f"  {name} " in proc.stdout


def test_unknown_subcommand_exits_2(run_script):
    proc = run_script("-m", "nanogpt", "trian")
    assert proc.returncode == 2
    assert "error: unknown command 'trian'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "prepare" in proc.stderr  # the usage follows


@pytest.mark.parametrize("argv", [[], ["-h"], ["help"]])
def test_help_in_process(argv, capsys):
    cli_main(argv)
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_subcommand_help_is_the_scripts_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--n_layer=12" in out and "--gradient_accumulation_steps=40" in out


def test_subcommand_user_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["sample", "--top_p=2"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --top_p")


def test_prepare_subcommand_runs(run_script, tiny_corpus, tmp_path):
    proc = run_script("-m", "nanogpt", "prepare", "mine", f"--input={tiny_corpus}", "--tokenizer=char")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "data" / "mine").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_installed_entry_point_if_present(tmp_path):
    exe = Path(sys.executable).parent / "nanogpt"
    if not exe.exists():
        pytest.skip("the nanogpt console script is not installed in this environment")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "commands:" in proc.stdout
