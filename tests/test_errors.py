"""nanogpt.errors: a UserError becomes a one-paragraph message and exit status 2."""

from __future__ import annotations

import pytest

from nanogpt.errors import UserError, run_main


def raiser(exc: BaseException):
    def main(argv):
        raise exc

    return main


def test_user_error_is_printed_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        run_main(raiser(UserError("something is wrong. Do this instead.")), [])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: something is wrong. Do this instead.\n"


def test_long_messages_wrap_without_breaking_paths(capsys):
    path = "/tmp/pytest-of-someone/pytest-123/out-shakespeare-char-with-a-very-long-name/ckpt.pt"
    message = f"no checkpoint at {path}. " + "Train a model first with the same --out_dir, or point it elsewhere. " * 3
    with pytest.raises(SystemExit):
        run_main(raiser(UserError(message)), [])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) > 1
    assert all(len(line) <= 100 or path in line for line in lines)
    assert any(path in line for line in lines)  # a path stays whole, so it can be copied
    assert " ".join(err.split()) == " ".join(f"error: {message}".split())


def test_ctrl_c_exits_130_quietly(capsys):
    with pytest.raises(SystemExit) as info:
        run_main(raiser(KeyboardInterrupt()), [])
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.parametrize("bug", [ZeroDivisionError("a bug"), MemoryError()])
def test_bugs_show_their_traceback_and_ask_for_a_report(capsys, bug):
    """Not a user's mistake: no misleading diagnosis, the real traceback, and a line saying what it is."""
    with pytest.raises(SystemExit) as info:
        run_main(raiser(bug), [])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert f"{type(bug).__name__}" in err.splitlines()[-3]
    assert err.splitlines()[-1].startswith(f"bug: nanogpt stopped on an unexpected {type(bug).__name__}.")


def test_success_passes_argv_through():
    seen = []
    run_main(seen.append, ["--a=1"])
    assert seen == [["--a=1"]]
