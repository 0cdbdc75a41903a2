"""The CUDA kernels (backend="cuda") against the PyTorch reference (backend="torch") on CUDA tensors.

Values and gradients of every op, 2D and 3D, chains of mixed non-cubic resolutions, batch 1-3 with
fields that broadcast over the batch, points outside [0, 1], explicit noise and seeded noise (the
reference given the noise gradicon_fast.ops.normal_noise draws for the seed), coarse fields and
images over fine point grids (the warp-aggregated atomics), the longest chains, partial
requires_grad, non-contiguous inputs, non-default streams, half-precision fields, and tensors
past 2^31 elements (64-bit indexing; only on GPUs with enough memory). Skipped without a CUDA
device or without the compiled CUDA kernels. Fresh random inputs every run (the `rng` fixture
prints its seed).

Tolerances (relative, norm-wise unless said otherwise), as in test_cpu_parity.py: float64 1e-10;
float32 1e-5 for transform_points, warp and ICON, 1e-3 for finite-difference GradICON (its
g_k divides float32 rounding of coordinates, ~6e-8, by δ = 1e-3; conftest.check_fd compares each
gradient entry with the float64 penalty, except next to kinks of the fields, where float32
rounding picks the side). float16/bfloat16 fields are
compared with the float32 CUDA kernels on the same (exactly upcast) inputs: the kernels compute
in float32 and round each output once, so the gap is the output rounding (2^-11 / 2^-8 relative
per element) plus float32 noise.
"""

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import backend_registry
from gradicon_fast import ops as fused
from gradicon_fast import reference as R

from conftest import (FD_TOL, check_fd, leaves, rand_uniform, random_field, random_points, random_shape,
                      relative_error, smooth_field)

_REASON = None if torch.cuda.is_available() else "no CUDA device"
if _REASON is None:
    _REASON = backend_registry.unavailable_reason("cuda")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"CUDA kernels not testable: {_REASON}")

DEV = "cuda"
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]
HALF_TOL = {torch.float16: 2e-3, torch.float32: 1e-5, torch.bfloat16: 8e-3}


def randint(rng, lo, hi):
    return int(torch.randint(lo, hi + 1, (1,), generator=rng))


def coin(rng, p=0.5):
    return bool(torch.rand(1, generator=rng).item() < p)


def cuda(tensors):
    if isinstance(tensors, torch.Tensor):
        return tensors.to(DEV)
    return [t.to(DEV) for t in tensors]


def make_chain(rng, d, batch, length, dtype, regime="typical", lo=2, hi=7):
    """A chain on the GPU of ``length`` fields at random resolutions; with batch > 1 some broadcast."""
    chain = []
    for i in range(length):
        shape = random_shape(rng, d, lo, hi)
        b = batch if (batch == 1 or i == 0 or coin(rng)) else 1
        if regime == "typical":
            f = random_field(rng, b, shape, float(rand_uniform(rng, (1,), 0.02, 0.1)), dtype)
        elif regime == "large":
            f = smooth_field(rng, b, shape, float(rand_uniform(rng, (1,), 0.3, 0.5)), dtype)
        else:
            f = random_field(rng, b, shape, 0.5, dtype)
        chain.append(f)
    if batch > 1 and length > 1 and all(f.shape[0] == batch for f in chain):
        chain[-1] = chain[-1][:1].contiguous()
    return cuda(chain)


def protocol_chain(rng, d, batch, shape, dtype, magnitude=0.05):
    """Fields at 1/4, 1/2 and full resolution of ``shape`` (the standard network's steps)."""
    chain = []
    for factor in (4, 2, 1, 1):
        s = tuple(max(2, (n + factor - 1) // factor) for n in shape)
        chain.append(smooth_field(rng, batch, s, magnitude, dtype, control=4))
    return cuda(chain)


def regimes(dtype):
    return ["typical", "large", "rough-large"] if dtype == torch.float64 else ["typical", "large"]


def run_both(fn, inputs, upstream=None):
    """((value, gradients) on "cuda", the same on "torch") of fn(backend, *leaves), same upstream gradient."""
    out = {}
    for backend in ("torch", "cuda"):
        xs = leaves(inputs)
        y = fn(backend, *xs)
        grads = torch.autograd.grad(y, xs, upstream if upstream is not None else torch.ones_like(y))
        out[backend] = (y.detach(), grads)
    return out["cuda"], out["torch"]


def check(got, expected, tol, what):
    err = relative_error(got, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


# ---- noise ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
def test_normal_noise_matches_cpu(d):
    shape = (33, 17, 9)[:d] if d == 3 else (129, 65)
    for seed in (0, 1, 2**40 + 7, 2**62 - 1):
        for dtype in (torch.float32, torch.float64):
            got = fused.normal_noise(seed, d, shape, dtype=dtype, device=DEV)
            expected = fused.normal_noise(seed, d, shape, dtype=dtype)
            assert got.shape == (1, d, *shape) and got.dtype == dtype and got.is_cuda
            # the same Philox bits; logf/sinf/cosf of CUDA and of the C library differ by an ulp or two
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
        for dtype in (torch.float16, torch.bfloat16):
            got = fused.normal_noise(seed, d, shape, dtype=dtype, device=DEV)
            single = fused.normal_noise(seed, d, shape, dtype=torch.float32, device=DEV)
            assert torch.equal(got, single.to(dtype))
    a = fused.normal_noise(5, d, shape, device=DEV)
    assert torch.equal(a, fused.normal_noise(5, d, shape, device=DEV))
    assert not torch.equal(a, fused.normal_noise(6, d, shape, device=DEV))
    assert abs(a.mean().item()) < 0.05 and abs(a.std().item() - 1) < 0.05


# ---- chain evaluation and warping ----------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transform_points(rng, d, dtype):
    for regime in regimes(dtype):
        for _ in range(2):
            batch = randint(rng, 1, 3)
            chain = make_chain(rng, d, batch, randint(rng, 1, 4), dtype, regime)
            points_batch = batch if coin(rng) else 1
            points = cuda(random_points(rng, points_batch, d, (randint(rng, 2, 40), randint(rng, 1, 9)), dtype=dtype))
            k = len(chain)
            upstream = cuda(torch.randn(batch, d, *points.shape[2:], generator=rng, dtype=torch.float64).to(dtype))
            (y, g), (y_ref, g_ref) = run_both(
                lambda backend, *xs: gf.transform_points(list(xs[:k]), xs[k], backend=backend), chain + [points],
                upstream)
            assert y.shape == (batch, d, *points.shape[2:]) and y.dtype == dtype and y.is_cuda
            check(y, y_ref, TOL[dtype], f"transform_points {regime}")
            check(list(g), list(g_ref), TOL[dtype], f"transform_points grads {regime}")


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transform_points_dense_over_coarse(rng, d, dtype):
    """Many points per cell of coarse fields: the warp-aggregated atomics, with heavy contention."""
    grid = (96, 80) if d == 2 else (20, 24, 28)
    for batch in (1, 3):
        chain = cuda([random_field(rng, batch, (3,) * d, 0.08, dtype), random_field(rng, 1, (2, 3, 4)[:d], 0.05, dtype),
                      random_field(rng, batch, grid, 0.02, dtype)])
        points = R.identity_map(grid, dtype=dtype, device=DEV)
        points = points + cuda(rand_uniform(rng, points.shape, -0.002, 0.002, dtype))
        upstream = cuda(torch.randn(batch, d, *grid, generator=rng, dtype=torch.float64).to(dtype))
        (y, g), (y_ref, g_ref) = run_both(
            lambda backend, *xs: gf.transform_points(list(xs[:3]), xs[3], backend=backend), chain + [points], upstream)
        check(y, y_ref, TOL[dtype], "transform_points")
        for i, (a, b) in enumerate(zip(g, g_ref)):
            check(a, b, TOL[dtype] if dtype == torch.float64 else 1e-5, f"transform_points grad {i} (batch {batch})")


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compose(rng, d, dtype):
    chain = make_chain(rng, d, randint(rng, 1, 3), randint(rng, 1, 4), dtype)
    shape = random_shape(rng, d, 2, 9)
    check(gf.compose(chain, shape, backend="cuda"), gf.compose(chain, shape, backend="torch"), TOL[dtype], "compose")


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_warp(rng, d, dtype):
    for regime in regimes(dtype):
        for coarse_image in (False, True):
            batch = randint(rng, 1, 3)
            chain = make_chain(rng, d, batch, randint(rng, 1, 4), dtype, regime)
            image_batch = batch if coin(rng) else 1
            if coarse_image:  # many grid points per image cell: aggregated image-gradient atomics
                image_shape, shape = random_shape(rng, d, 2, 4), random_shape(rng, d, 12, 30 if d == 2 else 14)
            else:
                image_shape, shape = random_shape(rng, d, 2, 9), random_shape(rng, d, 2, 9)
            image = cuda(rand_uniform(rng, (image_batch, randint(rng, 1, 4), *image_shape), dtype=dtype))
            k = len(chain)
            upstream = cuda(torch.randn(batch, image.shape[1], *shape, generator=rng, dtype=torch.float64).to(dtype))
            (y, g), (y_ref, g_ref) = run_both(
                lambda backend, *xs: gf.warp(xs[k], list(xs[:k]), shape=shape, backend=backend), chain + [image],
                upstream)
            assert y.shape == (batch, image.shape[1], *shape) and y.dtype == dtype
            check(y, y_ref, TOL[dtype], f"warp {regime}")
            for i, (a, b) in enumerate(zip(g, g_ref)):
                check(a, b, TOL[dtype], f"warp grad {i} {regime} coarse_image={coarse_image}")
    image = cuda(rand_uniform(rng, (1, 2, *random_shape(rng, d, 2, 7)), dtype=dtype))
    chain = make_chain(rng, d, 2, 2, dtype)
    check(gf.warp(image, chain, backend="cuda"), gf.warp(image, chain, backend="torch"), TOL[dtype], "warp (own grid)")


@pytest.mark.parametrize("d", [2, 3])
def test_warp_non_finite_map(d):
    """A NaN or infinite displacement gives a NaN warped value, as in the reference."""
    field = torch.zeros(1, d, *([3] * d), dtype=torch.float32, device=DEV)
    field[(0, 0) + (1,) * d] = float("nan")
    field[(0, 1) + (2,) * d] = float("inf")
    image = torch.rand(1, 2, *([5] * d), device=DEV)
    got = gf.warp(image, [field], backend="cuda")
    ref = gf.warp(image, [field], backend="torch")
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.isnan(got).any()
    check(torch.nan_to_num(got), torch.nan_to_num(ref), 1e-5, "warp finite part")


# ---- penalties -----------------------------------------------------------------------------------


def penalty_pair(rng, d, dtype, regime="typical", lo=2, hi=7):
    batch = randint(rng, 1, 3)
    ab = make_chain(rng, d, batch, randint(rng, 1, 4), dtype, regime, lo, hi)
    ba = make_chain(rng, d, batch, randint(rng, 1, 4), dtype, regime, lo, hi)
    if batch > 1 and coin(rng, 0.3):
        ba = [f[:1].contiguous() for f in ba]
    return ab, ba


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradicon_loss(rng, d, dtype, stride):
    for regime in regimes(dtype):
        ab, ba = penalty_pair(rng, d, dtype, regime)
        shape = random_shape(rng, d, 3, 12 if d == 2 else 8)
        noise = cuda(torch.randn(1, d, *R.loss_points_shape(shape, stride), generator=rng,
                                 dtype=torch.float64).to(dtype))
        symmetric = coin(rng)
        noise_scale = None if coin(rng) else float(rand_uniform(rng, (1,), 0, 0.2))
        k = len(ab)

        def fn(backend, *xs):
            return gf.gradicon_loss(list(xs[:k]), list(xs[k:]), shape=shape, stride=stride,
                                    noise=noise.to(xs[0].dtype), noise_scale=noise_scale, symmetric=symmetric,
                                    backend=backend)

        (l, g), _ = run_both(fn, ab + ba)
        assert l.shape == () and l.dtype == dtype and l.is_cuda
        what = f"gradicon {regime} stride={stride} symmetric={symmetric} noise_scale={noise_scale}"
        check_fd((l, list(g)), ab + ba, what, n_ab=k, shape=shape, stride=stride, noise=noise,
                 noise_scale=noise_scale, symmetric=symmetric)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradicon_loss_protocol_resolutions(rng, d, dtype, stride):
    """Fields at 1/4, 1/2 and full resolution of the loss grid, batch 2: coarse fields take the
    aggregated scatter, fine ones the plain one."""
    shape = (40, 36) if d == 2 else (18, 16, 20)
    ab, ba = protocol_chain(rng, d, 2, shape, dtype), protocol_chain(rng, d, 2, shape, dtype)
    noise = cuda(torch.randn(1, d, *R.loss_points_shape(shape, stride), generator=rng, dtype=torch.float64).to(dtype))

    def fn(backend, *xs):
        return gf.gradicon_loss(list(xs[:4]), list(xs[4:]), shape=shape, stride=stride, noise=noise.to(xs[0].dtype),
                                backend=backend)

    (l, g), _ = run_both(fn, ab + ba)
    check_fd((l, list(g)), ab + ba, "gradicon protocol", n_ab=4, shape=shape, stride=stride, noise=noise)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradicon_loss_and_grad(rng, d, dtype):
    """The one-pass op (loss and unit-upstream gradients together) equals the two-pass ops."""
    ab, ba = penalty_pair(rng, d, dtype)
    shape = random_shape(rng, d, 3, 12 if d == 2 else 8)
    ops = torch.ops.gradicon_fast
    for stride in (1, 2):
        noise = cuda(torch.randn(1, d, *R.loss_points_shape(shape, stride), generator=rng, dtype=torch.float64)
                     .to(dtype))
        for noise_arg, seed in ((noise, 0), (None, 12345)):
            args = (list(shape), stride, noise_arg, seed, 1e-3, stride / shape[-1])
            needs_ab = [True] * len(ab)
            needs_ba = [coin(rng) for _ in ba]
            loss, g_ab, g_ba = ops.gradicon_loss_and_grad(ab, ba, *args, needs_ab, needs_ba)
            expected = ops.gradicon_loss(ab, ba, *args)
            assert torch.equal(loss, expected)  # the same per-point sums, reduced in the same order
            e_ab, e_ba = ops.gradicon_loss_backward(torch.ones_like(expected), ab, ba, *args, needs_ab, needs_ba)
            check(list(g_ab), list(e_ab), 1e-12 if dtype == torch.float64 else 1e-6, "loss_and_grad AB")
            for g, e, n in zip(g_ba, e_ba, needs_ba):
                assert g.numel() == 0 if not n else g.shape == e.shape
                if n:
                    check(g, e, 1e-12 if dtype == torch.float64 else 1e-6, "loss_and_grad BA")


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradicon_analytic_loss(rng, d, dtype, stride):
    """mode="analytic": the exact Jacobian penalty (values 1e-5 / gradients 1e-4 in float32, as on the CPU)."""
    for regime in regimes(dtype):
        ab, ba = penalty_pair(rng, d, dtype, regime)
        shape = random_shape(rng, d, 3, 12 if d == 2 else 8)
        noise = cuda(torch.randn(1, d, *R.loss_points_shape(shape, stride), generator=rng,
                                 dtype=torch.float64).to(dtype))
        symmetric = coin(rng)
        k = len(ab)
        (l, g), (l_ref, g_ref) = run_both(
            lambda backend, *xs: gf.gradicon_loss(list(xs[:k]), list(xs[k:]), shape=shape, stride=stride, noise=noise,
                                                  noise_scale=0.15, symmetric=symmetric, mode="analytic",
                                                  backend=backend), ab + ba)
        assert l.shape == () and l.dtype == dtype and l.is_cuda
        what = f"analytic gradicon {regime} stride={stride} symmetric={symmetric}"
        check(l, l_ref, TOL[dtype], what)
        check(list(g), list(g_ref), 1e-10 if dtype == torch.float64 else 1e-4, what + " grads")


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_icon_loss(rng, d, dtype):
    for regime in regimes(dtype):
        ab, ba = penalty_pair(rng, d, dtype, regime)
        shape = random_shape(rng, d, 3, 12 if d == 2 else 8)
        noise = cuda(torch.randn(1, d, *shape, generator=rng, dtype=torch.float64).to(dtype))
        noise_scale = None if coin(rng) else float(rand_uniform(rng, (1,), 0, 0.2))
        k = len(ab)
        (l, g), (l_ref, g_ref) = run_both(
            lambda backend, *xs: gf.icon_loss(list(xs[:k]), list(xs[k:]), shape=shape, noise=noise,
                                              noise_scale=noise_scale, backend=backend), ab + ba)
        assert l.shape == () and l.dtype == dtype and l.is_cuda
        check(l, l_ref, TOL[dtype], f"icon {regime}")
        check(list(g), list(g_ref), FD_TOL[dtype], f"icon grads {regime}")


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_seeded_noise_matches_reference(rng, d, dtype, stride):
    """Without explicit noise the kernels draw it from the seed in forward and again in backward: the
    reference given normal_noise(seed) (on the GPU: the same device math) gives the same loss and
    gradients; with the CPU op's noise, the same to the float rounding of log/sin/cos."""
    ab, ba = penalty_pair(rng, d, dtype)
    shape = random_shape(rng, d, 3, 10 if d == 2 else 7)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    points_shape = R.loss_points_shape(shape, stride)
    k = len(ab)
    for op in ("gradicon", "analytic", "icon"):
        if op == "icon" and stride != 1:
            continue
        scale = stride / shape[-1]

        def seeded(backend, *xs):
            if op == "gradicon":
                return fused.gradicon_loss(list(xs[:k]), list(xs[k:]), shape, stride, None, seed, 1e-3, scale)
            if op == "analytic":
                return fused.gradicon_analytic_loss(list(xs[:k]), list(xs[k:]), shape, stride, None, seed, scale)
            return fused.icon_loss(list(xs[:k]), list(xs[k:]), shape, None, seed, scale)

        def explicit(noise):
            def fn(backend, *xs):
                if op in ("gradicon", "analytic"):
                    return gf.gradicon_loss(list(xs[:k]), list(xs[k:]), shape=shape, stride=stride,
                                            noise=noise.to(xs[0].dtype),
                                            noise_scale=scale, mode="fd" if op == "gradicon" else "analytic",
                                            backend=backend)
                return gf.icon_loss(list(xs[:k]), list(xs[k:]), shape=shape, noise=noise, noise_scale=scale,
                                    backend=backend)
            return fn

        gpu_noise = fused.normal_noise(seed, d, points_shape, dtype=dtype, device=DEV)
        cpu_noise = fused.normal_noise(seed, d, points_shape, dtype=dtype).to(DEV)
        xs = leaves(ab + ba)
        l = seeded("cuda", *xs)
        g = torch.autograd.grad(l, xs)
        tol = FD_TOL[dtype] if op == "gradicon" else TOL[dtype]
        grad_tol = FD_TOL[dtype] if op != "analytic" or dtype == torch.float64 else 1e-4
        for noise, extra in ((gpu_noise, 0.0), (cpu_noise, 1e-4)):
            if op == "gradicon":
                check_fd((l.detach(), list(g)), ab + ba, f"{op} seeded", n_ab=k, shape=shape, stride=stride,
                         noise=noise, noise_scale=scale, slack=extra)
                continue
            xs = leaves(ab + ba)
            l_ref = explicit(noise)("torch", *xs)
            g_ref = torch.autograd.grad(l_ref, xs)
            check(l.detach(), l_ref.detach(), tol + extra, f"{op} seeded loss")
            check(list(g), list(g_ref), grad_tol + extra, f"{op} seeded grads")
        # the kernel's own draws equal the materialised noise exactly: same loss bit for bit
        xs = leaves(ab + ba)
        assert torch.equal(l.detach(), explicit(gpu_noise)("cuda", *xs).detach())


@pytest.mark.parametrize("d", [2, 3])
def test_partial_requires_grad(rng, d):
    """Only some inputs require grad: their gradients match, the others get none."""
    ab, ba = penalty_pair(rng, d, torch.float64)
    ab = ab + cuda([random_field(rng, 1, random_shape(rng, d, 2, 6), 0.05)])
    shape = random_shape(rng, d, 3, 6)
    noise = cuda(torch.randn(1, d, *shape, generator=rng, dtype=torch.float64))
    sparse_noise = noise[(slice(None), slice(None)) + (slice(None, None, 2),) * d]
    points = cuda(random_points(rng, 1, d, (9,)))
    image = cuda(rand_uniform(rng, (1, 2, *random_shape(rng, d, 2, 6))))
    k = len(ab)
    for grad_fields in ((0, k), (0,), (k,), (k - 1,), ()):
        grads = {}
        for backend in ("torch", "cuda"):
            xs = [t.detach().clone() for t in ab + ba]
            for i in grad_fields:
                xs[i].requires_grad_(True)
            img = image.clone().requires_grad_(not grad_fields)
            pts = points.clone().requires_grad_(True)
            total = (gf.gradicon_loss(xs[:k], xs[k:], shape=shape, stride=2, noise=sparse_noise, backend=backend)
                     + gf.gradicon_loss(xs[:k], xs[k:], shape=shape, noise=noise, mode="analytic", backend=backend)
                     + gf.icon_loss(xs[:k], xs[k:], shape=shape, noise=noise, backend=backend)
                     + gf.transform_points(xs[:k], pts, backend=backend).square().sum()
                     + gf.warp(img, xs[k:], backend=backend).square().sum())
            total.backward()
            assert all(x.grad is None for i, x in enumerate(xs) if i not in grad_fields)
            assert (img.grad is None) == bool(grad_fields)
            grads[backend] = [xs[i].grad for i in grad_fields] + [pts.grad] + ([img.grad] if not grad_fields else [])
        check(grads["cuda"], grads["torch"], 1e-10, f"partial grads {grad_fields}")


@pytest.mark.parametrize("d", [2, 3])
def test_longest_chains(rng, d):
    """Eight fields per chain (the maximum), sixteen in the composed pair."""
    ab = make_chain(rng, d, 2, 8, torch.float64)
    ba = make_chain(rng, d, 2, 8, torch.float64)
    shape = random_shape(rng, d, 3, 6)
    noise = cuda(torch.randn(1, d, *shape, generator=rng, dtype=torch.float64))
    for fn in (lambda backend, *xs: gf.gradicon_loss(list(xs[:8]), list(xs[8:]), shape=shape, noise=noise,
                                                     symmetric=True, backend=backend),
               lambda backend, *xs: gf.gradicon_loss(list(xs[:8]), list(xs[8:]), shape=shape, noise=noise,
                                                     mode="analytic", backend=backend),
               lambda backend, *xs: gf.icon_loss(list(xs[:8]), list(xs[8:]), shape=shape, noise=noise,
                                                 backend=backend)):
        (l, g), (l_ref, g_ref) = run_both(fn, ab + ba)
        check(l, l_ref, 1e-10, "longest chains")
        check(list(g), list(g_ref), 1e-10, "longest chains grads")


@pytest.mark.parametrize("d", [2, 3])
def test_non_contiguous_inputs(rng, d):
    """Permuted, sliced and expanded views give the same results as their contiguous copies."""
    shape = random_shape(rng, d, 3, 6)
    permuted = cuda(random_field(rng, 2, tuple(reversed(shape)), 0.08)).permute(0, 1, *range(d + 1, 1, -1))
    sliced = cuda(random_field(rng, 3, shape, 0.08))[::2]
    expanded = cuda(random_field(rng, 1, random_shape(rng, d, 2, 5), 0.05)).expand(2, -1, *([-1] * d))
    chain = [permuted, sliced, expanded]
    points = cuda(random_points(rng, 2, d, (4, 6))).transpose(2, 3)
    image = cuda(rand_uniform(rng, (2, *shape, 3))).movedim(-1, 1)
    noise = cuda(torch.randn(1, d, *reversed(shape), generator=rng, dtype=torch.float64)).permute(
        0, 1, *range(d + 1, 1, -1))
    k = len(chain)
    for fn in (
        lambda backend, *xs: gf.transform_points(list(xs[:k]), xs[k], backend=backend),
        lambda backend, *xs: gf.warp(xs[k + 1], list(xs[:k]), shape=shape, backend=backend),
        lambda backend, *xs: gf.gradicon_loss(list(xs[:2]), list(xs[2:k]), shape=shape, noise=noise, backend=backend),
        lambda backend, *xs: gf.icon_loss(list(xs[:1]), list(xs[1:k]), shape=shape, noise=noise, backend=backend),
    ):
        views = chain + [points, image]

        def run(backend, use_views):
            xs = [(v if use_views else v.contiguous()).detach().requires_grad_(True) for v in views]
            y = fn(backend, *xs)
            grads = torch.autograd.grad(y.square().sum(), xs, allow_unused=True)
            return y.detach(), [g for g in grads if g is not None]

        y_view, g_view = run("cuda", True)
        y_ref, g_ref = run("torch", False)
        check(y_view, y_ref, 1e-10, "non-contiguous values")
        check(g_view, g_ref, 1e-10, "non-contiguous grads")


# ---- half precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fields(rng, d, dtype):
    """16-bit fields are computed in float32: the same as the float32 kernels on the upcast inputs,
    up to the rounding of each output to 16 bits."""
    tol = HALF_TOL[dtype]
    ab = [f.to(dtype) for f in make_chain(rng, d, 2, 3, torch.float32)]
    ba = [f.to(dtype) for f in make_chain(rng, d, 2, 2, torch.float32)]
    shape = random_shape(rng, d, 4, 9)
    points = cuda(random_points(rng, 2, d, (17, 5))).to(dtype)
    image = cuda(rand_uniform(rng, (1, 2, *random_shape(rng, d, 3, 8)))).to(dtype)
    noise = cuda(torch.randn(1, d, *shape, generator=rng)).to(dtype)
    sparse = noise[(slice(None), slice(None)) + (slice(None, None, 2),) * d]
    k = len(ab)
    fns = {
        "transform_points": lambda *xs: gf.transform_points(list(xs[:k]), xs[-2], backend="cuda"),
        "warp": lambda *xs: gf.warp(xs[-1], list(xs[k:-2]), shape=shape, backend="cuda"),
        "gradicon": lambda *xs: gf.gradicon_loss(list(xs[:k]), list(xs[k:-2]), shape=shape, stride=2,
                                                 noise=sparse if xs[0].dtype == dtype else sparse.float(),
                                                 backend="cuda"),
        "analytic": lambda *xs: gf.gradicon_loss(list(xs[:k]), list(xs[k:-2]), shape=shape, mode="analytic",
                                                 noise=noise if xs[0].dtype == dtype else noise.float(),
                                                 backend="cuda"),
        "icon": lambda *xs: gf.icon_loss(list(xs[:k]), list(xs[k:-2]), shape=shape,
                                         noise=noise if xs[0].dtype == dtype else noise.float(), backend="cuda"),
    }
    inputs = ab + ba + [points, image]
    for name, fn in fns.items():
        half = leaves(inputs)
        single = leaves([t.float() for t in inputs])
        y_half, y_single = fn(*half), fn(*single)
        assert y_half.dtype == dtype
        # scalar losses: a large upstream gradient keeps the 16-bit gradients clear of subnormals
        upstream = torch.randn(y_single.shape, device=DEV) if y_single.dim() else torch.tensor(1e3, device=DEV)
        g_half = torch.autograd.grad(y_half, half, upstream.to(dtype), allow_unused=True)
        g_single = torch.autograd.grad(y_single, single, upstream, allow_unused=True)
        check(y_half.float(), y_single, tol, f"{name} {dtype} value")
        for i, (a, b) in enumerate(zip(g_half, g_single)):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == dtype
                check(a.float(), b, tol, f"{name} {dtype} grad {i}")


# ---- launch mechanics ----------------------------------------------------------------------------


def test_deterministic_loss(rng):
    """The loss reduction is in a fixed order: the same value bit for bit on every call."""
    ab, ba = penalty_pair(rng, 3, torch.float32)
    shape = (9, 8, 10)
    values = {gf.gradicon_loss(ab, ba, shape=shape, stride=2, generator=torch.Generator().manual_seed(3),
                               backend="cuda").item() for _ in range(5)}
    assert len(values) == 1
    values = {gf.icon_loss(ab, ba, shape=shape, generator=torch.Generator().manual_seed(3),
                           backend="cuda").item() for _ in range(5)}
    assert len(values) == 1


def test_current_stream_and_device(rng):
    """The kernels run on the current stream: results are correct when consumed on that stream."""
    ab, ba = penalty_pair(rng, 3, torch.float64)
    shape = (7, 6, 5)
    noise = cuda(torch.randn(1, 3, *shape, generator=rng, dtype=torch.float64))
    expected = gf.gradicon_loss(ab, ba, shape=shape, noise=noise, backend="torch")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10_000_000)  # keep the stream busy: a launch on another stream would race
        got = gf.gradicon_loss(ab, ba, shape=shape, noise=noise, backend="cuda")
        same = got.clone()
    torch.cuda.current_stream().wait_stream(stream)
    check(same, expected, 1e-10, "loss on a side stream")


def test_rejects_tensors_on_other_devices():
    field = torch.zeros(1, 2, 3, 3, device=DEV)
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.gradicon_fast.transform_points([field], torch.zeros(1, 2, 5))
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.gradicon_fast.warp(torch.zeros(1, 1, 4, 4), [field], [4, 4])
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.gradicon_fast.gradicon_loss([field], [field.cpu()], [4, 4], 1, None, 0, 1e-3, 0.25)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="is on"):
            torch.ops.gradicon_fast.icon_loss([field], [field.to("cuda:1")], [4, 4], None, 0, 0.25)


# ---- 64-bit indexing -----------------------------------------------------------------------------


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.skipif(_REASON is not None or _free_gib() < 48, reason="needs a GPU with 48 GiB free")
def test_transform_points_past_int32():
    """More than 2^31 point coordinates: flat indices past int32 (values and point gradients checked
    on a sample of points; transform_points is pointwise, so the reference runs on the sample)."""
    n = 2**31 // 3 + 1000
    torch.manual_seed(0)
    chain = [(torch.rand(1, 3, 5, 6, 7, device=DEV) - 0.5) * 0.1]
    points = torch.rand(1, 3, n, device=DEV)
    points.requires_grad_(True)
    y = gf.transform_points(chain, points, backend="cuda")
    (g,) = torch.autograd.grad(y, points, torch.ones_like(y))
    sample = torch.cat([torch.arange(0, 1000, device=DEV), torch.randint(0, n, (10_000,), device=DEV),
                        torch.arange(n - 1000, n, device=DEV)])
    p = points.detach()[:, :, sample].clone().requires_grad_(True)
    y_ref = gf.transform_points(chain, p, backend="torch")
    (g_ref,) = torch.autograd.grad(y_ref, p, torch.ones_like(y_ref))
    check(y[:, :, sample].detach(), y_ref.detach(), 1e-6, "values past int32")
    check(g[:, :, sample], g_ref, 1e-5, "point gradients past int32")


@pytest.mark.skipif(_REASON is not None or _free_gib() < 64, reason="needs a GPU with 64 GiB free")
def test_warp_image_past_int32():
    """An image of more than 2^31 voxels: element offsets past int32 in sampling and scatter.

    Values against the reference. The image gradient by the adjoint identity
    <warp(v), u> = <v, ∂warp/∂image^T u> for a random v (torch's own grid_sample backward fails
    with an illegal memory access on such an image, torch 2.11 + CUDA 13), and on the far corner,
    where offsets exceed 2^31: the field pushes the last grid point past it, so it samples the
    last voxel alone.
    """
    torch.manual_seed(0)
    s = 1300  # 1300^3 = 2.2e9 voxels
    image = torch.rand(1, 1, s, s, s, device=DEV)
    field = (torch.rand(1, 3, 4, 5, 6, device=DEV) - 0.5) * 0.02
    field[..., -1, -1, -1] = 0.01
    chain = [field]
    shape = (9, 10, 11)
    upstream = torch.randn(1, 1, *shape, device=DEV)
    img = image.requires_grad_(True)
    y = gf.warp(img, chain, shape=shape, backend="cuda")
    (g,) = torch.autograd.grad(y, img, upstream)
    img.requires_grad_(False)
    check(y.detach(), gf.warp(image, chain, shape=shape, backend="torch"), 1e-5, "warp values past int32")
    flat = g.view(-1)
    touched = flat.nonzero().squeeze(1)
    assert 0 < touched.numel() <= 8 * upstream.numel()
    del g
    v = torch.randn_like(image)
    lhs = (gf.warp(v, chain, shape=shape, backend="cuda").double() * upstream.double()).sum()
    rhs = (v.view(-1)[touched].double() * flat[touched].double()).sum()
    assert abs(lhs - rhs) <= 1e-5 * (upstream.double().abs().sum() * v.abs().max()), (lhs.item(), rhs.item())
    assert flat[-1] == upstream[0, 0, -1, -1, -1]  # the far corner (offset 2.2e9 - 1) gets the last point alone
