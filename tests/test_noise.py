"""The fused penalties' own noise: gradicon_fast.ops.normal_noise and the seeded kernels.

* normal_noise(seed, d, shape) is standard normal (mean, variance, Kolmogorov-Smirnov, channel
  independence), deterministic in the seed, different across seeds, and laid out as docs/conventions.md §2 says
  (point p of the penalty takes the p-th draw, channel k its k-th normal number).
* A seeded CPU penalty equals the reference given that noise, in value and in gradients: the
  backward regenerates exactly the forward's noise.
* normal_noise equals Triton's tl.randn4x(seed, offset) (run under TRITON_INTERPRET=1).
* Without explicit noise, the CPU loss and the reference loss (torch.randn noise) have the same mean
  over many draws (Welch's t-test), and the same test rejects when one noise scale is doubled.

Statistical thresholds are set for a false alarm rate of about 1e-6 per check.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import reference as R

from conftest import check_fd, leaves, random_field, random_shape, relative_error, requires_cpu_kernels, smooth_field

pytestmark = requires_cpu_kernels

Z = 5.0  # |z| beyond 5 standard errors: two-sided p ≈ 6e-7


def normal_noise(*args, **kwargs):
    from gradicon_fast import ops

    return ops.normal_noise(*args, **kwargs)


def fresh_seed(rng, bits=62):
    return int(torch.randint(0, 2**bits, (1,), generator=rng))


def ks_statistic(samples):
    """Kolmogorov-Smirnov distance between the empirical CDF of ``samples`` and the standard normal CDF."""
    x, _ = torch.sort(samples.double().flatten())
    n = x.numel()
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


def ks_critical(n, alpha=1e-6):
    """Asymptotic critical value of the one-sample KS statistic: sqrt(-ln(α/2) / 2) / sqrt(n)."""
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


def test_normal_noise_is_standard_normal(rng):
    seed = fresh_seed(rng)
    noise = normal_noise(seed, 4, (25, 1000))  # 4 channels × 25000 points = 1e5 numbers
    assert noise.shape == (1, 4, 25, 1000) and noise.dtype == torch.float32
    assert torch.isfinite(noise).all()
    channels = noise.reshape(4, -1).double()
    for samples in [channels.flatten()] + list(channels):
        n = samples.numel()
        assert abs(samples.mean().item()) < Z / math.sqrt(n)
        assert abs(samples.var().item() - 1) < Z * math.sqrt(2 / n)
        assert ks_statistic(samples) < ks_critical(n)
    # the four normal numbers of a point are uncorrelated, and so are neighbouring points
    n = channels.shape[1]
    corr = torch.corrcoef(channels)
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < Z / math.sqrt(n)
    for k in range(4):
        lagged = torch.corrcoef(torch.stack([channels[k, 1:], channels[k, :-1]]))[0, 1]
        assert abs(lagged.item()) < Z / math.sqrt(n)


def test_ks_test_has_power(rng):
    """The KS check above rejects a slightly wrong distribution (variance 1.05, or a shifted mean)."""
    samples = torch.randn(100_000, generator=rng, dtype=torch.float64)
    assert ks_statistic(samples) < ks_critical(samples.numel())
    assert ks_statistic(samples * 1.05) > ks_critical(samples.numel())
    assert ks_statistic(samples + 0.03) > ks_critical(samples.numel())


def test_normal_noise_seeds(rng):
    seed = fresh_seed(rng)
    a = normal_noise(seed, 3, (40, 50))
    assert torch.equal(a, normal_noise(seed, 3, (40, 50)))  # deterministic
    for other in (seed + 1, seed ^ (1 << 40), fresh_seed(rng)):  # low word, high word, anything
        b = normal_noise(other, 3, (40, 50))
        assert not torch.equal(a, b)
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1].item()
        assert abs(corr) < Z / math.sqrt(a.numel())


def test_normal_noise_layout(rng):
    """Point p (flat index over the points) takes draw p; channel k its k-th number; float64 is the same numbers."""
    seed = fresh_seed(rng)
    shape = random_shape(rng, 3, 2, 7)
    n = shape[0] * shape[1] * shape[2]
    four = normal_noise(seed, 4, (n,))
    for d, points_shape in ((2, shape[:2]), (3, shape), (1, (n,))):
        count = math.prod(points_shape)
        got = normal_noise(seed, d, points_shape)
        assert torch.equal(got, four[:, :d, :count].reshape(1, d, *points_shape))
    assert torch.equal(normal_noise(seed, 3, shape, dtype=torch.float64), normal_noise(seed, 3, shape).double())


@requires_cpu_kernels
@pytest.mark.parametrize("d", [2, 3])
def test_kernel_noise_is_normal_noise_bit_for_bit(rng, d):
    """The float32 CPU kernels draw their seeded noise eight points at a time (AVX2, where built),
    normal_noise point by point: the same bits, so the seeded loss and gradients equal, exactly,
    those given that noise explicitly (the positions, the visiting order and the sums all agree)."""
    from gradicon_fast import ops as fused

    shape = tuple(int(s) for s in torch.randint(9, 31, (d,), generator=rng))
    stride = int(torch.randint(1, 3, (), generator=rng))
    ab = [random_field(rng, 2, tuple(s // 2 + 2 for s in shape), 0.02, torch.float32),
          random_field(rng, 1, shape, 0.02, torch.float32)]
    ba = [random_field(rng, 2, shape, 0.02, torch.float32)]
    points = [(s + stride - 1) // stride for s in shape]
    for seed in (fresh_seed(rng, 31), fresh_seed(rng, 62)):
        noise = fused.normal_noise(seed, d, points)
        args = (list(shape), stride)
        seeded = torch.ops.gradicon_fast.gradicon_loss_and_grad(ab, ba, *args, None, seed, 1e-3, 2 / shape[-1],
                                                                [True, True], [True])
        given = torch.ops.gradicon_fast.gradicon_loss_and_grad(ab, ba, *args, noise, 0, 1e-3, 2 / shape[-1],
                                                               [True, True], [True])
        assert torch.equal(seeded[0], given[0]), (seed, seeded[0].item(), given[0].item())
        for a, b in zip(seeded[1] + seeded[2], given[1] + given[2]):
            assert torch.equal(a, b), seed


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [True, False], ids=["one-pass", "two-pass"])
def test_seeded_penalties_equal_reference_with_that_noise(rng, d, dtype, fused, monkeypatch):
    """fused=False: GradICON's backward op regenerates the noise from the seed (nothing is stored)."""
    from gradicon_fast import ops

    if hasattr(ops, "fuse_cpu_loss_and_grad"):
        monkeypatch.setattr(ops, "fuse_cpu_loss_and_grad", fused)
    elif fused:
        pytest.skip("no one-pass loss-and-gradient path")

    batch = 2
    ab = [random_field(rng, batch, random_shape(rng, d, 2, 6), 0.08, dtype),
          random_field(rng, 1, random_shape(rng, d, 2, 6), 0.08, dtype)]
    ba = [random_field(rng, batch, random_shape(rng, d, 2, 6), 0.08, dtype)]
    shape = random_shape(rng, d, 3, 7)
    tol = 1e-10 if dtype == torch.float64 else 1e-3  # ICON's gradients in float32
    for stride in (1, 2):
        seed = fresh_seed(rng)
        noise_scale = stride / shape[-1]
        points_shape = R.loss_points_shape(shape, stride)
        noise = normal_noise(seed, d, points_shape, dtype=dtype)
        k = len(ab)
        xs = leaves(ab + ba)
        loss = ops.gradicon_loss(xs[:k], xs[k:], shape, stride, None, seed, 1e-3, noise_scale)
        # against the float64 penalty given the noise that normal_noise draws for the seed
        check_fd((loss.detach(), torch.autograd.grad(loss, xs)), ab + ba, f"seeded gradicon stride={stride}", n_ab=k,
                 shape=shape, stride=stride, noise=noise, noise_scale=noise_scale)
    # ICON
    seed = fresh_seed(rng)
    noise = normal_noise(seed, d, shape, dtype=dtype)
    xs = leaves(ab + ba)
    l_cpu = ops.icon_loss(xs[:2], xs[2:], shape, None, seed, 1 / shape[-1])
    g_cpu = torch.autograd.grad(l_cpu, xs)
    ys = leaves(ab + ba)
    l_ref = R.icon_loss(ys[:2], ys[2:], shape=shape, noise=noise)
    g_ref = torch.autograd.grad(l_ref, ys)
    assert relative_error(l_cpu, l_ref) <= (1e-10 if dtype == torch.float64 else 1e-5)
    assert relative_error(list(g_cpu), list(g_ref)) <= tol


@pytest.mark.parametrize("d", [2, 3])
def test_public_api_generator_draws_the_seed(rng, d):
    """gf.gradicon_loss(generator=g, backend="cpu") uses a seed drawn from g: same g state, same loss."""
    ab = [random_field(rng, 2, random_shape(rng, d, 2, 6), 0.08)]
    ba = [random_field(rng, 2, random_shape(rng, d, 2, 6), 0.08)]
    shape = random_shape(rng, d, 3, 6)
    seed = fresh_seed(rng, 31)
    a = gf.gradicon_loss(ab, ba, shape=shape, stride=2, generator=torch.Generator().manual_seed(seed), backend="cpu")
    b = gf.gradicon_loss(ab, ba, shape=shape, stride=2, generator=torch.Generator().manual_seed(seed), backend="cpu")
    c = gf.gradicon_loss(ab, ba, shape=shape, stride=2, generator=torch.Generator().manual_seed(seed + 1),
                         backend="cpu")
    assert a.item() == b.item() and a.item() != c.item()
    # the drawn seed reproduces the loss through the reference with normal_noise(seed)
    drawn = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))
    noise = normal_noise(drawn, d, R.loss_points_shape(shape, 2), dtype=torch.float64)
    expected = gf.gradicon_loss(ab, ba, shape=shape, stride=2, noise=noise, backend="torch")
    assert relative_error(a, expected) <= 1e-10
    i1 = gf.icon_loss(ab, ba, shape=shape, generator=torch.Generator().manual_seed(seed), backend="cpu")
    i2 = gf.icon_loss(ab, ba, shape=shape, generator=torch.Generator().manual_seed(seed + 1), backend="cpu")
    assert i1.item() != i2.item()


TRITON_SCRIPT = textwrap.dedent("""
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set before triton defines any kernel
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def randn4x_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        n0, n1, n2, n3 = tl.randn4x(seed, offsets)
        tl.store(out_ptr + offsets, n0, mask=mask)
        tl.store(out_ptr + n + offsets, n1, mask=mask)
        tl.store(out_ptr + 2 * n + offsets, n2, mask=mask)
        tl.store(out_ptr + 3 * n + offsets, n3, mask=mask)

    seeds, n = json.loads(sys.argv[1]), int(sys.argv[2])
    result = []
    for seed in seeds:
        out = torch.empty(4 * n, dtype=torch.float32)
        randn4x_kernel[(triton.cdiv(n, 256),)](out, seed, n, BLOCK=256)
        result.append(out.tolist())
    print(json.dumps(result))
""")


def test_normal_noise_matches_triton_randn4x(rng):
    pytest.importorskip("triton")
    n = 1000
    seeds = [fresh_seed(rng, 31), fresh_seed(rng, 62), 2**32 + fresh_seed(rng, 20)]  # small, large, high word
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, json.dumps(seeds), str(n)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    triton_noise = json.loads(done.stdout.strip().splitlines()[-1])
    for seed, values in zip(seeds, triton_noise):
        expected = torch.tensor(values, dtype=torch.float32).reshape(1, 4, n)
        got = normal_noise(seed, 4, (n,))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"seed {seed}")


# ---- statistics: seeded CPU noise vs torch.randn noise ------------------------------------------------


def welch_t(a, b):
    a = torch.tensor(a, dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    return ((a.mean() - b.mean()) / torch.sqrt(a.var() / a.numel() + b.var() / b.numel())).item()


@pytest.mark.parametrize("penalty, stride", [("gradicon", 2), ("gradicon", 1), ("icon", 1)])
def test_unseeded_mean_matches_reference(rng, one_thread, penalty, stride):
    """Same expected loss from the kernels' Philox noise as from the reference's torch.randn noise.

    Smooth non-linear chains and a large noise scale (0.3): many points leave the domain, where the
    maps are translations, so GradICON's expected loss depends strongly on the noise distribution.
    ICON's need not (outside the domain its error is that of the clamped border displacements; for
    some random chains doubling the noise scale moved the mean by under one standard error), so its
    chain AB also zooms by 1.3 about the centre: the error then grows with the distance from the
    centre up to the border, whatever the random part, and saturates outside. The same test must
    reject when the reference's noise scale is doubled (GradICON) or halved (ICON, where halving
    moves the mean by at least 10 standard errors over 61 seeds, doubling by 4.4 for one of 300).
    """
    shape = (12, 11)
    ab = [smooth_field(rng, 2, (9, 8), 0.15, control=4), smooth_field(rng, 1, (5, 6), 0.1)]
    ba = [smooth_field(rng, 2, (7, 9), 0.15, control=4)]
    if penalty == "icon":
        ab[0] = ab[0] + 0.3 * (gf.identity_map((9, 8), dtype=ab[0].dtype) - 0.5)
    draws = 200
    gen_cpu = torch.Generator().manual_seed(fresh_seed(rng, 31))
    gen_ref = torch.Generator().manual_seed(fresh_seed(rng, 31))

    def losses(backend, generator, noise_scale):
        if penalty == "gradicon":
            call = lambda: gf.gradicon_loss(ab, ba, shape=shape, stride=stride, generator=generator,  # noqa: E731
                                            noise_scale=noise_scale, backend=backend)
        else:
            call = lambda: gf.icon_loss(ab, ba, shape=shape, generator=generator, noise_scale=noise_scale,  # noqa: E731
                                        backend=backend)
        return [call().item() for _ in range(draws)]

    cpu = losses("cpu", gen_cpu, 0.3)
    t_same = welch_t(cpu, losses("torch", gen_ref, 0.3))
    other_scale = 0.15 if penalty == "icon" else 0.6
    t_other = welch_t(cpu, losses("torch", gen_ref, other_scale))
    assert abs(t_same) < 4.5, f"CPU and reference means differ: t = {t_same:.2f}"
    assert abs(t_other) > 4.5, f"no power: noise scale {other_scale} instead of 0.3 gives t = {t_other:.2f}"
