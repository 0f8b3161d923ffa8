"""Time this repository against karpathy/nanoGPT: the same commands, on the same machine, with the same interpreter.

    python scripts/vs_nanogpt.py NANOGPT_DIR [--repeats=3] [--input=PATH] [--max_iters=2000] [--json=PATH]

NANOGPT_DIR is a checkout of https://github.com/karpathy/nanoGPT (MIT-licensed). It is never modified:
it is copied into a temporary folder first, because nanoGPT's scripts write next to themselves
(data/shakespeare_char/*.bin, out-shakespeare-char/). This repository's commands also run in a
temporary working folder (with PYTHONPATH set to this repository), so neither its data/ folder nor
its out-* folders are read or written.

Method. Once per tree, untimed: the tiny Shakespeare text (--input) is prepared into
data/shakespeare_char of that tree's working folder. Then, for --repeats rounds, alternating
nanoGPT, ours, nanoGPT, ours, ... so that slow drifts of the machine hit both alike, each tree runs

  1. the CPU training command of nanoGPT's README, with the same options for both:
       python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
         --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
         --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
     into a fresh out-shakespeare-char/ (ours also gets --data_dir, the folder nanoGPT hard-codes);
  2. python sample.py --out_dir=out-shakespeare-char --device=cpu --max_new_tokens=500
     on the checkpoint that round wrote (10 samples: nanoGPT draws them one after the other and
     recomputes the whole context for each token; ours draws them as one batch with a KV cache).

Each command is one child process (subprocess.Popen, reaped with os.wait4 for its own rusage).
Recorded: the whole process's wall time, its peak resident memory (ru_maxrss, KiB on Linux),
and for training the median ms/iter and the final val loss, parsed from the lines both print:
    iter N: loss X, time Yms, mfu Z%
    step N: train loss X, val loss Y
The median skips iterations below 10 (warm-up) and the iterations that ran an evaluation (their
time includes it); if that leaves nothing (very short runs), it uses every iteration after the
first that did not evaluate. nanoGPT's config evaluates every 250 iterations, and only there can
it save the checkpoint sample.py needs: when --max_iters is not a multiple of 250,
--eval_interval=<max_iters> is added to both training commands so that a checkpoint exists.

Printed: one line per run, then a table with, per metric and tree, the median and the spread
(min..max) over the rounds, and the ratio nanoGPT/ours of the medians. Every raw figure goes to
--json with the date, CPU model, torch version and threads, both commits and the exact commands.
The environment is passed through unchanged (OMP_NUM_THREADS and all): run it on a quiet machine.
--logs=DIR keeps every command's output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "shakespeare_char" / "input.txt"
NANOGPT_EVAL_INTERVAL = 250  # config/train_shakespeare_char.py
WARMUP_ITERS = 10
OUT_DIR = "out-shakespeare-char"
DATA = Path("data") / "shakespeare_char"
NANOGPT_FILES = ("train.py", "sample.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")

ITER_RE = re.compile(r"^iter (\d+): loss (\S+), time ([0-9.]+)ms, mfu (-?[0-9.]+)%$", re.MULTILINE)
STEP_RE = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)$", re.MULTILINE)

# metric key, label, unit shown, scale from the raw figure to that unit, decimals shown
METRICS = (
    ("train_wall_s", "train: wall time", "s", 1.0, 1),
    ("ms_per_iter", "train: median time/iter", "ms", 1.0, 2),
    ("final_val_loss", "train: final val loss", "", 1.0, 4),
    ("train_peak_rss_kib", "train: peak memory", "MiB", 1 / 1024, 1),
    ("sample_wall_s", "sample: wall time", "s", 1.0, 2),
    ("sample_peak_rss_kib", "sample: peak memory", "MiB", 1 / 1024, 1),
)


class MeasureError(Exception):
    """A command failed or printed nothing to measure."""


@dataclass
class Tree:
    """One side of the comparison: where its commands run and what they are."""

    name: str
    cwd: Path
    env: dict[str, str]
    prepare: list[str]
    train: list[str]
    sample: list[str]


# ----------------------------------------------------------------------------- parsing


def parse_iter_times(text: str) -> dict[int, float]:
    """{iteration: ms} from the `iter N: loss X, time Yms, mfu Z%` lines."""
    return {int(m[1]): float(m[3]) for m in ITER_RE.finditer(text)}


def parse_eval_steps(text: str) -> dict[int, float]:
    """{iteration: val loss} from the `step N: train loss X, val loss Y` lines."""
    return {int(m[1]): float(m[3]) for m in STEP_RE.finditer(text)}


def final_val_loss(text: str) -> float | None:
    """The val loss of the last `step N: ...` line, None if there is none."""
    matches = STEP_RE.findall(text)
    return float(matches[-1][2]) if matches else None


def median_ms_per_iter(text: str, warmup: int = WARMUP_ITERS) -> tuple[float | None, int]:
    """(median ms/iter, iterations used): iterations >= warmup that did not evaluate, else all but the first."""
    times = parse_iter_times(text)
    evals = parse_eval_steps(text)
    steady = [ms for it, ms in times.items() if it >= warmup and it not in evals]
    if not steady:
        steady = [ms for it, ms in times.items() if it >= 1 and it not in evals]
    return (statistics.median(steady) if steady else None), len(steady)


# ----------------------------------------------------------------------------- running


def run_timed(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run one child process, output to `log`; its wall time, own peak RSS (KiB) and exit code."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, unlike getrusage(RUSAGE_CHILDREN)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it
    return {"wall_s": wall, "peak_rss_kib": usage.ru_maxrss, "returncode": proc.returncode}


def check_ok(result: dict, tree: Tree, what: str, log: Path) -> str:
    """The command's output; MeasureError with its last lines if it failed."""
    text = log.read_text(errors="replace")
    if result["returncode"] != 0:
        raise MeasureError(f"{tree.name} {what} exited with {result['returncode']} (cwd {tree.cwd}):\n{tail(text)}")
    return text


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def git_commit(path: Path) -> tuple[str, bool | None]:
    """(HEAD, has uncommitted changes) of the git checkout at `path`; ('unknown (not a git checkout)', None) else."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)

    try:
        top, head, status = git("rev-parse", "--show-toplevel"), git("rev-parse", "HEAD"), git("status", "--porcelain")
    except OSError:  # no git
        return "unknown (not a git checkout)", None
    # not a checkout, or only a folder inside another repository
    if top.returncode or head.returncode or Path(top.stdout.strip()).resolve() != path.resolve():
        return "unknown (not a git checkout)", None
    return head.stdout.strip(), bool(status.stdout.strip())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else lscpu, else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def torch_info(env: dict[str, str]) -> dict:
    """torch's version and CPU threads as the children see them (same interpreter, same environment)."""
    code = "import json, torch; print(json.dumps([torch.__version__, torch.get_num_threads()]))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    version, threads = json.loads(out)
    return {"torch": version, "torch_num_threads": threads}


def copy_nanogpt(src: Path, dest: Path) -> None:
    """Copy the checkout (without .git and old outputs) and make the copy writable: the source may be read-only."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", "out*", "__pycache__", "*.bin", "meta.pkl"))
    for root, dirs, files in os.walk(dest):
        for name in [*dirs, *files]:
            p = os.path.join(root, name)
            os.chmod(p, os.stat(p).st_mode | 0o200)
    os.chmod(dest, os.stat(dest).st_mode | 0o200)


def train_options(max_iters: int) -> list[str]:
    """The seed CPU training command's options (nanoGPT's README), identical for both trees."""
    opts = [
        "--device=cpu",
        "--compile=False",
        "--eval_iters=20",
        "--log_interval=1",
        "--block_size=64",
        "--batch_size=12",
        "--n_layer=4",
        "--n_head=4",
        "--n_embd=128",
        f"--max_iters={max_iters}",
        f"--lr_decay_iters={max_iters}",
        "--dropout=0.0",
    ]
    if max_iters % NANOGPT_EVAL_INTERVAL:  # else the last evaluation, and maybe the only checkpoint, is missing
        opts.append(f"--eval_interval={max_iters}")
    return opts


def make_trees(nanogpt_copy: Path, ours_dir: Path, input_path: Path, max_iters: int, sample_tokens: int) -> list[Tree]:
    """nanoGPT's tree (its copy) and ours (a working folder; the code stays in REPO)."""
    py = sys.executable
    opts = train_options(max_iters)
    sample_opts = [f"--out_dir={OUT_DIR}", "--device=cpu", f"--max_new_tokens={sample_tokens}"]
    ours_env = dict(os.environ)
    ours_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ours_data = f"--data_dir={ours_dir / DATA}"
    nanogpt = Tree(
        name="nanoGPT",
        cwd=nanogpt_copy,
        env=dict(os.environ),
        prepare=[py, str(DATA / "prepare.py")],  # reads the input.txt put beside it, downloads nothing
        train=[py, "train.py", "config/train_shakespeare_char.py", *opts],
        sample=[py, "sample.py", *sample_opts],
    )
    ours = Tree(
        name="ours",
        cwd=ours_dir,
        env=ours_env,
        prepare=[py, str(REPO / DATA / "prepare.py"), f"--input={input_path}", ours_data],
        train=[py, str(REPO / "train.py"), str(REPO / "config" / "train_shakespeare_char.py"), *opts, ours_data],
        sample=[py, str(REPO / "sample.py"), *sample_opts],
    )
    return [nanogpt, ours]


def prepare(tree: Tree, input_path: Path, logs: Path) -> None:
    """Untimed: tokenize the text into <cwd>/data/shakespeare_char."""
    (tree.cwd / DATA).mkdir(parents=True, exist_ok=True)
    if tree.name == "nanoGPT":
        shutil.copyfile(input_path, tree.cwd / DATA / "input.txt")
    log = logs / f"{tree.name}-prepare.log"
    check_ok(run_timed(tree.prepare, tree.cwd, tree.env, log), tree, "prepare", log)


def one_round(tree: Tree, round_no: int, logs: Path) -> dict:
    """Train into a fresh out dir, then sample from its checkpoint; the raw figures of both."""
    shutil.rmtree(tree.cwd / OUT_DIR, ignore_errors=True)
    log = logs / f"{tree.name}-train-{round_no}.log"
    train = run_timed(tree.train, tree.cwd, tree.env, log)
    text = check_ok(train, tree, "training", log)
    ms, n_iters = median_ms_per_iter(text)
    val = final_val_loss(text)
    if ms is None or val is None:
        raise MeasureError(f"{tree.name} training printed no iter/step lines to measure:\n{tail(text)}")
    log = logs / f"{tree.name}-sample-{round_no}.log"
    sample = run_timed(tree.sample, tree.cwd, tree.env, log)
    check_ok(sample, tree, "sampling", log)
    return {
        "round": round_no,
        "tree": tree.name,
        "train_wall_s": train["wall_s"],
        "ms_per_iter": ms,
        "ms_per_iter_n": n_iters,
        "final_val_loss": val,
        "final_step": max(parse_eval_steps(text)),
        "iter_ms": list(parse_iter_times(text).values()),  # iterations 0, 1, ... (log_interval=1)
        "val_loss_by_step": sorted(parse_eval_steps(text).items()),
        "train_peak_rss_kib": train["peak_rss_kib"],
        "sample_wall_s": sample["wall_s"],
        "sample_peak_rss_kib": sample["peak_rss_kib"],
    }


# ----------------------------------------------------------------------------- reporting


def summarize(runs: list[dict], trees: list[str]) -> dict:
    """Per metric and tree: median, min, max over rounds; and nanoGPT/ours of the medians."""
    summary = {}
    for key, *_ in METRICS:
        row = {}
        for tree in trees:
            values = [r[key] for r in runs if r["tree"] == tree]
            row[tree] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        ours = row["ours"]["median"]
        row["ratio_nanogpt_over_ours"] = row["nanoGPT"]["median"] / ours if ours else None
        summary[key] = row
    return summary


def format_table(summary: dict, repeats: int) -> str:
    """The summary as a plain-text table."""
    lines = [
        f"{'metric (median [min..max] of ' + str(repeats) + ')':<34}{'nanoGPT':>28}{'ours':>28}{'nanoGPT/ours':>14}"
    ]
    for key, label, unit, scale, digits in METRICS:
        row = summary[key]
        cells = []
        for tree in ("nanoGPT", "ours"):
            s = row[tree]
            cells.append(
                f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}..{s['max'] * scale:.{digits}f}]"
            )
        ratio = row["ratio_nanogpt_over_ours"]
        name = f"{label} ({unit})" if unit else label
        lines.append(f"{name:<34}{cells[0]:>28}{cells[1]:>28}{'-' if ratio is None else f'{ratio:.3f}':>14}")
    return "\n".join(lines)


def describe(run: dict) -> str:
    """One line per round and tree, printed as it finishes."""
    return (
        f"round {run['round']} {run['tree']:>7}: train {run['train_wall_s']:.1f} s, {run['ms_per_iter']:.2f} ms/iter, "
        f"val loss {run['final_val_loss']:.4f} (step {run['final_step']}), {run['train_peak_rss_kib'] / 1024:.0f} MiB; "
        f"sample {run['sample_wall_s']:.1f} s, {run['sample_peak_rss_kib'] / 1024:.0f} MiB"
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("nanogpt_dir", type=Path, help="a checkout of karpathy/nanoGPT (read only; it is copied)")
    p.add_argument("--repeats", type=int, default=3, help="rounds, each running both trees (default 3)")
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT, help=f"tiny Shakespeare text (default {DEFAULT_INPUT})")
    p.add_argument("--max_iters", type=int, default=2000, help="training iterations, also lr_decay_iters (2000)")
    p.add_argument("--sample_tokens", type=int, default=500, help="sample.py --max_new_tokens (default 500)")
    p.add_argument("--json", type=Path, default=Path("vs_nanogpt.json"), help="raw figures (default ./vs_nanogpt.json)")
    p.add_argument("--logs", type=Path, default=None, help="also keep every command's output in this folder")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.max_iters < 2 or args.sample_tokens < 1:
        p.error("--repeats and --sample_tokens must be at least 1, --max_iters at least 2")
    missing = [f for f in NANOGPT_FILES if not (args.nanogpt_dir / f).is_file()]
    if missing:
        p.error(f"{args.nanogpt_dir} is not a nanoGPT checkout: no {', '.join(missing)}")
    if not args.json.resolve().parent.is_dir():
        p.error(f"--json={args.json}: its folder does not exist")
    if not args.input.is_file():
        p.error(f"--input={args.input} does not exist (tiny Shakespeare's input.txt; nothing is downloaded)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nanogpt_dir, input_path = args.nanogpt_dir.resolve(), args.input.resolve()
    nanogpt_commit, nanogpt_dirty = git_commit(nanogpt_dir)
    repo_commit, repo_dirty = git_commit(REPO)
    with tempfile.TemporaryDirectory(prefix="vs_nanogpt-") as tmp:
        tmp = Path(tmp)
        logs = tmp / "logs"
        logs.mkdir()
        copy_nanogpt(nanogpt_dir, tmp / "nanoGPT")
        (tmp / "ours").mkdir()
        trees = make_trees(tmp / "nanoGPT", tmp / "ours", input_path, args.max_iters, args.sample_tokens)
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            **torch_info(trees[0].env),
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "nanogpt_dir": str(nanogpt_dir),
            "nanogpt_commit": nanogpt_commit,
            "nanogpt_dirty": nanogpt_dirty,
            "repo": str(REPO),
            "repo_commit": repo_commit,
            "repo_dirty": repo_dirty,
            "input": str(input_path),
            "repeats": args.repeats,
            "max_iters": args.max_iters,
            "sample_tokens": args.sample_tokens,
            "ms_per_iter_rule": f"median over iterations >= {WARMUP_ITERS} without evaluation; "
            "if none, over iterations >= 1 without evaluation",
            "commands": {
                t.name: {
                    "cwd": str(t.cwd),
                    "env": {"PYTHONPATH": t.env.get("PYTHONPATH")},
                    "prepare": t.prepare,
                    "train": t.train,
                    "sample": t.sample,
                }
                for t in trees
            },
        }
        print(f"{record['cpu']}, torch {record['torch']} with {record['torch_num_threads']} threads", flush=True)
        try:
            for tree in trees:
                prepare(tree, input_path, logs)
            runs = []
            for round_no in range(1, args.repeats + 1):
                for tree in trees:
                    runs.append(one_round(tree, round_no, logs))
                    print(describe(runs[-1]), flush=True)
        except MeasureError as e:
            print(f"vs_nanogpt: {e}", file=sys.stderr)
            return 1
        finally:
            if args.logs is not None:
                shutil.copytree(logs, args.logs, dirs_exist_ok=True)
    record["runs"] = runs
    record["summary"] = summarize(runs, [t.name for t in trees])
    print()
    print(format_table(record["summary"], args.repeats))
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nraw figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
