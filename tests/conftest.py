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


# ---- finite-difference GradICON in float32 --------------------------------------------------------

FD_TOL = {torch.float64: 1e-10, torch.float32: 1e-3}  # δ = 1e-3 amplifies float32 rounding


def exact(fn, inputs):
    """(value, gradients) of fn("torch", *inputs) on the reference in float64, the inputs upcast exactly."""
    xs = leaves([x.detach().double() for x in inputs])
    y = fn("torch", *xs)
    return y.detach(), torch.autograd.grad(y, xs)


def check_fd(got, expected, fn, inputs, what, slack=0.0):
    """Finite-difference GradICON (value, gradients) of a fused backend against the reference's.

    float64: FD_TOL (+ slack). float32: FD_TOL (+ slack), or else no farther from the exact
    (float64) penalty than the float32 reference is (3x, plus 1e-4). The gradients carry g - I, and
    where g ≈ I (points clamped outside the fields, where g - I is only rounding divided by δ) both
    float32 implementations are equally far from the truth and from each other; a wrong kernel is
    orders of magnitude farther.
    """
    dtype = got[0].dtype
    for k, part in enumerate(("value", "grads")):
        err = relative_error(got[k], expected[k])
        if err <= FD_TOL[dtype] + slack:
            continue
        assert dtype == torch.float32, f"{what} {part}: relative error {err:.3g} > {FD_TOL[dtype] + slack:g}"
        truth = exact(fn, inputs)[k]
        mine, theirs = relative_error(got[k], truth), relative_error(expected[k], truth)
        assert mine <= 3 * theirs + 1e-4 + slack, (
            f"{what} {part}: relative error {err:.3g} against the float32 reference, "
            f"{mine:.3g} against the float64 penalty (the reference's: {theirs:.3g})")
