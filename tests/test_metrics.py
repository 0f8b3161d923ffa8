"""metrics.jsonl: written by every training run, crash-safe, continued by resume, set aside by a new run."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import forkrun as fr
import pytest
import torch

from nanogpt.errors import UserError
from nanogpt.metrics import METRICS_NAME, MetricsWriter, read_metrics


def records_of(out_dir: Path) -> list[dict]:
    return read_metrics(out_dir / METRICS_NAME)


def iters(records: list[dict], kind: str) -> list[int]:
    return [r["iter"] for r in records if r["kind"] == kind]


def evaluations(records: list[dict]) -> list[int]:
    """The iterations evaluated, checking that each eval record is followed by its sample record (and only
    then), with non-empty text and the evaluation's val loss."""
    evals = [r for r in records if r["kind"] in ("eval", "sample")]
    assert [r["kind"] for r in evals] == ["eval", "sample"] * (len(evals) // 2)
    for e, s in zip(evals[::2], evals[1::2]):
        assert s["iter"] == e["iter"] and s["val_loss"] == e["val_loss"] and s["tokens"] == e["tokens"]
        assert isinstance(s["text"], str) and s["text"] and s["prompt"] == "\n"
    return [r["iter"] for r in evals[::2]]


def test_reader_skips_a_torn_last_line_and_garbage(tmp_path):
    path = tmp_path / METRICS_NAME
    good = [{"kind": "train", "iter": i, "train_loss": 1.0 / (i + 1)} for i in range(3)]
    lines = [json.dumps(good[0]), "not json", json.dumps(good[1]), "[1, 2]", json.dumps(good[2])]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "it', encoding="utf-8")  # killed mid-write
    assert read_metrics(path) == good


def test_writer_records_and_nan_as_null(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write("train", iter=0, tokens=10, train_loss=2.5, lr=1e-3, mfu=None)
    w.write("eval", iter=1, tokens=20, train_loss=float("nan"), val_loss=float("inf"), lr=1e-3, mfu=1.5)
    w.close()
    text = (tmp_path / METRICS_NAME).read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    r = read_metrics(tmp_path / METRICS_NAME)
    assert [x["kind"] for x in r] == ["train", "eval"]
    assert r[0]["train_loss"] == 2.5 and r[0]["tokens"] == 10 and r[0]["time"] >= 0
    assert r[1]["train_loss"] is None and r[1]["val_loss"] is None and r[1]["mfu"] == 1.5
    assert r[1]["time"] >= r[0]["time"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a disk that is always full)")
def test_a_full_disk_stops_the_log_with_one_warning_not_the_run(tmp_path, capsys):
    w = MetricsWriter(tmp_path)
    w.write("train", iter=0, tokens=10, train_loss=2.5, lr=1e-3, mfu=None)
    w._file = open("/dev/full", "ab", buffering=0)  # every write fails with ENOSPC, as on a full disk
    for i in (1, 2, 3):
        w.write("train", iter=i, tokens=10, train_loss=2.5, lr=1e-3, mfu=None)
    w.close()
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("warning:") == 1
    assert (
        f"could not append to {tmp_path / METRICS_NAME} (No space left on device)" in err
        and "from iteration 1 on" in err
    )
    assert [r["iter"] for r in read_metrics(tmp_path / METRICS_NAME)] == [0]


def test_a_new_run_sets_the_old_file_aside(tmp_path):
    for n in range(3):
        w = MetricsWriter(tmp_path)
        w.write("train", iter=0, run=n)
        w.close()
    assert read_metrics(tmp_path / METRICS_NAME)[0]["run"] == 2
    assert read_metrics(tmp_path / "metrics.1.jsonl")[0]["run"] == 0
    assert read_metrics(tmp_path / "metrics.2.jsonl")[0]["run"] == 1


@pytest.mark.parametrize("eval_done", [True, False])
def test_resume_drops_what_runs_again_and_goes_on_in_time(tmp_path, eval_done):
    w = MetricsWriter(tmp_path)
    for i in range(6):
        w.write("eval" if i % 3 == 0 else "train", iter=i)
        if i % 3 == 0:
            w.write("sample", iter=i, text="...")  # written by the evaluation, like its eval record
    w.close()
    (tmp_path / METRICS_NAME).open("ab").write(b'{"kind": "train", "iter": 6')  # a torn line
    last_time = read_metrics(tmp_path / METRICS_NAME)[2]["time"]
    w = MetricsWriter(tmp_path, resume_iter=3, eval_done=eval_done)
    w.write("train", iter=3)
    w.close()
    r = read_metrics(tmp_path / METRICS_NAME)
    assert iters(r, "train") == [1, 2, 3]
    assert iters(r, "eval") == ([0, 3] if eval_done else [0])
    assert iters(r, "sample") == iters(r, "eval")
    assert r[-1]["time"] >= last_time  # the clock goes on from the kept records
    assert (tmp_path / METRICS_NAME).read_bytes().endswith(b"\n")


def test_training_writes_every_logged_iteration_and_evaluation(tmp_path, prepare_char_dataset, tiny_model_args):
    from nanogpt.train import main as train_main

    data_dir = prepare_char_dataset()
    out = tmp_path / "out"
    args = [*tiny_model_args, f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=4", "--warmup_iters=0"]
    train_main([*args, "--max_iters=8", "--log_interval=2"])
    r = records_of(out)
    assert iters(r, "train") == [0, 2, 4, 6, 8]
    assert iters(r, "eval") == [0, 4, 8]
    tokens_per_iter = 4 * 32  # batch_size x block_size of the tiny model
    assert [x["tokens"] for x in r if x["kind"] == "train"] == [(i + 1) * tokens_per_iter for i in (0, 2, 4, 6, 8)]
    assert [x["tokens"] for x in r if x["kind"] == "eval"] == [i * tokens_per_iter for i in (0, 4, 8)]
    assert all(x["val_loss"] < 5 and x["train_loss"] < 5 and x["lr"] > 0 for x in r if x["kind"] == "eval")
    assert evaluations(r) == [0, 4, 8]  # each followed by its sample
    times = [x["time"] for x in r]
    assert times == sorted(times)
    # a resumed run (here: further, to iteration 12) continues the same file without duplicates
    train_main([*args, "--max_iters=12", "--log_interval=2", "--init_from=resume"])
    r = records_of(out)
    assert iters(r, "train") == [0, 2, 4, 6, 8, 10, 12] and evaluations(r) == [0, 4, 8, 12]
    # a new run in the same folder starts a new file and keeps the old one
    train_main([*args, "--max_iters=2", "--log_interval=2"])
    assert iters(records_of(out), "train") == [0, 2] and iters(records_of(out), "eval") == [0]
    assert iters(read_metrics(out / "metrics.1.jsonl"), "eval") == [0, 4, 8, 12]


def test_sigkill_then_resume_leaves_one_record_per_iteration(tmp_path, prepare_char_dataset):
    """A real SIGKILL in the middle of a run (of a million iterations, killed once metrics.jsonl holds its
    third evaluation): the file stays readable, and after resume (to 20 iterations past the last record)
    every iteration appears once, the evaluations included."""
    data_dir = prepare_char_dataset()
    args = [*fr.TINY, f"--data_dir={data_dir}", "--out_dir=out", "--eval_interval=10"]
    child = fr.start(fr.train_main(), [*args, "--max_iters=1000000"], tmp_path)
    path = tmp_path / "out" / METRICS_NAME
    try:
        deadline = time.monotonic() + 120  # a timeout on a loaded machine, not a speed requirement
        while not (path.exists() and len(iters(read_metrics(path), "eval")) >= 3):  # past two checkpoints
            assert child.poll() is None and time.monotonic() < deadline, child.err.read_text()
            time.sleep(0.01)
    finally:
        child.signal(signal.SIGKILL)
    assert child.wait().returncode == -signal.SIGKILL
    before = read_metrics(path)
    last = max(iters(before, "train"))
    assert last >= 19  # killed after the evaluation at iteration 20, or later
    end = (last // 10 + 2) * 10  # past every record and checkpoint of the killed run; the lr ignores max_iters
    result = fr.run(fr.train_main(), [*args, f"--max_iters={end}", "--init_from=resume"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    r = read_metrics(path)
    assert iters(r, "train") == list(range(end + 1))
    assert evaluations(r) == list(range(0, end + 1, 10))  # each evaluation's sample once, in order
    assert len(path.read_text().splitlines()) == len(r)  # no torn or duplicate line left behind
    # and the very samples of an uninterrupted run: the resumed model is the same, its generator seeded afresh
    straight = fr.run(fr.train_main(), [*args, "--out_dir=straight", f"--max_iters={end}"], tmp_path, timeout=120)
    assert straight.returncode == 0, straight.stderr
    texts = [(x["iter"], x["text"]) for x in r if x["kind"] == "sample"]
    assert texts == [(x["iter"], x["text"]) for x in records_of(tmp_path / "straight") if x["kind"] == "sample"]


# ----------------------------------------------------------------------------- samples: watch it learn


@pytest.mark.parametrize(
    "extra",
    [[], ["--activation_checkpointing=True"], ["--dtype=bfloat16"]],
    ids=["plain", "activation-checkpointing", "bfloat16-autocast"],  # the last: the samples under autocast, as on GPUs
)
def test_samples_do_not_change_the_training_losses(tmp_path, prepare_char_dataset, tiny_model_args, extra):
    """The same run with and without the samples (dropout and gradient accumulation on, so a draw from the
    global random state or a model left in eval mode would show): the same losses, bit for bit, and the
    same weights."""
    from nanogpt.checkpoint import load_checkpoint
    from nanogpt.train import main as train_main

    data_dir = prepare_char_dataset()
    args = [*tiny_model_args, f"--data_dir={data_dir}", "--dropout=0.1", "--gradient_accumulation_steps=2"]
    args += ["--max_iters=6", "--eval_interval=2", "--warmup_iters=0", *extra]
    runs = {}
    for tokens in (48, 0):
        out = tmp_path / f"out{tokens}"
        train_main([*args, f"--out_dir={out}", f"--eval_sample_tokens={tokens}"])
        runs[tokens] = (records_of(out), load_checkpoint(out / "ckpt.pt")["model"])

    def losses(records: list[dict]) -> list[tuple]:
        return [
            (r["kind"], r["iter"], *(r[k].hex() for k in ("train_loss", "val_loss") if k in r))
            for r in records
            if r["kind"] in ("train", "eval")
        ]

    (sampled, weights), (plain, plain_weights) = runs[48], runs[0]
    assert evaluations(sampled) == [0, 2, 4, 6] and iters(plain, "sample") == []
    assert losses(sampled) == losses(plain)
    assert len(losses(plain)) == 7 + 4
    assert all(torch.equal(weights[k], plain_weights[k]) for k in plain_weights)


def test_a_sample_leaves_the_model_and_the_random_state_as_they_were():
    """Seeded afresh: the same model writes the same text twice; the global random state is untouched, the
    model back in training mode. A vocabulary without a new line starts from token 0, and ids the tokenizer
    does not have (a padded vocabulary) are left out of the text."""
    from nanogpt.model import GPT, GPTConfig
    from nanogpt.report import EvalSample
    from nanogpt.tokenizer import CharTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    sample = EvalSample(40, seed=3, tokenizer=CharTokenizer(list("abc")))  # 13 ids have no character
    before = torch.get_rng_state()
    first = sample(model, contextlib.nullcontext())
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    assert first == sample(model, contextlib.nullcontext())
    assert first["prompt"] == "a" and first["text"] and set(first["text"]) <= set("abc")
    assert len(first["text"]) < 40  # some draws were padding ids: a random model spreads over all 16


def test_no_samples_when_turned_off_or_sharded():
    """--eval_sample_tokens=0 turns them off; under FSDP one rank holds a shard of each weight and cannot
    generate alone, so there are none (and no error)."""
    from nanogpt.distributed import Place
    from nanogpt.report import EvalSample, eval_sample_for
    from nanogpt.train_options import TrainOptions

    char = {"kind": "char", "chars": list("\nab")}
    assert isinstance(eval_sample_for(TrainOptions(), Place("cpu"), char), EvalSample)
    assert eval_sample_for(TrainOptions(eval_sample_tokens=0), Place("cpu"), char) is None
    assert eval_sample_for(TrainOptions(), Place("cpu", fsdp=True), char) is None
    with pytest.raises(UserError, match="--eval_sample_tokens must not be negative"):
        TrainOptions(eval_sample_tokens=-1)
