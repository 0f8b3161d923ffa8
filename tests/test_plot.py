"""nanogpt plot: loss curves of one or several runs from their metrics.jsonl, and loss.png during training."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from nanogpt.metrics import MetricsWriter
from nanogpt.plot import draw, main, plot_runs, read_runs

pytest.importorskip("matplotlib", reason="nanogpt plot needs matplotlib (the [plot] extra)")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def fake_run(out_dir: Path, scale: float) -> Path:
    out_dir.mkdir(parents=True)
    w = MetricsWriter(out_dir)
    for i in range(0, 101, 10):
        w.write("train", iter=i, tokens=100 * (i + 1), train_loss=scale * 3 / (1 + i / 50), lr=1e-3, mfu=None)
        if i % 50 == 0:
            w.write(
                "eval", iter=i, tokens=100 * i, train_loss=scale * 3 / (1 + i / 50), val_loss=scale * 3.1 / (1 + i / 50)
            )
    w.close()
    return out_dir


def test_draws_train_and_val_of_every_run(tmp_path):
    a, b = fake_run(tmp_path / "run-a", 1.0), fake_run(tmp_path / "run-b", 0.5)
    fig = draw(read_runs([a, b]), x="tokens")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"run-a train", "run-a val", "run-b train", "run-b val"}
    assert list(lines["run-a val"].get_xdata()) == [0, 5000, 10000]  # tokens, as asked
    assert list(lines["run-b train"].get_ydata())[0] == pytest.approx(1.5)
    assert lines["run-a train"].get_color() != lines["run-b train"].get_color()
    assert fig.axes[0].get_xlabel() == "training tokens"


def test_command_writes_a_png(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", 1.0), fake_run(tmp_path / "b", 0.7)
    main([str(a), str(b), f"--to={tmp_path / 'both.png'}", "--x=time", "--log"])  # a bare --log means True
    assert "wrote" in capsys.readouterr().out
    assert png_size(tmp_path / "both.png") == (800, 450)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "name at least one run folder"),
        (["{missing}"], "metrics.jsonl does not exist"),
        (["{run}", "--x=epochs"], "--x must be one of iter, time, tokens"),
        (["{run}", "--to={tmp}/no/such/dir/x.png"], "cannot write"),
    ],
)
def test_bad_input_says_what_to_do(tmp_path, argv, fragment):
    from nanogpt.errors import UserError

    run = fake_run(tmp_path / "run", 1.0)
    argv = [a.format(missing=tmp_path / "nope", run=run, tmp=tmp_path) for a in argv]
    with pytest.raises(UserError, match=fragment):
        main(argv)


def test_an_empty_file_is_not_a_plot(tmp_path):
    from nanogpt.errors import UserError

    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "it')  # killed before the first full line
    with pytest.raises(UserError, match="no complete record yet"):
        plot_runs([tmp_path], tmp_path / "x.png")


def test_samples_prints_the_timeline_instead_of_drawing(tmp_path, capsys):
    """--samples: per run, one line per evaluation (iteration, val loss, sample, new lines as ↵); a run
    without samples says so; no PNG is written."""
    a, b = fake_run(tmp_path / "a", 1.0), fake_run(tmp_path / "b", 1.0)
    w = MetricsWriter(a, resume_iter=101)  # continues a's file
    for i, text in ((0, "xq\nzk"), (50, "Th\nthe")):
        w.write("sample", iter=i, tokens=100 * i, val_loss=3.1 / (1 + i / 50), prompt="\n", text=text)
    w.close()
    main([str(a), str(b), "--samples", f"--to={tmp_path / 'x.png'}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{a}: 2 sample(s)"
    assert lines[1].split() == ["iter", "val", "loss", "sample"]
    assert lines[2].split() == ["0", "3.1000", "xq↵zk"]
    assert lines[3].split() == ["50", "1.5500", "Th↵the"]
    assert lines[4].startswith(f"{b}: no samples")
    assert not (tmp_path / "x.png").exists()


def test_training_refreshes_loss_png(tmp_path, prepare_char_dataset, tiny_model_args, capsys):
    from nanogpt.train import main as train_main

    data_dir = prepare_char_dataset()
    out = tmp_path / "out"
    args = [*tiny_model_args, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2"]
    train_main([*args, "--plot=True"])
    assert png_size(out / "loss.png") == (800, 450)
    capsys.readouterr()
    main([str(out), "--samples"])  # and the run's samples, one per evaluation
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == ["0", "2", "4"]
    assert not list(out.glob(".loss.png.*"))  # no temporary file left behind
    (out / "loss.png").unlink()
    train_main([*args, "--plot=False"])
    assert not (out / "loss.png").exists()


# Trains in a fresh interpreter (the tests' own process imports matplotlib above), then says whether the
# training process itself ever imported matplotlib.
TRAIN_THEN_LIST_MATPLOTLIB = """
import sys
from nanogpt.train import main
main(sys.argv[1:])
print("matplotlib modules:", sorted(m for m in sys.modules if m.split(".")[0] == "matplotlib"))
"""


def test_training_draws_loss_png_without_importing_matplotlib(
    tmp_path, run_script, prepare_char_dataset, tiny_model_args
):
    data_dir = prepare_char_dataset()
    out = tmp_path / "out"
    args = [*tiny_model_args, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2"]
    r = run_script("-c", TRAIN_THEN_LIST_MATPLOTLIB, *args, "--plot=True")
    assert r.returncode == 0, r.stderr
    assert "matplotlib modules: []" in r.stdout, r.stdout
    assert "could not draw" not in r.stderr
    assert png_size(out / "loss.png") == (800, 450)
    assert not list(out.glob(".loss.png.*"))


# Stands in for PlotRefresher's drawing child: logs each request, takes 0.3 s, answers FAKE_ANSWER, or
# prints "boom" to stderr and exits with status 1 when FAKE_ANSWER is "crash".
FAKE_CHILD = """
import os, sys, time
for line in sys.stdin:
    with open(os.path.join(os.environ["FAKE_DIR"], "log"), "a") as log:
        log.write("start\\n")
    time.sleep(0.3)
    if os.environ["FAKE_ANSWER"] == "crash":
        sys.exit("boom")
    print(os.environ["FAKE_ANSWER"], flush=True)
"""


def fake_child(tmp_path, monkeypatch, answer: str) -> Path:
    from nanogpt.plot import PlotRefresher

    monkeypatch.setattr(PlotRefresher, "CHILD_CODE", FAKE_CHILD)
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_ANSWER", answer)
    return tmp_path / "log"


def wait_for_line(log: Path) -> None:
    for _ in range(1000):
        if log.exists() and log.read_text():
            return
        time.sleep(0.01)
    raise AssertionError("the first drawing never started")


def test_requests_during_a_drawing_collapse_into_one_more(tmp_path, monkeypatch, capsys):
    from nanogpt.plot import PlotRefresher

    log = fake_child(tmp_path, monkeypatch, "drawn")
    p = PlotRefresher(tmp_path)
    p.request()
    wait_for_line(log)  # the first drawing is under way
    for _ in range(4):
        p.request()
    p.close()  # waits for the first drawing, then draws once for all the requests and the close
    assert log.read_text().split() == ["start", "start"]
    assert capsys.readouterr().err == ""
    assert p.child.returncode == 0  # the child ended with its input, and was reaped


@pytest.mark.parametrize(
    ("answer", "warning"),
    [("crash", "(boom)"), ("ValueError: bad data", "(ValueError: bad data)"), ("nothing to draw", None)],
    ids=["crash", "error", "nothing-yet"],
)
def test_a_failing_drawing_never_stops_training(tmp_path, monkeypatch, capsys, answer, warning):
    from nanogpt.plot import PlotRefresher

    log = fake_child(tmp_path, monkeypatch, answer)
    p = PlotRefresher(tmp_path)
    p.request()
    wait_for_line(log)
    p.close()
    err = capsys.readouterr().err
    if warning:  # a failure is reported once, and no drawing is tried again
        assert "could not draw" in err and f"{warning}; training goes on" in err
        assert log.read_text().split() == ["start"]
    else:  # nothing complete logged yet (a UserError in the child) is silent, and the close still draws
        assert err == ""
        assert log.read_text().split() == ["start", "start"]
    assert p.child.returncode is not None  # reaped
