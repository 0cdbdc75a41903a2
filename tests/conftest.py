"""Shared fixtures and helpers for the test suite."""

import os

import pytest
import torch

import gradicon_fast as gf

HAS_CPU_KERNELS = gf.backends()["cpu"]
HAS_CUDA = torch.cuda.is_available()

requires_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="the C++ extension is not built")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


@pytest.fixture
def rng():
    """A fresh, randomly seeded generator: every run draws new inputs; the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)
