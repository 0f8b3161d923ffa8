"""nanogpt.memory: the estimates against the real buffers, the refusal before allocating, and real
allocation failures (provoked with an address-space limit in a forked child) turned into advice."""

from __future__ import annotations

import resource
from pathlib import Path

import forkrun as fr
import pytest
import torch

from nanogpt import memory
from nanogpt.device import autocast
from nanogpt.errors import UserError
from nanogpt.memory import SAMPLE_ADVICE, TRAIN_ADVICE, available_bytes, generation_bytes, require, training_bytes
from nanogpt.model import GPT, GPTConfig, KVCache, activation_dtype
from nanogpt.optim import build_optimizers

CONFIG = GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=16, bias=False)


def proc_field(path: str, name: str) -> int:
    """A `Name:   123 kB` field of a /proc file, in bytes."""
    line = next(line for line in Path(path).read_text().splitlines() if line.startswith(name + ":"))
    return int(line.split()[1]) * 1024


def test_available_bytes_on_the_cpu_is_at_most_the_machine():
    assert 0 < available_bytes("cpu") <= proc_field("/proc/meminfo", "MemTotal")


def test_require_names_the_parts_and_the_way_down():
    require({"KV cache": 2**20}, "cpu", "a small request", SAMPLE_ADVICE)  # fits: no error
    with pytest.raises(UserError) as info:
        require({"KV cache": 2**60, "logits": 2**30}, "cpu", "generating 9 x 9 tokens", SAMPLE_ADVICE)
    message = str(info.value)
    assert message.startswith("generating 9 x 9 tokens needs at least")
    assert "KV cache 1,073,741,824.0 GB, logits 1.0 GB" in message and "the CPU has" in message
    assert "fewer --num_samples" in message


GiB = 2**30


def fake_machine(monkeypatch, tmp_path: Path, mem_available: int, cgroup_files: dict[str, str]) -> None:
    """/proc/meminfo and /sys/fs/cgroup as a container sees them, in tmp_path (memory.MEMINFO and CGROUP)."""
    (tmp_path / "meminfo").write_text(
        f"MemTotal: {2 * mem_available // 1024} kB\nMemAvailable: {mem_available // 1024} kB\n"
    )
    for name, text in cgroup_files.items():
        (tmp_path / "cgroup" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cgroup" / name).write_text(text)
    (tmp_path / "cgroup").mkdir(exist_ok=True)
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory, "CGROUP", tmp_path / "cgroup")


def cgroup_v2(limit: str, current: int, inactive_file: int, active_file: int) -> dict[str, str]:
    stat = f"anon {current - inactive_file - active_file}\nfile {inactive_file + active_file}\n"
    stat += f"active_file {active_file}\ninactive_file {inactive_file}\nshmem 0\n"
    return {"memory.max": limit + "\n", "memory.current": f"{current}\n", "memory.stat": stat}


def cgroup_v1(limit: int, usage: int, inactive_file: int, active_file: int) -> dict[str, str]:
    stat = f"cache {inactive_file + active_file}\ninactive_file 0\nactive_file 0\n"  # this cgroup alone
    stat += f"total_inactive_file {inactive_file}\ntotal_active_file {active_file}\n"  # with its children
    return {
        "memory/memory.limit_in_bytes": f"{limit}\n",
        "memory/memory.usage_in_bytes": f"{usage}\n",
        "memory/memory.stat": stat,
    }


# an 8 GiB container that has read 5 GiB of files (a dataset, checkpoints): 7.5 GiB charged, 2.5 GiB in use
FILLED_WITH_PAGE_CACHE = {
    "cgroup v2": cgroup_v2(str(8 * GiB), 15 * GiB // 2, 3 * GiB, 2 * GiB),
    "cgroup v1": cgroup_v1(8 * GiB, 15 * GiB // 2, 3 * GiB, 2 * GiB),
}


@pytest.mark.parametrize("version", FILLED_WITH_PAGE_CACHE)
def test_a_containers_page_cache_counts_as_available(monkeypatch, tmp_path, version):
    """The kernel drops cached file pages before it runs out, so a run that fits beside them is not refused
    (counting them as used, the check saw 0.5 GiB left and refused a 2 GiB training step)."""
    fake_machine(monkeypatch, tmp_path, 100 * GiB, FILLED_WITH_PAGE_CACHE[version])
    assert available_bytes("cpu") == 8 * GiB - 5 * GiB // 2
    require({"gradients": 2 * GiB}, "cpu", "a training step", TRAIN_ADVICE)  # fits: no error
    with pytest.raises(UserError, match="a training step needs at least 6.0 GB .* the CPU has 5.5 GB available"):
        require({"gradients": 6 * GiB}, "cpu", "a training step", TRAIN_ADVICE)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (cgroup_v2("max", 7 * GiB, 0, 0), 6 * GiB),  # no limit: MemAvailable
        (cgroup_v1(2**63 - 4096, 7 * GiB, 0, 0), 6 * GiB),  # v1's "no limit"
        ({}, 6 * GiB),  # no memory controller at all
        (cgroup_v2(str(8 * GiB), 3 * GiB, 0, 0), 5 * GiB),  # the limit leaves less than the machine has
        (cgroup_v2(str(8 * GiB), 3 * GiB, 2 * GiB, 0), 6 * GiB),  # 7 GiB left, but MemAvailable caps it
        ({"memory.max": f"{8 * GiB}\n", "memory.current": f"{7 * GiB}\n"}, 1 * GiB),  # no memory.stat: all used
        (cgroup_v2(str(8 * GiB), 9 * GiB, 0, 0), 0),  # over its limit (it happens briefly)
    ],
)
def test_available_memory_in_and_out_of_containers(monkeypatch, tmp_path, files, expected):
    fake_machine(monkeypatch, tmp_path, 6 * GiB, files)
    assert available_bytes("cpu") == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_estimate_is_the_cache_generate_allocates(dtype):
    model = GPT(CONFIG)
    with autocast("cpu", dtype):
        cache = KVCache(CONFIG, 3, torch.device("cpu"), activation_dtype(model.lm_head.weight))
        estimate = generation_bytes(CONFIG, 3, 5, 10, activation_dtype(model.lm_head.weight), use_cache=True)
    assert estimate["KV cache"] == cache.k.nbytes + cache.v.nbytes
    assert "KV cache" not in generation_bytes(CONFIG, 3, 5, 10, torch.float32, use_cache=False)


def test_training_estimate_counts_the_real_gradients_and_adamw_moments():
    model = GPT(CONFIG)
    (optimizer,) = build_optimizers(model, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu")
    x = torch.randint(CONFIG.vocab_size, (2, CONFIG.block_size))
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    params = list(model.parameters())
    estimate = training_bytes(CONFIG, sum(p.numel() for p in params), 2, torch.float32)
    assert estimate["gradients"] == sum(p.grad.nbytes for p in params)
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert estimate["AdamW moments"] == sum(t.nbytes for t in moments)
    # and the logits: (B, T, vocab) in the activations' dtype plus their float32 softmax, forward and backward
    assert estimate["logits"] == 2 * CONFIG.block_size * CONFIG.vocab_size * (4 + 8)


def limit_address_space(extra: int = 300 * 2**20):
    """In the forked child: allow only `extra` bytes of address space beyond what it maps now, so a
    large allocation fails for real while the machine itself still has plenty (the pre-check passes)."""

    def setup() -> None:
        mapped = proc_field("/proc/self/status", "VmSize")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, resource.RLIM_INFINITY))

    return setup


def test_real_out_of_memory_while_sampling_gets_the_sampling_advice(tiny_checkpoint, tmp_path):
    # 200k samples: a ~0.8 GB KV cache and ~1.3 GB of token ids, far below the machine's free memory
    argv = [f"--out_dir={tiny_checkpoint}", "--device=cpu", "--num_samples=200000", "--max_new_tokens=400"]
    result = fr.run(fr.sample_main(), argv, tmp_path, setup=limit_address_space())
    fr.assert_user_error(result, "the CPU ran out of memory.", "fewer --num_samples", "fewer --max_new_tokens")


def test_real_out_of_memory_while_training_gets_the_training_advice(tiny_checkpoint, tmp_path):
    data_dir = tiny_checkpoint.parent / "data"
    argv = [*fr.TINY, "--block_size=32", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}"]
    # 40k sequences of 32 tokens: ~0.4 GB of activations and logits in the first forward pass
    result = fr.run(
        fr.train_main(), [*argv, "--batch_size=40000", "--max_iters=1"], tmp_path, setup=limit_address_space()
    )
    fr.assert_user_error(result, "the CPU ran out of memory.", "a smaller --batch_size", "--block_size")
    assert not (tmp_path / "out" / "ckpt.pt").exists()
