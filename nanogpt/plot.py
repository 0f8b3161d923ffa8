"""Loss curves from the metrics.jsonl of one or several runs, overlaid, as a PNG.

    nanogpt plot out-shakespeare-char [more out_dirs...] [--to=loss.png] [--x=iter|time|tokens] [--log]

Solid lines are the train loss logged every log_interval iterations (one micro-batch each, so noisy),
dots joined by dashes the val loss at each evaluation, one colour per run, labelled by its folder.
matplotlib draws them with its headless Agg backend: pip install 'nanogpt[plot]'. A training run also
refreshes <out_dir>/loss.png at each evaluation when matplotlib is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nanogpt.atomic import atomic_open
from nanogpt.config import option, parse_args
from nanogpt.errors import UserError, run_main
from nanogpt.metrics import METRICS_NAME, read_metrics

X_AXES = {"iter": "iteration", "time": "wall time (s)", "tokens": "training tokens"}


@dataclass
class PlotOptions:
    to: str = option("loss.png", "the PNG to write")
    x: str = option("iter", "the horizontal axis: iter, time (wall seconds since the run began) or tokens")
    log: bool = option(False, "a logarithmic loss axis (--log)")

    def __post_init__(self) -> None:
        if self.x not in X_AXES:
            raise UserError(f"--x must be one of {', '.join(X_AXES)}, got {self.x!r}.")


def new_figure():
    """A matplotlib Figure drawn by the Agg backend: no display, no pyplot global state (so a background
    thread may draw), or a UserError saying how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib (or 'nanogpt[plot]').") from None
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def read_runs(out_dirs: Sequence[str | Path]) -> list[tuple[Path, list[dict]]]:
    """Each run folder with its metrics records; a UserError for a folder without any."""
    runs = []
    for d in out_dirs:
        path = Path(d) / METRICS_NAME
        if not path.is_file():
            raise UserError(
                f"{path} does not exist: {d} is not the out_dir of a training run, or the run predates "
                "metrics.jsonl. Give the --out_dir of a run (train.py writes metrics.jsonl as it goes)."
            )
        records = read_metrics(path)
        if not records:
            raise UserError(f"{path} holds no complete record yet; wait for the run's first logged iteration.")
        runs.append((Path(d), records))
    return runs


def draw(runs: list[tuple[Path, list[dict]]], x: str = "iter", log: bool = False):
    """The figure: per run, its train loss (thin, translucent) and val loss (dots and dashes), one colour each."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (d, records) in enumerate(runs):
        color = f"C{i % 10}"
        label = d.resolve().name
        train = [(r[x], r["train_loss"]) for r in records if r["kind"] == "train" and r.get("train_loss") is not None]
        val = [(r[x], r["val_loss"]) for r in records if r["kind"] == "eval" and r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.45, linewidth=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", markersize=3, linestyle="--", label=f"{label} val")
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("loss (nats per token)")
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_runs(out_dirs: Sequence[str | Path], to: str | Path, x: str = "iter", log: bool = False) -> Path:
    """Draw the curves of every run in `out_dirs` into the PNG `to`, replaced atomically (a page or viewer
    reading it never sees half a file)."""
    fig = draw(read_runs(out_dirs), x, log)
    to = Path(to)
    try:
        with atomic_open(to) as f:
            fig.savefig(f, format="png")
    except OSError as e:
        raise UserError(f"cannot write {to} ({e.strerror}). Choose a --to in a folder you can write to.") from None
    return to


class PlotRefresher:
    """Redraws <out_dir>/loss.png whenever asked, in a child process (`python -m nanogpt.plot`), so that the
    training process never imports matplotlib: importing it takes a second or more and stays resident (some
    35 MiB of a small CPU run's peak memory). One child at a time: requests that arrive while one draws collapse
    into one more drawing, started when it ends; close() draws a last time and waits for it (each child gets
    DRAW_TIMEOUT_S, then is killed). A background thread only starts the children and waits for them."""

    DRAW_TIMEOUT_S = 60.0  # a drawing takes about a second; the first one may also build matplotlib's font cache

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.wanted = threading.Event()
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="nanogpt-plot", daemon=True)
        self.thread.start()

    def request(self) -> None:
        self.wanted.set()

    def close(self) -> None:
        self.closing = True
        self.wanted.set()
        self.thread.join()  # bounded: at most the drawing under way and the last one, each killed at the timeout

    def _run(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            closing = self.closing  # read before drawing: a close() during the drawing gets one more
            problem = self._draw()
            if problem:  # a plot is a convenience: never stop training for it, and stop trying
                print(
                    f"warning: could not draw {self.out_dir / 'loss.png'} ({problem}); training goes on.",
                    file=sys.stderr,
                )
                return
            if closing:
                return

    def _draw(self) -> str | None:
        """Run one drawing child to its end; why it failed, or None when it drew or had nothing to draw yet."""
        out_dir = self.out_dir.resolve()  # the child's argument never looks like a flag; the label is the same
        argv = [sys.executable, "-m", "nanogpt.plot", str(out_dir), f"--to={out_dir / 'loss.png'}"]
        env = dict(os.environ)
        # the child imports this very package, even from a checkout that is not installed (python train.py)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(Path(__file__).parents[1])]))
        with tempfile.TemporaryFile() as err:  # a file, not a pipe: a long traceback can never block the child
            try:
                # its own session: the terminal's Ctrl-C goes to training, whose close() then waits for the child
                child = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                    start_new_session=True,
                )
            except OSError as e:
                return str(e)
            try:
                code = child.wait(self.DRAW_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()  # reaped: no zombie left behind
                return f"the drawing took over {self.DRAW_TIMEOUT_S:.0f} s"
            if code in (0, 2):  # 2: a UserError, such as no complete record logged yet
                return None
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
            return lines[-1] if lines else f"exit status {code}"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dirs = [a for a in argv if not a.startswith("-")]
    flags = [a for a in argv if a.startswith("-")]
    o, _ = parse_args(PlotOptions, flags, "nanogpt plot", __doc__ or "", positional="OUT_DIR [OUT_DIR ...]")
    if not out_dirs:
        raise UserError("name at least one run folder: nanogpt plot OUT_DIR [OUT_DIR...] [--to=loss.png].")
    print(f"wrote {plot_runs(out_dirs, o.to, o.x, o.log)}")


if __name__ == "__main__":
    run_main(main)
