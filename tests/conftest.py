"""Shared fixtures and helpers for the test suite.

Randomised tests draw their inputs from the `rng` fixture, a generator seeded afresh on every run
(from os.urandom); the seed is printed, so pytest shows it with a failure. To rerun with that seed,
set GRADICON_FAST_TEST_SEED (a decimal integer), e.g.

    GRADICON_FAST_TEST_SEED=3943008167 python -m pytest "tests/test_cpu_kernel_paths.py::test_x[...]"

Every test that takes `rng` then draws the same inputs as in the failing run.
"""

import os

import pytest
import torch

import gradicon_fast as gf

HAS_CPU_KERNELS = gf.backends()["cpu"]
HAS_CUDA = torch.cuda.is_available()

requires_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="the C++ extension is not built")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


SEED_VARIABLE = "GRADICON_FAST_TEST_SEED"


def drawn_seed():
    """The seed for the `rng` fixture: GRADICON_FAST_TEST_SEED if set, else 32 fresh random bits."""
    forced = os.environ.get(SEED_VARIABLE, "").strip()
    if not forced:
        return int.from_bytes(os.urandom(4), "little")
    try:
        return int(forced)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VARIABLE} must be a decimal integer, got {forced!r}") from None


@pytest.fixture
def rng():
    """A seeded generator: fresh inputs every run unless GRADICON_FAST_TEST_SEED forces the seed;
    the seed is printed (pytest shows it on failure)."""
    seed = drawn_seed()
    print(f"generator seed: {seed} (rerun with {SEED_VARIABLE}={seed})")
    return torch.Generator().manual_seed(seed)


# ---- random inputs shared by the foundation tests ------------------------------------------------
# Every helper takes the test's `rng` generator so that the printed seed reproduces the inputs.


def rand_uniform(generator, shape, lo=0.0, hi=1.0, dtype=torch.float64):
    """Uniform numbers in [lo, hi) drawn from ``generator``."""
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)


def random_field(generator, batch, shape, magnitude, dtype=torch.float64):
    """A rough displacement field (batch, d, *shape): independent uniform values in [-magnitude, magnitude]."""
    return rand_uniform(generator, (batch, len(shape), *shape), -magnitude, magnitude, dtype)


def smooth_field(generator, batch, shape, magnitude, dtype=torch.float64, control=3):
    """A smooth displacement field: uniform values on a ``control``-per-axis grid, upsampled (bi/trilinear).

    Its values lie in [-magnitude, magnitude]; with few control points it is smooth but not affine.
    """
    d = len(shape)
    coarse = rand_uniform(generator, (batch, d, *([control] * d)), -magnitude, magnitude, torch.float64)
    mode = "bilinear" if d == 2 else "trilinear"
    fine = torch.nn.functional.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)
    return fine.to(dtype).contiguous()


def random_shape(generator, d, lo=3, hi=8):
    """A random spatial shape with sizes in [lo, hi], never cubic (at least two sizes differ)."""
    while True:
        shape = tuple(int(s) for s in torch.randint(lo, hi + 1, (d,), generator=generator))
        if len(set(shape)) > 1:
            return shape


def random_chain(generator, d, batch, length, magnitude, dtype=torch.float64, lo=3, hi=8, smooth=False,
                 broadcast=True):
    """A chain of ``length`` fields of different random non-cubic resolutions.

    With ``broadcast`` and batch > 1, the second field has batch size 1 (it broadcasts over the batch).
    """
    chain = []
    for i in range(length):
        shape = random_shape(generator, d, lo, hi)
        b = 1 if (broadcast and batch > 1 and i == 1) else batch
        make = smooth_field if smooth else random_field
        chain.append(make(generator, b, shape, magnitude, dtype))
    return chain


def random_points(generator, batch, d, points_shape, lo=-0.3, hi=1.3, dtype=torch.float64):
    """Points (batch, d, *points_shape) uniform in [lo, hi]^d: some fall outside [0, 1]."""
    return rand_uniform(generator, (batch, d, *points_shape), lo, hi, dtype)


def relative_error(got, expected):
    """Norm-wise relative error ||got - expected|| / ||expected|| over tensors or lists of tensors."""
    if isinstance(got, torch.Tensor):
        got, expected = [got], [expected]
    got, expected = [g.detach() for g in got], [e.detach() for e in expected]
    num = sum(float(((g.double() - e.double()) ** 2).sum()) for g, e in zip(got, expected))
    den = sum(float((e.double() ** 2).sum()) for e in expected)
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def leaves(tensors):
    """Detached copies of ``tensors`` that require grad."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# Checking the finite-difference GradICON in float32 (fd_check.py), shared by several test files.
from fd_check import FD_TOL, check_fd, fd_kink_entries  # noqa: E402,F401


@pytest.fixture
def one_thread():
    """One intra-op thread for small problems: on shared cores, OpenMP hand-offs dominate tiny calls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
