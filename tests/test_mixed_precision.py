"""Mixed precision on every path that runs under torch.autocast on a GPU, run here under CPU autocast.

On CUDA `--dtype=auto` is bfloat16 (float16 with a GradScaler on pre-Ampere GPUs), so there training,
evaluation, resume, sampling (cached and uncached, streamed and batched), bench, GPT-2 loading and
export all run under autocast. CI has no GPU; CPU autocast goes through the same code (the same casts,
KV-cache dtypes and GradScaler calls) with tiny shapes. `.ci/gpu` runs this file on a GPU machine,
where DEVICES gains "cuda".

Greedy decoding is compared between paths on a model trained to continue a repeating text: its
predictions are so sure that 16-bit rounding cannot flip an argmax, so any difference is a bug.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch._dynamo

from nanogpt.checkpoint import load_checkpoint, model_from_checkpoint
from nanogpt.device import autocast
from nanogpt.model import GPT, GPTConfig, KVCache, activation_dtype
from nanogpt.prepare import main as prepare_main
from nanogpt.sample import SEPARATOR
from nanogpt.sample import main as sample_main
from nanogpt.train import main as train_main

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF = ["bfloat16", "float16"]
UNIT = "first citizen: we are accounted poor citizens.\n"  # 48 characters, longer than the context
MODEL = ("--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--bias=False", "--dropout=0.0")
STEP = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)$", re.M)


def train_args(data_dir: Path, out_dir: Path, device: str, *extra: str) -> list[str]:
    return [
        *MODEL,
        f"--device={device}",
        "--compile=False",
        "--batch_size=8",
        "--gradient_accumulation_steps=2",
        "--eval_iters=2",
        "--log_interval=1",
        "--warmup_iters=0",
        "--learning_rate=1e-2",
        "--lr_decay_iters=200",
        "--plot=False",
        f"--data_dir={data_dir}",
        f"--out_dir={out_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def pattern_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pattern")
    (root / "input.txt").write_text(UNIT * 300, encoding="utf-8")
    prepare_main(["--tokenizer=char", f"--input={root / 'input.txt'}", f"--data_dir={root / 'data'}"])
    return root / "data"


@pytest.fixture(scope="module")
def sure_model(pattern_data, tmp_path_factory) -> Path:
    """out_dir of a float32 model trained until it continues UNIT with near certainty."""
    out_dir = tmp_path_factory.mktemp("sure") / "out"
    train_main(train_args(pattern_data, out_dir, "cpu", "--max_iters=150", "--eval_interval=150"))
    return out_dir


@contextlib.contextmanager
def linear_output_dtypes():
    """The set of (phase, dtype) of every nn.Linear output computed inside the block: phase "train" for a
    forward with gradients (a training micro-step), "eval" without (an evaluation or a sample). Under
    autocast every matmul gives 16-bit outputs; an ignored --dtype would show float32 here."""
    seen: set[tuple[str, torch.dtype]] = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear):
            seen.add(("train" if torch.is_grad_enabled() else "eval", output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def samples(out: str) -> list[str]:
    chunks = out.split(f"\n{SEPARATOR}\n")
    assert chunks[-1] == "", out
    return chunks[:-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_activation_dtype_follows_autocast(device, dtype):
    weight = torch.zeros(2, 2, device=device)
    assert activation_dtype(weight) == torch.float32
    with autocast(device, dtype):
        assert activation_dtype(weight) == getattr(torch, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_cached_logits_equal_recomputation_under_autocast(sure_model, device, dtype):
    """Teacher-forced logits through the KV cache, in chunks, equal a full forward pass, both in 16 bits."""
    model = model_from_checkpoint(load_checkpoint(sure_model / "ckpt.pt")).to(device).eval()
    idx = torch.randint(model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), autocast(device, dtype):
        full, _ = model(idx, targets=torch.zeros_like(idx))
        cache = KVCache(model.config, 2, idx.device, activation_dtype(model.lm_head.weight))
        assert cache.k.dtype == getattr(torch, dtype)
        chunks = []
        for lo, hi in ((0, 7), (7, 8), (8, 20)):
            logits, _ = model(idx[:, lo:hi], targets=torch.zeros_like(idx[:, lo:hi]), cache=cache)
            chunks.append(logits)
    cached = torch.cat(chunks, dim=1).float()
    # the two paths multiply the same 16-bit numbers in different groupings: equal up to a few roundings
    tolerance = 4 * torch.finfo(getattr(torch, dtype)).eps * full.float().abs().max().item()
    assert (cached - full.float()).abs().max().item() <= tolerance


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("num_samples", [1, 3], ids=["streamed", "batched"])
def test_sample_command_greedy_output_is_the_same_with_and_without_cache(
    sure_model, run_in_process, device, dtype, num_samples
):
    def run(*extra: str) -> str:
        argv = [f"--out_dir={sure_model}", f"--device={device}", "--start=first", "--max_new_tokens=60", *extra]
        code, out, err = run_in_process(sample_main, [*argv, f"--num_samples={num_samples}"])
        assert code == 0, err
        return out

    cached = run(f"--dtype={dtype}", "--temperature=0")
    assert cached == run(f"--dtype={dtype}", "--temperature=0", "--use_cache=False")
    # 60 tokens run past block_size (32): the cache's window shift is in the comparison
    assert cached == run("--dtype=float32", "--temperature=0")
    assert samples(cached) == [(UNIT * 3)[: 5 + 60]] * num_samples  # the prompt, then UNIT continued

    sampled = samples(run(f"--dtype={dtype}", "--temperature=0.8", "--top_k=5", "--top_p=0.9"))
    assert len(sampled) == num_samples and all(len(s) == 65 and set(s) <= set(UNIT) for s in sampled)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_training_evaluation_and_resume_under_autocast(pattern_data, tmp_path, capsys, device, dtype):
    """Train, evaluate and checkpoint in 16 bits; a stopped and resumed run ends bit-identical to a straight one.
    float16 trains with a GradScaler whose state travels in the checkpoint. Every matmul of the training
    steps and of the evaluations (first run and resumed one alike) gives 16-bit outputs: autocast was on."""
    half = getattr(torch, dtype)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--eval_interval=4", f"--dtype={dtype}")
    with linear_output_dtypes() as seen:
        train_main(train_args(pattern_data, straight, device, *common, "--max_iters=8"))
    assert seen == {("train", half), ("eval", half)}
    losses = {int(m[1]): float(m[3]) for m in STEP.finditer(capsys.readouterr().out)}
    assert set(losses) == {0, 4, 8} and losses[8] < losses[0] - 0.5

    train_main(train_args(pattern_data, resumed, device, *common, "--max_iters=4"))
    with linear_output_dtypes() as seen:
        train_main(train_args(pattern_data, resumed, device, *common, "--max_iters=8", "--init_from=resume"))
    assert seen == {("train", half), ("eval", half)}  # the resumed run is under autocast too
    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(resumed / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
        assert tensor.dtype == torch.float32  # autocast keeps float32 master weights
    if dtype == "float16":
        assert a["scaler"]["scale"] == b["scaler"]["scale"] > 0
    else:
        assert a["scaler"] is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_eval_only_under_autocast_evaluates_the_checkpoint(sure_model, pattern_data, tmp_path, capsys, device, dtype):
    out_dir = tmp_path / "out"
    shutil.copytree(sure_model, out_dir)
    before = (out_dir / "ckpt.pt").read_bytes()
    capsys.readouterr()
    train_main(train_args(pattern_data, out_dir, device, "--init_from=resume", "--eval_only=True", f"--dtype={dtype}"))
    (iteration, _, val), *_ = STEP.findall(capsys.readouterr().out)
    assert int(iteration) == 150 and float(val) < 0.5  # the sure model, evaluated in 16 bits
    assert (out_dir / "ckpt.pt").read_bytes() == before


def test_compiled_training_and_sampling_under_bfloat16(pattern_data, sure_model, tmp_path, run_in_process, capsys):
    """torch.compile, on by default for CUDA training, compiles and runs here with the CPU's inductor backend;
    compiled sampling equals eager sampling and builds exactly 3 graphs."""
    out_dir = tmp_path / "compiled"
    args = ("--compile=True", "--dtype=bfloat16", "--max_iters=3", "--eval_interval=3")
    train_main([*train_args(pattern_data, out_dir, "cpu"), *args])
    output = capsys.readouterr().out
    assert "compiling the model" in output and len(STEP.findall(output)) == 2
    # the checkpoint of a compiled model has plain parameter names: it loads into an uncompiled one
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    assert set(ckpt["model"]) == set(GPT(GPTConfig(**ckpt["model_args"])).state_dict())

    # 40 new tokens after a 5-token prompt pass block_size (32): prefill, decoding and one re-encode
    argv = [f"--out_dir={sure_model}", "--device=cpu", "--start=first", "--max_new_tokens=40", "--temperature=0"]
    code, eager, err = run_in_process(sample_main, [*argv, "--num_samples=2", "--dtype=bfloat16"])
    assert code == 0, err
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    code, compiled, err = run_in_process(sample_main, [*argv, "--num_samples=2", "--dtype=bfloat16", "--compile=True"])
    assert code == 0, err
    assert compiled == eager and samples(compiled) == [(UNIT * 2)[:45]] * 2
    # the static-shape KV cache: 3 graphs (prefill, 1-token decoding, re-encode), not one per position
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_bench_runs_under_autocast(tmp_path, capsys, device, dtype):
    from nanogpt.bench import main as bench_main

    out = tmp_path / "bench.json"
    small = ("--train_steps=1", "--warmup_steps=1", "--gen_tokens=2", "--gen_batch=2", "--sample_tokens=3")
    bench_main(["--models=seed", f"--device={device}", f"--dtype={dtype}", *small, f"--json={out}"])
    result = json.loads(out.read_text())
    assert result["dtype"] == dtype
    seed = result["models"]["seed"]
    assert seed["train"]["ms_per_iter"] > 0 and all(v > 0 for v in seed["generate_tokens_per_s"].values())
    assert seed["sample_workload"]["batched_cache_s"] > 0
