"""The fused CPU kernels (backend="cpu") against the reference (backend="torch"): values and gradients.

Fresh random inputs every run (the `rng` fixture prints its seed): chains of 1-4 fields at mixed,
non-cubic resolutions, batch 1-3 with fields that broadcast over the batch, 2D and 3D, points
outside [0, 1], explicit noise for the penalties.

Tolerances (relative): float64 1e-10 everywhere. float32 1e-5 for transform_points and warp (values
and gradients) and ICON values, 1e-3 (norm-wise) for ICON's gradients. Finite-difference GradICON
goes through conftest.check_fd: e(x) - e(x + δ ê_k) divides float32 rounding of the coordinates
(~6e-8) by δ = 1e-3, so even the float32 reference is ~1e-4 away from the exact value; check_fd
compares each gradient entry with the float64 penalty, except the few next to a kink of a field
that float32 rounding puts on either side. Float32 inputs are kept well conditioned (rough fields
of typical magnitude, or large but smooth ones): a chain of rough large fields multiplies
coordinate rounding by the product of their Jacobians.
"""

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import reference as R

from conftest import (
    FD_TOL,
    check_fd,
    leaves,
    rand_uniform,
    random_field,
    random_points,
    random_shape,
    relative_error,
    requires_cpu_kernels,
    smooth_field,
)

pytestmark = requires_cpu_kernels

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]


def randint(rng, lo, hi):
    """An int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=rng))


def make_chain(rng, d, batch, length, dtype, regime):
    """A chain of ``length`` fields at random resolutions; with batch > 1 some fields have batch 1.

    regime "typical": rough fields of magnitude 0.02-0.1; "large": smooth fields of magnitude 0.3-0.5
    that push points well outside [0, 1]; "rough-large" (float64 only): rough fields of magnitude 0.5.
    """
    chain = []
    for i in range(length):
        shape = random_shape(rng, d, 2, 7)
        b = batch if (batch == 1 or i == 0 or torch.rand(1, generator=rng).item() < 0.5) else 1
        if regime == "typical":
            chain.append(random_field(rng, b, shape, float(rand_uniform(rng, (1,), 0.02, 0.1)), dtype))
        elif regime == "large":
            chain.append(smooth_field(rng, b, shape, float(rand_uniform(rng, (1,), 0.3, 0.5)), dtype))
        else:
            chain.append(random_field(rng, b, shape, 0.5, dtype))
    if batch > 1 and length > 1 and all(f.shape[0] == batch for f in chain):
        chain[-1] = chain[-1][:1].contiguous()  # at least one field broadcasts over the batch
    return chain


def regimes(dtype):
    return ["typical", "large", "rough-large"] if dtype == torch.float64 else ["typical", "large"]


def assert_scaled_close(got, expected, rtol, what):
    """max |got - expected| <= rtol * max |expected|, per tensor."""
    if isinstance(got, torch.Tensor):
        got, expected = [got], [expected]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape and g.dtype == e.dtype, f"{what}[{i}]: {g.shape}/{g.dtype} vs {e.shape}/{e.dtype}"
        scale = e.abs().max().item()
        err = (g - e).abs().max().item()
        assert err <= rtol * max(scale, 1e-30), f"{what}[{i}]: max error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


def run_both(fn, inputs, upstream=None):
    """(value, gradients) of fn(backend, *leaves) for "torch" and "cpu", same upstream gradient."""
    out = {}
    for backend in ("torch", "cpu"):
        xs = leaves(inputs)
        y = fn(backend, *xs)
        grads = torch.autograd.grad(y, xs, upstream if upstream is not None else torch.ones_like(y))
        out[backend] = (y.detach(), grads)
    return out["cpu"], out["torch"]


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transform_points(rng, d, dtype):
    for regime in regimes(dtype):
        for _ in range(2):
            batch = randint(rng, 1, 3)
            chain = make_chain(rng, d, batch, randint(rng, 1, 4), dtype, regime)
            points_batch = batch if torch.rand(1, generator=rng).item() < 0.5 else 1
            points = random_points(rng, points_batch, d, (randint(rng, 2, 6), randint(rng, 1, 5)), dtype=dtype)
            k = len(chain)
            upstream = torch.randn(batch, d, *points.shape[2:], generator=rng, dtype=torch.float64).to(dtype)
            (y_cpu, g_cpu), (y_ref, g_ref) = run_both(
                lambda backend, *xs: gf.transform_points(list(xs[:k]), xs[k], backend=backend), chain + [points],
                upstream)
            assert y_cpu.shape == (batch, d, *points.shape[2:])
            assert_scaled_close(y_cpu, y_ref, TOL[dtype], f"transform_points {regime}")
            assert_scaled_close(list(g_cpu), list(g_ref), TOL[dtype], f"transform_points grads {regime}")


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compose(rng, d, dtype):
    batch = randint(rng, 1, 3)
    chain = make_chain(rng, d, batch, randint(rng, 1, 4), dtype, "typical")
    shape = random_shape(rng, d, 2, 7)
    got = gf.compose(chain, shape, backend="cpu")
    assert_scaled_close(got, gf.compose(chain, shape, backend="torch"), TOL[dtype], "compose")


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_warp(rng, d, dtype):
    for regime in regimes(dtype):
        for channels in (1, 3):
            batch = randint(rng, 1, 3)
            chain = make_chain(rng, d, batch, randint(rng, 1, 4), dtype, regime)
            image_batch = batch if torch.rand(1, generator=rng).item() < 0.5 else 1
            image_shape = random_shape(rng, d, 2, 7)
            image = rand_uniform(rng, (image_batch, channels, *image_shape), dtype=dtype)
            shape = random_shape(rng, d, 2, 7)
            while shape == image_shape:
                shape = random_shape(rng, d, 2, 7)
            k = len(chain)
            upstream = torch.randn(batch, image.shape[1], *shape, generator=rng, dtype=torch.float64).to(dtype)
            (y_cpu, g_cpu), (y_ref, g_ref) = run_both(
                lambda backend, *xs: gf.warp(xs[k], list(xs[:k]), shape=shape, backend=backend), chain + [image],
                upstream)
            assert y_cpu.shape == (batch, image.shape[1], *shape)
            assert_scaled_close(y_cpu, y_ref, TOL[dtype], f"warp {regime}")
            assert_scaled_close(list(g_cpu), list(g_ref), TOL[dtype], f"warp grads {regime}")
    # default output grid: the image's own
    image = rand_uniform(rng, (1, 2, *random_shape(rng, d, 2, 7)), dtype=dtype)
    chain = make_chain(rng, d, 2, 2, dtype, "typical")
    assert_scaled_close(gf.warp(image, chain, backend="cpu"), gf.warp(image, chain, backend="torch"), TOL[dtype],
                        "warp (own grid)")


def penalty_pair(rng, d, dtype, regime):
    batch = randint(rng, 1, 3)
    ab = make_chain(rng, d, batch, randint(rng, 1, 4), dtype, regime)
    ba = make_chain(rng, d, batch, randint(rng, 1, 4), dtype, regime)
    if batch > 1 and torch.rand(1, generator=rng).item() < 0.3:
        ba = [f[:1].contiguous() for f in ba]  # a whole chain broadcasting over the batch
    return ab, ba


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradicon_loss(rng, d, dtype, stride):
    for i, regime in enumerate(regimes(dtype)):
        ab, ba = penalty_pair(rng, d, dtype, regime)
        shape = random_shape(rng, d, 3, 7)
        noise = torch.randn(1, d, *R.loss_points_shape(shape, stride), generator=rng, dtype=torch.float64).to(dtype)
        symmetric = i % 2 == 1
        noise_scale = None if torch.rand(1, generator=rng).item() < 0.5 else float(rand_uniform(rng, (1,), 0, 0.2))
        k = len(ab)
        (l_cpu, g_cpu), (l_ref, g_ref) = run_both(
            lambda backend, *xs: gf.gradicon_loss(list(xs[:k]), list(xs[k:]), shape=shape, stride=stride, noise=noise,
                                                  noise_scale=noise_scale, symmetric=symmetric, backend=backend),
            ab + ba)
        assert l_cpu.shape == () and l_cpu.dtype == dtype
        what = f"gradicon {regime} stride={stride} symmetric={symmetric} noise_scale={noise_scale}"
        check_fd((l_cpu, list(g_cpu)), ab + ba, what, n_ab=k, shape=shape, stride=stride, noise=noise,
                 noise_scale=noise_scale, symmetric=symmetric)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradicon_fused_and_two_pass_agree(rng, d, dtype, monkeypatch):
    """The CPU GradICON's one-pass loss-and-gradient path equals its forward + backward ops."""
    from gradicon_fast import ops

    if not hasattr(ops, "fuse_cpu_loss_and_grad"):
        pytest.skip("no fused loss-and-gradient path")
    ab, ba = penalty_pair(rng, d, dtype, "typical")
    shape = random_shape(rng, d, 3, 7)
    k = len(ab)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(ops, "fuse_cpu_loss_and_grad", fused)
        for stride in (1, 2):
            xs = leaves(ab + ba)
            loss = gf.gradicon_loss(xs[:k], xs[k:], shape=shape, stride=stride, symmetric=True,
                                    generator=torch.Generator().manual_seed(stride), backend="cpu")
            results[fused, stride] = (loss.detach(), torch.autograd.grad(3 * loss, xs))
    for stride in (1, 2):
        (l1, g1), (l2, g2) = results[True, stride], results[False, stride]
        # float32: the two paths round differently, and finite differences over δ amplify it
        assert relative_error(l1, l2) <= FD_TOL[dtype]
        assert relative_error(list(g1), list(g2)) <= FD_TOL[dtype]


@pytest.mark.parametrize("d", [2, 3])
def test_gradicon_loss_other_delta(rng, d):
    ab, ba = penalty_pair(rng, d, torch.float64, "typical")
    shape = random_shape(rng, d, 3, 7)
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64)
    k = len(ab)
    (l_cpu, g_cpu), (l_ref, g_ref) = run_both(
        lambda backend, *xs: gf.gradicon_loss(list(xs[:k]), list(xs[k:]), shape=shape, noise=noise, delta=0.02,
                                              backend=backend), ab + ba)
    assert relative_error(l_cpu, l_ref) <= 1e-10
    assert relative_error(list(g_cpu), list(g_ref)) <= 1e-10


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_icon_loss(rng, d, dtype):
    for regime in regimes(dtype):
        ab, ba = penalty_pair(rng, d, dtype, regime)
        shape = random_shape(rng, d, 3, 7)
        noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64).to(dtype)
        noise_scale = None if torch.rand(1, generator=rng).item() < 0.5 else float(rand_uniform(rng, (1,), 0, 0.2))
        k = len(ab)
        (l_cpu, g_cpu), (l_ref, g_ref) = run_both(
            lambda backend, *xs: gf.icon_loss(list(xs[:k]), list(xs[k:]), shape=shape, noise=noise,
                                              noise_scale=noise_scale, backend=backend), ab + ba)
        assert l_cpu.shape == () and l_cpu.dtype == dtype
        assert relative_error(l_cpu, l_ref) <= TOL[dtype], f"icon {regime}: {l_cpu.item()} vs {l_ref.item()}"
        assert relative_error(list(g_cpu), list(g_ref)) <= FD_TOL[dtype], f"icon grads {regime}"


@pytest.mark.parametrize("d", [2, 3])
def test_partial_requires_grad(rng, d):
    """Only some inputs require grad: their gradients match, the others get none."""
    ab, ba = penalty_pair(rng, d, torch.float64, "typical")
    ab = ab + [random_field(rng, 1, random_shape(rng, d, 2, 6), 0.05)]
    shape = random_shape(rng, d, 3, 6)
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64)
    sparse_noise = noise[(slice(None), slice(None)) + (slice(None, None, 2),) * d]
    points = random_points(rng, 1, d, (9,))
    image = rand_uniform(rng, (1, 2, *random_shape(rng, d, 2, 6)))
    grads = {}
    for backend in ("torch", "cpu"):
        xs = [t.detach().clone() for t in ab + ba]
        for i in (0, len(ab)):  # the first field of each chain
            xs[i].requires_grad_(True)
        img = image.clone().requires_grad_(False)
        pts = points.clone().requires_grad_(True)
        k = len(ab)
        total = (gf.gradicon_loss(xs[:k], xs[k:], shape=shape, stride=2, noise=sparse_noise, backend=backend)
                 + gf.icon_loss(xs[:k], xs[k:], shape=shape, noise=noise, backend=backend)
                 + gf.transform_points(xs[:k], pts, backend=backend).square().sum()
                 + gf.warp(img, xs[k:], backend=backend).square().sum())
        total.backward()
        assert all(x.grad is None for i, x in enumerate(xs) if i not in (0, k))
        assert img.grad is None
        grads[backend] = [xs[0].grad, xs[k].grad, pts.grad]
    assert relative_error(grads["cpu"], grads["torch"]) <= 1e-10


@pytest.mark.parametrize("d", [2, 3])
def test_non_contiguous_inputs(rng, d):
    """Permuted, sliced and expanded views give the same results as their contiguous copies."""
    shape = random_shape(rng, d, 3, 6)
    base = random_field(rng, 2, tuple(reversed(shape)), 0.08)
    permuted = base.permute(0, 1, *range(d + 1, 1, -1))  # spatial axes reversed: a non-contiguous view
    sliced = random_field(rng, 3, shape, 0.08)[::2]       # batch 2, strided
    expanded = random_field(rng, 1, random_shape(rng, d, 2, 5), 0.05).expand(2, -1, *([-1] * d))
    chain = [permuted, sliced, expanded]
    assert not any(f.is_contiguous() for f in chain)
    points = random_points(rng, 2, d, (4, 6)).transpose(2, 3)
    image = rand_uniform(rng, (2, *shape, 3)).movedim(-1, 1)  # channels last in memory
    noise = torch.randn(1, d, *reversed(shape), generator=rng, dtype=torch.float64).permute(0, 1, *range(d + 1, 1, -1))
    assert not (points.is_contiguous() or image.is_contiguous() or noise.is_contiguous())
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

        y_view, g_view = run("cpu", True)
        y_ref, g_ref = run("torch", False)
        assert relative_error(y_view, y_ref) <= 1e-10
        assert relative_error(g_view, g_ref) <= 1e-10


@pytest.mark.parametrize("d", [2, 3])
def test_longest_chains(rng, d):
    """Eight fields per chain (the maximum), sixteen in the composed pair."""
    ab = make_chain(rng, d, 2, 8, torch.float64, "typical")
    ba = make_chain(rng, d, 2, 8, torch.float64, "typical")
    shape = random_shape(rng, d, 3, 5)
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64)
    (l_cpu, g_cpu), (l_ref, g_ref) = run_both(
        lambda backend, *xs: gf.gradicon_loss(list(xs[:8]), list(xs[8:]), shape=shape, noise=noise, symmetric=True,
                                              backend=backend), ab + ba)
    assert relative_error(l_cpu, l_ref) <= 1e-10
    assert relative_error(list(g_cpu), list(g_ref)) <= 1e-10


# ---- threads must not race on gradient voxels ---------------------------------------------------------


def boundary_points(rng, rows, n, d, dtype=torch.float64):
    """Points whose first coordinate puts the first half of them in the cell just below row rows // 2 and
    the second half in the cell just above: with two threads each half is one thread's block, and both
    blocks touch gradient row rows // 2 (the first row the second block owns)."""
    h = 1 / (rows - 1)
    mid = rows // 2
    x0 = torch.cat([rand_uniform(rng, (n,), (mid - 0.9) * h, (mid - 0.1) * h),
                    rand_uniform(rng, (n,), (mid + 0.1) * h, (mid + 0.9) * h)])
    rest = rand_uniform(rng, (d - 1, 2 * n), 0, 1)
    return torch.cat([x0[None], rest]).unsqueeze(0).to(dtype)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least two intra-op threads")
def test_backward_threads_do_not_race(rng):
    """Gradient scatter must give the reference's result on every call, however the threads interleave.

    The points are laid out so that both parallel blocks add to the same gradient row unless the
    kernel defers the points that touch another block's rows; a lost update shows as a wrong sum.
    Repeated because a race only shows when the threads happen to run at the same time.
    """
    rows, n = 6, 1500
    field = random_field(rng, 1, (rows, 5), 0.05)
    points = boundary_points(rng, rows, n, 2)
    upstream = torch.randn(points.shape, generator=rng, dtype=torch.float64)
    f = leaves([field])
    expected, = torch.autograd.grad(gf.transform_points(f, points, backend="torch"), f, upstream)
    image = rand_uniform(rng, (1, 2, rows, 5))
    identity_chain = [torch.zeros(1, 2, 2, 2, dtype=torch.float64)]
    # warp by a zero field: the warped grid's points are the identity of `shape`, which puts
    # the points of the two blocks on both sides of the image's middle row as well
    shape = (2 * rows - 1, 301)
    up_warp = torch.randn(1, 2, *shape, generator=rng, dtype=torch.float64)
    img = leaves([image])
    expected_image, = torch.autograd.grad(gf.warp(img[0], identity_chain, shape=shape, backend="torch"), img, up_warp)
    wrong = 0
    for _ in range(150):
        f = leaves([field])
        got, = torch.autograd.grad(gf.transform_points(f, points, backend="cpu"), f, upstream)
        wrong += relative_error(got, expected) > 1e-12
        img = leaves([image])
        got_image, = torch.autograd.grad(gf.warp(img[0], identity_chain, shape=shape, backend="cpu"), img, up_warp)
        wrong += relative_error(got_image, expected_image) > 1e-12
    assert wrong == 0, f"{wrong} of 300 backward calls gave a wrong gradient"


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_gradient_buffers(rng, dtype):
    """Gradients of 4 MiB and more live in mappings of their own: fresh ones zeroed by the OS, not
    by a fill; freed ones kept and zeroed again for the next call of the same sizes.

    Two calls in a row (the second's buffers are the first's), against the reference.
    """
    side = 72 if dtype == torch.float32 else 58  # 4.5 MB and 4.7 MB of gradient: the mapped path
    shape = (side, side - 2, side)
    for _ in range(2):
        ab = [smooth_field(rng, 1, shape, 0.05, dtype), random_field(rng, 1, (5, 6, 4), 0.05, dtype)]
        ba = [random_field(rng, 1, (6, 5, 7), 0.05, dtype), smooth_field(rng, 1, shape, 0.05, dtype)]
        noise = torch.randn(1, 3, *R.loss_points_shape(shape, 2), generator=rng, dtype=torch.float64).to(dtype)
        def penalty(backend, *xs):
            return gf.gradicon_loss(list(xs[:2]), list(xs[2:]), shape=shape, stride=2, noise=noise.to(xs[0].dtype),
                                    backend=backend)

        (l_cpu, g_cpu), (l_ref, g_ref) = run_both(penalty, ab + ba)
        assert ab[0].numel() * ab[0].element_size() >= 4 << 20
        # float32 gradients at 24,000-45,000 points, entry by entry against the float64 penalty (check_fd)
        check_fd((l_cpu, list(g_cpu)), ab + ba, "large gradients", n_ab=2, shape=shape, stride=2, noise=noise)
        image = rand_uniform(rng, (1, 3, *shape), dtype=dtype)  # its gradient: mapped too
        (_, gw_cpu), (_, gw_ref) = run_both(lambda backend, img, f: gf.warp(img, [f], backend=backend),
                                            [image, ab[0]])
        # the image's gradient only: in float32 the field's, through a noise image at a million
        # points, differs from the reference's by up to 1e-3 where a coordinate rounds to either
        # side of a voxel boundary (on main as well)
        assert relative_error(gw_cpu[0], gw_ref[0]) <= TOL[dtype]
        del l_cpu, g_cpu, gw_cpu  # their mappings go back for the next round
