"""nanogpt consolidate: what it says where there is nothing to consolidate (the rest: tests/test_fsdp.py,
which consolidates the shards of a real two-process --fsdp run and compares the result)."""

from __future__ import annotations

from nanogpt.consolidate import main


def test_a_folder_without_shards_is_explained(tiny_checkpoint, run_in_process):
    code, out, err = run_in_process(main, [f"--out_dir={tiny_checkpoint}"])
    message = " ".join(err.split())
    assert code == 2 and not out
    assert (
        f"no sharded checkpoint in {tiny_checkpoint}" in message and "only runs with --fsdp=True write one" in message
    )


def test_help_says_what_it_does(run_in_process):
    code, out, _ = run_in_process(main, ["--help"])
    assert (
        code == 0
        and "sharded checkpoints of an --fsdp run as single files" in " ".join(out.split())
        and "--out_dir" in out
    )
