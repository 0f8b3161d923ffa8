"""The speedrun ablation behind docs/recipe.md: each technique added alone to the seed CPU configuration,
all at the same training-time budget, several seeds, on one machine in one run.

    python scripts/recipe_ablation.py --seconds=40 --seeds=3 [--only=baseline,muon] [--json=ablation.json]

Every run is `python train.py config/train_shakespeare_char.py` with the seed CPU command's options, a
time budget (--max_seconds, evaluations excluded) instead of 2000 iterations, the cosine schedule placed
by time (so each run ends cooled down), and one evaluation at the end on 100 batches. Runs are
interleaved (seed 1 of every variant, then seed 2, ...) so that slow spells of the machine spread over all
variants. It prints, per variant, the final val loss (median, min..max over seeds), its difference from the
baseline's median, and the iterations reached. Tiny Shakespeare must be prepared in data/shakespeare_char.
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
SEED_COMMAND = (
    "config/train_shakespeare_char.py --device=cpu --compile=False --block_size=64 --batch_size=12 "
    "--n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0"
).split()
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "wsd": ["--lr_schedule=wsd"],
    "muon": ["--optimizer=muon"],
    "rope": ["--pos_emb=rope"],
    "rmsnorm": ["--norm=rmsnorm"],
    "qk_norm": ["--qk_norm=True"],
    "relu2": ["--activation=relu2"],
    "untied": ["--tie_weights=False"],
    "zero_init_proj": ["--zero_init_proj=True"],
    "logit_softcap": ["--logit_softcap=15"],
    "token_shift": ["--token_shift=True"],
    "batch32": ["--batch_size=32"],
    # what helped in the first ablation, together; the speedrun configs (config/speedrun_shakespeare_char*.py)
    # add the token shift, found later, and the CPU one longer contexts and Muon x0.5 (docs/recipe.md)
    "recipe": ["--pos_emb=rope", "--qk_norm=True", "--activation=relu2", "--lr_schedule=wsd", "--optimizer=muon"],
}
DONE = re.compile(r"^done: final val loss ([\d.]+); ([\d,]+) iterations")


def run(variant: str, seed: int, seconds: float, out_root: Path) -> dict:
    cmd = [
        sys.executable, "train.py", *SEED_COMMAND, *VARIANTS[variant],
        f"--max_seconds={seconds}", "--max_iters=1000000", "--lr_decay_iters=1000000", "--eval_interval=1000000",
        "--eval_iters=100", "--log_interval=1000000", f"--seed={seed}", f"--out_dir={out_root / f'{variant}-{seed}'}",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    m = next((DONE.match(line) for line in proc.stdout.splitlines() if DONE.match(line)), None)
    if proc.returncode != 0 or m is None:
        raise SystemExit(
            f"{variant} seed {seed} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return {"variant": variant, "seed": seed, "val": float(m[1]), "iters": int(m[2].replace(",", "")), "wall": wall}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=40.0, help="training-time budget of every run (default 40)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    p.add_argument("--only", default="", help="comma-separated variants (default: all, baseline first)")
    p.add_argument("--json", default="ablation.json", help="raw results")
    a = p.parse_args(argv)
    names = [v for v in (a.only.split(",") if a.only else VARIANTS) if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose among {', '.join(VARIANTS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, a.seeds + 1):
            for name in names:
                r = run(name, seed, a.seconds, Path(tmp))
                print(f"{name:>15} seed {seed}: val {r['val']:.4f} after {r['iters']} iterations ({r['wall']:.0f} s)")
                results.append(r)
    Path(a.json).write_text(json.dumps({"seconds": a.seconds, "results": results}, indent=1))
    base = statistics.median(r["val"] for r in results if r["variant"] == names[0])
    print(f"\n{'variant':>15} | val loss, median [min..max] | vs {names[0]} | iterations (median)")
    for name in names:
        vals = [r["val"] for r in results if r["variant"] == name]
        iters = statistics.median(r["iters"] for r in results if r["variant"] == name)
        med = statistics.median(vals)
        print(f"{name:>15} | {med:.4f} [{min(vals):.4f}..{max(vals):.4f}] | {med - base:+.4f} | {iters:.0f}")


if __name__ == "__main__":
    main()
