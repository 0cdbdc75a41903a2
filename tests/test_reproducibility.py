"""The same inputs give the same bits whatever the number of CPU threads.

A registration runs hundreds of Adam steps; Adam divides each gradient by the root of its running
second moment, so where gradients are near zero a difference of one ulp in a step's gradient
becomes a full step, and ulps that depend on the thread count grew into transforms millimetres
apart. So every reduction on the registration path adds in an order fixed by the problem: the
fused kernels' scattered backward passes (csrc/cpu/cpu_common.h, kSlabPairs), their loss sums, and
the whole-tensor means of the similarity (gradicon_fast/reduction.py). The criterion is equality of
the bits, except where a result goes through a file (float32 NIfTI).
"""

import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import cli, io
from gradicon_fast import registration as R
from gradicon_fast.demo import make_synthetic_pair
from gradicon_fast.reduction import CHUNK, fixed_order_mean, fixed_order_sum

from conftest import leaves, random_points, requires_cpu_kernels, smooth_field

ROOT = Path(__file__).resolve().parent.parent
THREADS = [1, 2, 3]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _each_thread_count(set_threads, compute):
    """compute() under each of THREADS threads: the list of its results."""
    results = []
    for n in THREADS:
        set_threads(n)
        results.append(compute())
    return results


def _assert_same_bits(results):
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first, other):
            same = torch.equal(a, b)
            assert same, f"differs by up to {(a.double() - b.double()).abs().max().item():.3g}"


# ------------------------------------------------------------------------------------------------
# Whole-tensor sums
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, CHUNK, CHUNK + 1, 40 ** 3, 100_003, CHUNK * CHUNK + 3])
def test_fixed_order_sum_same_bits_any_thread_count(rng, threads, numel):
    # torch's x.sum() of 100003 float32 values differs between 1 and 2 threads (two-pass reduction)
    x = torch.randn(numel, generator=rng) + 0.5
    sums = _each_thread_count(threads, lambda: [fixed_order_sum(x), fixed_order_mean(x.view(1, -1))])
    _assert_same_bits(sums)
    exact = x.double().sum().item()
    assert abs(sums[0][0].item() - exact) <= 1e-5 * x.double().abs().sum().item()
    assert sums[0][1].item() == pytest.approx(exact / numel, rel=1e-5, abs=1e-6)


def test_fixed_order_sum_gradient(rng):
    x = torch.randn(3 * CHUNK + 17, generator=rng, requires_grad=True)
    (g,) = torch.autograd.grad(fixed_order_mean(x), x)
    assert torch.equal(g, torch.full_like(x, 1 / x.numel()))


@pytest.mark.parametrize("shape, channels, sigma", [((36, 36, 36), 1, 0.97), ((41, 37, 39), 5, 3), ((33, 47), 3, 2)])
def test_gaussian_blur_same_bits_any_thread_count(rng, threads, shape, channels, sigma):
    # the 36³ case rounded differently with 3 threads than with 1 while the last axis was one 2D product
    x = torch.randn((1, channels, *shape), generator=rng)
    blur = R.GaussianBlur(sigma, shape)
    _assert_same_bits(_each_thread_count(threads, lambda: [blur(x), R.resize(x, [s // 2 for s in shape])]))


# ------------------------------------------------------------------------------------------------
# The fused CPU kernels
# ------------------------------------------------------------------------------------------------


def _chain(rng, sizes, amplitude=0.08):
    return leaves([smooth_field(rng, 1, s, amplitude, torch.float32, control=5) for s in sizes])


@requires_cpu_kernels
@pytest.mark.parametrize("path", ["simd8", "lanes", "scalar"])
def test_gradicon_loss_and_gradients_same_bits_any_thread_count(rng, threads, monkeypatch, path):
    monkeypatch.setenv("GRADICON_FAST_CPU_KERNEL", path)
    ab = _chain(rng, [(12, 14, 13), (27, 25, 26)])
    ba = _chain(rng, [(26, 27, 25)])
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=rng))

    def compute():
        gen = torch.Generator().manual_seed(seed)
        try:
            loss = gf.gradicon_loss(ab, ba, shape=(38, 41, 36), stride=2, generator=gen, backend="cpu")
        except RuntimeError as exc:
            if "built without AVX2" in str(exc):
                pytest.skip("extension built without AVX2")
            raise
        return [loss.detach()] + list(torch.autograd.grad(loss, ab + ba))

    _assert_same_bits(_each_thread_count(threads, compute))


@requires_cpu_kernels
def test_warp_points_icon_analytic_same_bits_any_thread_count(rng, threads):
    chain = _chain(rng, [(14, 12, 13), (30, 28, 29)])
    image = torch.rand((1, 1, 30, 28, 29), generator=rng).requires_grad_()
    points = random_points(rng, 1, 3, (25, 27, 26)).float().requires_grad_()
    grad_warp = torch.randn((1, 1, 30, 28, 29), generator=rng)
    grad_points = torch.randn((1, 3, 25, 27, 26), generator=rng)

    def compute():
        warped = gf.warp(image, chain, backend="cpu")
        moved = gf.transform_points(chain, points, backend="cpu")
        gen = torch.Generator().manual_seed(7)
        icon = gf.icon_loss(chain, chain[::-1], shape=(30, 28, 29), generator=gen, backend="cpu")
        analytic = gf.gradicon_loss(chain, chain[::-1], shape=(30, 28, 29), stride=2, mode="analytic",
                                    generator=gen, backend="cpu")
        return ([warped.detach(), moved.detach(), icon.detach(), analytic.detach()]
                + list(torch.autograd.grad(warped, chain + [image], grad_warp))
                + list(torch.autograd.grad(moved, chain + [points], grad_points))
                + list(torch.autograd.grad(icon, chain))
                + list(torch.autograd.grad(analytic, chain)))

    _assert_same_bits(_each_thread_count(threads, compute))


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------


@requires_cpu_kernels
@pytest.mark.parametrize("similarity", ["lncc", "mse"])
def test_register_same_transform_any_thread_count(threads, similarity):
    # 36³ voxels: the images' means and the backward passes are all above torch's parallel grain
    pair = make_synthetic_pair((36, 36, 36), 8.0, max_displacement_mm=15.0, num_landmarks=10, seed=2)
    settings = R.RegistrationSettings(levels=(R.Level(2, 2, 30), R.Level(1, 2, 30)), similarity=similarity,
                                      diffusion=0.1)

    def compute():
        result = R.register(pair.fixed, pair.moving, settings=settings)
        losses = torch.tensor([entry[1:] for entry in result.loss_history], dtype=torch.float64)
        return result.chain_AB + result.chain_BA + [losses]

    _assert_same_bits(_each_thread_count(threads, compute))


def _register_cli(pair_files, out: Path, n_threads: int):
    # PASSIVE: on cores shared with other jobs, spinning OpenMP threads made the 2-thread run 7x slower
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")} | {"OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "gradicon_fast", "register", "--fixed", str(pair_files[0]),
                           "--moving", str(pair_files[1]), "--transform-out", str(out / "transform.nii.gz"),
                           "--inverse-transform-out", str(out / "inverse.nii.gz"), "--max-size", "32",
                           "--iterations", "20", "20", "10", "--threads", str(n_threads), "-q"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return [np.asarray(nib.load(out / name).dataobj) for name in ("transform.nii.gz", "inverse.nii.gz")]


@requires_cpu_kernels
def test_register_command_same_transform_with_1_and_2_threads(tmp_path):
    # 32³: the loss grid's means and the backward passes are above torch's parallel grain; before the
    # reductions were fixed-order, the transforms of this command differed by up to 2.2 mm
    pair = make_synthetic_pair((32, 32, 32), 6.0, max_displacement_mm=15.0, num_landmarks=10, seed=3)
    files = (tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz")
    geometry = io.Geometry(pair.geometry.shape, (6.0, 5.5, 6.5), (100.0, -50.0, 20.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    for name, path in zip(("fixed", "moving"), files):
        io.write_image(path, io.Image(pair.image(name).array, geometry))
    one = _register_cli(files, tmp_path / "one", 1)
    two = _register_cli(files, tmp_path / "two", 2)
    for a, b in zip(one, two):
        assert a.shape == b.shape
        assert np.abs(a).max() > 1.0  # a real deformation, in mm
        # measured: bit-identical; allowed: a float32 rounding of values up to ~20 mm
        assert np.abs(a.astype(np.float64) - b).max() <= 1e-5


# ------------------------------------------------------------------------------------------------
# The thread count itself
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [None, 1, 3])
def test_thread_count_is_not_derived_from_the_load(threads, monkeypatch, given):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 1000.0, 1000.0))  # a very busy machine
    threads(2)
    cli._set_threads(Namespace(threads=given, quiet=True))
    assert torch.get_num_threads() == (2 if given is None else given)
