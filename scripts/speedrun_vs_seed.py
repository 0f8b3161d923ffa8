"""The CPU speedrun config against the seed CPU command, side by side: whole commands, several seeds.

    python scripts/speedrun_vs_seed.py [--rounds=3] [--json=speedrun_vs_seed.json]

Round r runs, one after the other, the README's seed CPU command (`config/train_shakespeare_char.py` with
the laptop options, 2000 iterations) and `config/speedrun_shakespeare_char_cpu.py`, both with --seed=r, so
slow spells of the machine spread over both. Each command is timed whole, from the shell's point of view
(interpreter start to exit). From each run's closing line come its final val loss and iterations, and
when it first reached val <= 1.886 (nanoGPT's figure for the seed command): the script turns that into
seconds since the command started. The final val loss a run prints is estimated on a few batches (the
configs' eval_iters): 20 batches vary by about 0.03 with the seed that picks them. So each final
checkpoint is also evaluated on the whole val split (`nanogpt eval`: consecutive windows of the model's
block_size), the figure to compare. Printed: every run, then medians with their range. Tiny Shakespeare
must be prepared in data/shakespeare_char.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = (
    "config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 "
    "--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0"
).split()
SPEEDRUN = ["config/speedrun_shakespeare_char_cpu.py"]
MILESTONE = 1.886
DONE = re.compile(r"^done: final val loss ([\d.]+); ([\d,]+) iterations.*?; ([\d.]+) s of training; ([\d.]+) s wall")
FULL_VAL = re.compile(r"^loss: ([\d.]+) nats per token", re.M)
REACHED = re.compile(rf"val <= {MILESTONE} first at iteration (\d+): ([\d.]+) s of training, ([\d.]+) s wall")
# Each command ends in minutes on a laptop CPU (the seed command's 2000 iterations are the longest); a run
# that hangs is killed after this many seconds and the script stops with what it printed.
TIMEOUT = 3600


def run_command(what: str, cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise SystemExit(f"{what} ran longer than {TIMEOUT} s and was killed:\n{out[-2000:]}\n{err[-2000:]}") from None


def run(name: str, args: list[str], seed: int, out_root: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "train.py", *args, f"--seed={seed}", f"--out_dir={out_root / f'{name}-{seed}'}"]
    cmd += ["--progress=False", f"--milestones={MILESTONE}", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.time()
    proc = run_command(f"{name} seed {seed}", cmd, env)
    wall = time.time() - t0
    done = next((m for line in proc.stdout.splitlines() if (m := DONE.match(line))), None)
    if proc.returncode != 0 or done is None:
        raise SystemExit(
            f"{name} seed {seed} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    reached = REACHED.search(done.string)
    startup = wall - float(done[4])  # interpreter start and imports, before main() began counting
    out_dir = out_root / f"{name}-{seed}"
    ev = run_command(
        f"evaluating {out_dir}", [sys.executable, "-m", "nanogpt", "eval", f"--out_dir={out_dir}", "--device=cpu"], env
    )
    whole_val = FULL_VAL.search(ev.stdout)
    if ev.returncode != 0 or whole_val is None:
        raise SystemExit(f"evaluating {out_dir} failed ({ev.returncode}):\n{ev.stdout[-2000:]}\n{ev.stderr[-2000:]}")
    return {
        "command": name,
        "seed": seed,
        "wall": wall,
        "val": float(done[1]),
        "val_whole": float(whole_val[1]),
        "iters": int(done[2].replace(",", "")),
        "train_seconds": float(done[3]),
        "reached_1886": float(reached[3]) + startup if reached else None,
    }


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "not reached"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="seeds 1..rounds of both commands (default 3)")
    p.add_argument("--json", default="", help="also write the raw results here")
    p.add_argument("--extra", default="", help="options added to both commands (tests shorten the runs with it)")
    a = p.parse_args(argv)
    extra = a.extra.split()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, a.rounds + 1):
            for name, args in (("seed", SEED), ("speedrun", SPEEDRUN)):
                r = run(name, args, seed, Path(tmp), extra)
                results.append(r)
                reached = f"{r['reached_1886']:.1f} s" if r["reached_1886"] else "not reached"
                print(
                    f"{name:<8} seed {seed}: {r['wall']:.1f} s whole, val {r['val']:.4f} (whole split "
                    f"{r['val_whole']:.4f}), {r['iters']} iterations, "
                    f"val <= {MILESTONE} at {reached}",
                    flush=True,
                )
    print()
    print(
        f"| command | whole command (s) | final val loss, printed | val loss, whole split | iterations "
        f"| val <= {MILESTONE} after (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name in ("seed", "speedrun"):
        rs = [r for r in results if r["command"] == name]
        reached = [r["reached_1886"] for r in rs if r["reached_1886"] is not None]
        print(
            f"| {name} | {spread([r['wall'] for r in rs])} | {spread([r['val'] for r in rs], '{:.4f}')} | "
            f"{spread([r['val_whole'] for r in rs], '{:.4f}')} | "
            f"{spread([r['iters'] for r in rs], '{:.0f}')} | {spread(reached)} ({len(reached)} of {len(rs)}) |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
