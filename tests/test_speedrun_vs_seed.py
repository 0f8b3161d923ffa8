"""scripts/speedrun_vs_seed.py, the side-by-side run behind docs/recipe.md, end to end on tiny settings."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import speedrun_vs_seed  # noqa: E402


def test_both_commands_run_and_are_tabulated(prepare_char_dataset, capsys):
    data_dir = prepare_char_dataset()
    shrink = f"--data_dir={data_dir} --max_iters=4 --max_seconds=30 --eval_iters=2 --eval_interval=2 --n_layer=1"
    results = speedrun_vs_seed.main(["--rounds=1", f"--extra={shrink} --n_head=2 --n_embd=16 --block_size=16"])
    out = capsys.readouterr().out
    assert [(r["command"], r["seed"]) for r in results] == [("seed", 1), ("speedrun", 1)]
    for r in results:
        # train_seconds is the closing line's figure, to 0.1 s: five steps of this tiny model may print 0.0, so
        # the test checks that it was read and fits in the whole command, not how long the steps took
        assert r["iters"] == 5 and r["wall"] > r["train_seconds"] >= 0 and 2.0 < r["val"] < 5.0
        assert 2.0 < r["val_whole"] < 5.0  # the final checkpoint on the whole val split
        assert r["reached_1886"] is None  # 5 iterations of a tiny model are far from it
    assert "| seed |" in out and "| speedrun |" in out and "not reached (0 of 1)" in out
