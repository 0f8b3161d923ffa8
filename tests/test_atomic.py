"""nanogpt.atomic: a file is replaced whole or not at all."""

from __future__ import annotations

import os

import pytest

from nanogpt.atomic import atomic_open, atomic_write_bytes


def test_write_and_replace(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt(), ValueError("bug")])
def test_an_error_inside_the_block_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_open(path) as f:
            f.write(b"new, half written")
            raise error
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_no_file_appears_when_the_first_write_fails(tmp_path):
    with pytest.raises(OSError):
        with atomic_open(tmp_path / "new.bin") as f:
            f.write(b"x")
            raise OSError("disk full")
    assert os.listdir(tmp_path) == []


def test_the_target_is_untouched_until_the_block_ends(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with atomic_open(path) as f:
        f.write(b"new")
        f.flush()
        assert path.read_bytes() == b"old"  # readers see the old file while the new one is written
    assert path.read_bytes() == b"new"


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
