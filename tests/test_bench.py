"""The benchmark runs end to end on a small budget and reports every figure it promises."""

import json
import time

import pytest
from test_model import counted_training_flops_per_token

from nanogpt.bench import BenchOptions, main
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig


def test_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    main(
        [
            "--models=seed",
            "--device=cpu",
            "--train_steps=2",
            "--warmup_steps=1",
            "--gen_tokens=3",
            "--gen_batch=2",
            "--sample_tokens=4",
            f"--json={out}",
        ]
    )
    wall = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert "ms/iter" in printed and "tok/s" in printed and "MFU" in printed and "peak memory" in printed
    result = json.loads(out.read_text())
    seed = result["models"]["seed"]
    assert seed["config"]["n_layer"] == 4 and seed["train"]["batch_size"] == 12
    train = seed["train"]
    assert 0 < train["ms_min"] <= train["ms_per_iter"] <= train["ms_max"]
    # against an independent clock: the timed steps fit inside the whole call
    assert train["steps"] == 2 and 2 * train["ms_min"] / 1000 < wall
    # FLOP/s per token/s is the model's FLOPs per token, as PyTorch's flop counter counts them (plus the
    # 6 FLOPs per LayerNorm gain the formula includes and the counter does not see)
    model = GPT(GPTConfig(**seed["config"]))
    gains = sum(p.numel() for n, p in model.named_parameters() if "ln" in n)
    counted = counted_training_flops_per_token(model) + 6 * gains
    assert train["flops_per_s"] / train["tokens_per_s"] == pytest.approx(counted, rel=1e-9)
    assert 0 < train["mfu"]
    assert set(seed["generate_tokens_per_s"]) == {"batch1_cache", "batch1_nocache", "batch2_cache", "batch2_nocache"}
    assert all(v > 0 for v in seed["generate_tokens_per_s"].values())
    work = seed["sample_workload"]
    assert (work["samples"], work["tokens"]) == (2, 4)
    assert work["sequential_nocache_s"] + work["batched_cache_s"] < wall
    assert seed["peak_memory_mb"] > 0


def test_profile_prints_the_top_operators(tmp_path, capsys):
    main(
        [
            "--models=seed",
            "--device=cpu",
            "--train_steps=1",
            "--warmup_steps=0",
            "--gen_tokens=1",
            "--gen_batch=1",
            "--sample_tokens=1",
            "--profile=True",
            "--json=",
        ]
    )
    assert "aten::mm" in capsys.readouterr().out


def test_bench_options_are_checked():
    with pytest.raises(UserError, match="gpt2"):
        BenchOptions(models="seed,gpt3")
    with pytest.raises(UserError):
        BenchOptions(train_steps=0)
