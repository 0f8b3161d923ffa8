"""nanogpt.mfu: datasheet peaks matched by whole words of the GPU's name, and the CPU's measured peak."""

from __future__ import annotations

import pytest
import torch

from nanogpt.mfu import GPU_PEAK_FLOPS, datasheet_peak, peak_flops


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
    ],
)
def test_known_gpus_get_their_datasheet_peak(name, key):
    assert datasheet_peak(name) == GPU_PEAK_FLOPS[key]


@pytest.mark.parametrize("name", ["NVIDIA L40", "NVIDIA A1000", "NVIDIA GeForce RTX 40900", "NVIDIA RTX A4000"])
def test_unknown_gpus_are_not_matched_by_a_substring(name):
    assert datasheet_peak(name) is None  # "L40" is not an L4: the peak is then measured


def test_cpu_peak_is_a_measured_matmul_rate():
    peak = peak_flops("cpu", torch.float32)
    assert 1e8 < peak < 1e14  # between an old phone and far beyond any CPU
