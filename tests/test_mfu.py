"""nanogpt.mfu: datasheet peaks matched by whole words of the GPU's name, and the CPU's measured peak."""

from __future__ import annotations

import pytest
import torch

from nanogpt import mfu
from nanogpt.mfu import datasheet_peak, measured_matmul_flops, peak_flops


@pytest.mark.parametrize(
    "name, flops",  # the vendors' dense bfloat16 tensor-core figures, written out, not read from the table
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("NVIDIA GeForce RTX 3090", 71e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("Tesla T4", 65e12),
    ],
)
def test_known_gpus_get_their_datasheet_peak(name, flops):
    assert datasheet_peak(name) == flops


@pytest.mark.parametrize("name", ["NVIDIA L40", "NVIDIA A1000", "NVIDIA GeForce RTX 40900", "NVIDIA RTX A4000"])
def test_unknown_gpus_are_not_matched_by_a_substring(name):
    assert datasheet_peak(name) is None  # "L40" is not an L4: the peak is then measured


def test_cpu_peak_is_a_measured_matmul_rate():
    peak = peak_flops("cpu", torch.float32)
    assert 1e8 < peak < 1e14  # between an old phone and far beyond any CPU
    assert peak == measured_matmul_flops("cpu", torch.float32, 512)  # a 512 x 512 matmul's rate, not a table's


class FakeClock:
    """time.perf_counter for nanogpt.mfu: each matmul takes the next of `durations` seconds."""

    def __init__(self, durations):
        self.readings = []
        t = 0.0
        for d in durations:  # read at the start, then twice at the end (the best time, the time spent)
            self.readings += [t, t + d, t + d]
            t += d + 1.0

    def perf_counter(self):
        return self.readings.pop(0)


@pytest.mark.parametrize(
    "durations, best",
    [
        ([0.05, 0.02, 0.04, 0.03, 0.06], 0.02),  # five matmuls, the fastest counts
        ([0.15, 0.1], 0.1),  # on a CPU it stops once 0.2 s are spent
    ],
)
def test_the_measured_peak_is_2n_cubed_flops_over_the_fastest_matmul(monkeypatch, durations, best):
    clock = FakeClock(durations)
    monkeypatch.setattr(mfu, "time", clock)
    measured_matmul_flops.cache_clear()
    try:
        assert measured_matmul_flops("cpu", torch.float32, 64) == pytest.approx(2 * 64**3 / best, rel=1e-9)
    finally:
        measured_matmul_flops.cache_clear()  # the fake rate must not stand in for the real one later
    assert clock.readings == []  # as many matmuls timed as expected, no more
