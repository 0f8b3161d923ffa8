"""The benchmark runs end to end on a small budget and reports every figure it promises."""

import json

import pytest

from nanogpt.bench import BenchOptions, main
from nanogpt.errors import UserError


def test_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
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
    printed = capsys.readouterr().out
    assert "ms/iter" in printed and "tok/s" in printed and "MFU" in printed and "peak memory" in printed
    result = json.loads(out.read_text())
    seed = result["models"]["seed"]
    assert seed["config"]["n_layer"] == 4 and seed["train"]["batch_size"] == 12
    train = seed["train"]
    assert 0 < train["ms_min"] <= train["ms_per_iter"] <= train["ms_max"]
    assert train["tokens_per_s"] == pytest.approx(12 * 64 / (train["ms_per_iter"] / 1000))
    assert 0 < train["mfu"]
    assert set(seed["generate_tokens_per_s"]) == {"batch1_cache", "batch1_nocache", "batch2_cache", "batch2_nocache"}
    assert all(v > 0 for v in seed["generate_tokens_per_s"].values())
    work = seed["sample_workload"]
    assert (work["samples"], work["tokens"]) == (2, 4)
    assert work["speedup"] == pytest.approx(work["sequential_nocache_s"] / work["batched_cache_s"])
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
