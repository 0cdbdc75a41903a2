"""The float32 GradICON CPU kernels come in three implementations (scalar, four-lane vectors,
eight-point AVX2 gathers) chosen at run time; each must match the reference, on values and
gradients, including the points that the parallel backward defers to its serial pass."""

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import ops, reference as R

from conftest import check_fd, requires_cpu_kernels

pytestmark = requires_cpu_kernels

PATHS = ["scalar", "lanes", "simd8"]


def _random_chain(rng, sizes, batch, d, scale):
    """Smooth random fields (noise on a grid a third as fine, upsampled), requiring grad."""
    chain = []
    for s in sizes:
        coarse = torch.randn(batch, d, *[max(2, (n + 2) // 3) for n in s], generator=rng)
        mode = "trilinear" if d == 3 else "bilinear"
        field = torch.nn.functional.interpolate(coarse, size=tuple(s), mode=mode, align_corners=True)
        chain.append((scale * field).requires_grad_())
    return chain


def _run(path, monkeypatch, fn):
    monkeypatch.setenv("GRADICON_FAST_CPU_KERNEL", path)
    try:
        return fn()
    except RuntimeError as exc:
        if "built without AVX2" in str(exc):
            pytest.skip("extension built without AVX2")
        raise


# Displacements up to ~0.1 of the domain push points past the border. check_fd compares with the
# float64 penalty entry by entry, except next to the kinks where float32 rounding decides a side.
CASES = [
    # d, chain_AB sizes, chain_BA sizes, loss grid, stride, batch, displacement scale
    (3, [(6, 7, 5), (19, 17, 21)], [(11, 9, 10)], (18, 20, 17), 2, 2, 0.05),
    (3, [(9, 8, 10)] * 3, [(5, 6, 4), (13, 12, 11)], (12, 11, 13), 1, 1, 0.1),
    (2, [(7, 9), (33, 29)], [(16, 15), (5, 4), (30, 31)], (31, 33), 1, 3, 0.05),
    (2, [(40, 37)], [(38, 41)], (41, 39), 2, 1, 0.12),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-stride{c[4]}-batch{c[5]}-scale{c[6]}")
def test_float32_paths_match_reference(path, case, rng, monkeypatch):
    d, sizes_ab, sizes_ba, shape, stride, batch, scale = case
    ab = _random_chain(rng, sizes_ab, batch, d, scale)
    ba = _random_chain(rng, sizes_ba, 1 if batch == 3 else batch, d, scale)  # batch-3 case broadcasts chain_BA
    points_shape = R.loss_points_shape(shape, stride)
    noise = torch.randn(1, d, *points_shape, generator=rng)

    def penalty(backend):
        loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, backend=backend)
        return loss.detach(), torch.autograd.grad(loss, ab + ba)

    check_fd(_run(path, monkeypatch, lambda: penalty("cpu")), ab + ba, path, n_ab=len(ab), shape=shape,
             stride=stride, noise=noise)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("delta", [0.004, 0.03])
def test_shifted_points_crossing_cells(path, delta, rng, monkeypatch):
    """GradICON's δ-shifted points that land in the next cell along their axis (sharing a face
    with the cell of their point) or in any other cell take their own branches in the vector
    kernels; a δ of a tenth to a whole voxel of the finest field sends many points each way."""
    d, shape, stride = 3, (30, 26, 28), 2
    ab = _random_chain(rng, [(8, 9, 7), (30, 26, 28)], 2, d, 0.06)
    ba = _random_chain(rng, [(29, 27, 25), (13, 12, 14)], 2, d, 0.06)
    noise = torch.randn(1, d, *R.loss_points_shape(shape, stride), generator=rng)

    def penalty(backend):
        loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, delta=delta, backend=backend)
        return loss.detach(), torch.autograd.grad(loss, ab + ba)

    check_fd(_run(path, monkeypatch, lambda: penalty("cpu")), ab + ba, path, n_ab=2, shape=shape, stride=stride,
             noise=noise, delta=delta)


@pytest.mark.parametrize("path", PATHS)
def test_seeded_noise_is_regenerated_in_backward(path, rng, monkeypatch):
    d, shape, stride = 3, (14, 15, 13), 2
    ab = _random_chain(rng, [(8, 7, 9), (15, 14, 13)], 2, d, 0.05)
    ba = _random_chain(rng, [(10, 11, 9)], 2, d, 0.05)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    noise = ops.normal_noise(seed, d, R.loss_points_shape(shape, stride))
    def fused():
        loss = ops.gradicon_loss(ab, ba, shape, stride, None, seed, 1e-3, stride / shape[-1])
        return loss.detach(), torch.autograd.grad(loss, ab + ba)

    check_fd(_run(path, monkeypatch, fused), ab + ba, path, n_ab=2, shape=shape, stride=stride, noise=noise)


def test_paths_agree_with_each_other(rng, monkeypatch):
    """The vector paths mirror the scalar arithmetic: values agree to float32 rounding."""
    d, shape = 3, (21, 19, 20)
    ab = _random_chain(rng, [(11, 10, 12), (21, 19, 20)], 1, d, 0.08)
    ba = _random_chain(rng, [(21, 19, 20)], 1, d, 0.08)
    noise = torch.randn(1, d, *R.loss_points_shape(shape, 2), generator=rng)
    losses = {}
    for path in PATHS:
        monkeypatch.setenv("GRADICON_FAST_CPU_KERNEL", path)
        try:
            losses[path] = gf.gradicon_loss(ab, ba, shape=shape, stride=2, noise=noise, backend="cpu").detach()
        except RuntimeError as exc:
            if "built without AVX2" not in str(exc):
                raise
    for path, value in losses.items():
        torch.testing.assert_close(value, losses["scalar"], rtol=2e-6, atol=0, msg=path)


def test_fused_loss_and_grad_equals_two_passes(rng, monkeypatch):
    """A CPU loss that will be backpropagated is computed with its gradients in one pass; it
    must equal the forward op followed by the backward op, also with a non-unit upstream
    gradient and with some fields not requiring grad."""
    d, shape, stride = 3, (16, 14, 15), 2
    ab = _random_chain(rng, [(8, 7, 8), (16, 14, 15)], 2, d, 0.06)
    ba = _random_chain(rng, [(9, 10, 8)], 2, d, 0.06)
    ab[0].requires_grad_(False)
    noise = torch.randn(1, d, *R.loss_points_shape(shape, stride), generator=rng)
    wanted = ab[1:] + ba

    def run():
        loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, backend="cpu")
        return loss.detach(), torch.autograd.grad(2.5 * loss, wanted)

    fused_loss, fused_grads = run()
    monkeypatch.setattr(ops, "fuse_cpu_loss_and_grad", False)
    two_pass_loss, two_pass_grads = run()
    torch.testing.assert_close(fused_loss, two_pass_loss, rtol=1e-6, atol=0)
    for got, want in zip(fused_grads, two_pass_grads):
        # The upstream gradient scales the adjoints before (two passes) or after (fused) the
        # cancelling finite-difference sums: equal up to float32 rounding of those sums.
        assert torch.linalg.vector_norm(got - want) <= 1e-5 * torch.linalg.vector_norm(want)


def test_fused_loss_refuses_a_second_backward(rng):
    ab = _random_chain(rng, [(6, 5, 7)], 1, 3, 0.05)
    ba = _random_chain(rng, [(6, 5, 7)], 1, 3, 0.05)
    loss = gf.gradicon_loss(ab, ba, shape=(6, 5, 7), backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fuse_cpu_loss_and_grad"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_grad_opcheck(rng, dtype):
    ab = [(0.05 * torch.randn(2, 3, 4, 5, 3, generator=rng, dtype=dtype)), 0.05 * torch.randn(1, 3, 3, 4, 5, dtype=dtype)]
    ba = [0.05 * torch.randn(2, 3, 5, 4, 4, generator=rng, dtype=dtype)]
    noise = torch.randn(1, 3, 2, 3, 2, generator=rng, dtype=dtype)
    for args in [(ab, ba, [4, 5, 3], 2, noise, 0, 1e-3, 0.3, [True, False], [True]),
                 (ab, ba, [4, 5, 3], 1, None, 12345, 1e-3, 0.2, [False, True], [False])]:
        result = torch.library.opcheck(torch.ops.gradicon_fast.gradicon_loss_and_grad, args)
        assert all(v == "SUCCESS" for v in result.values()), result
