"""Analytic GradICON: reference Jacobian, reference loss vs FD, fused CPU kernels vs reference."""

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import reference as ref

from conftest import requires_cpu_kernels

F64 = torch.float64


def _rand(rng, *shape, scale=1.0, dtype=F64):
    return (torch.randn(*shape, generator=rng, dtype=F64) * scale).to(dtype)


def _chain(rng, d, batch, n_fields, scale, dtype=F64, min_size=2, max_size=7):
    """A chain of mixed-resolution, mixed-batch (B or 1), non-cubic random displacement fields."""
    fields = []
    for _ in range(n_fields):
        size = torch.randint(min_size, max_size + 1, (d,), generator=rng).tolist()
        b = batch if torch.rand((), generator=rng) < 0.6 else 1
        fields.append(_rand(rng, b, d, *size, scale=scale, dtype=dtype))
    return fields


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ---- reference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
def test_sample_with_gradient_values_match_sample(rng, d):
    field = _rand(rng, 2, 3, *([5, 4, 6][:d]))
    points = torch.rand(1, d, 17, generator=rng, dtype=F64) * 1.4 - 0.2
    value, _ = ref.sample_with_gradient(field, points)
    torch.testing.assert_close(value, ref.sample(field, points), rtol=0, atol=1e-14)


@pytest.mark.parametrize("d", [2, 3])
def test_chain_jacobian_matches_autograd(rng, d):
    batch = 2
    chain = _chain(rng, d, batch, 3, scale=0.08)
    # Points strictly inside [0, 1]; cell boundaries are hit with probability 0.
    points = torch.rand(1, d, 5, 4, generator=rng, dtype=F64) * 0.9 + 0.05
    jac = ref.chain_jacobian(chain, points)
    assert jac.shape == (max(f.shape[0] for f in chain), d, d, 5, 4)  # fields of batch B or 1

    # Each output point depends only on its own input point, so the gradient of the sum of output
    # component c of batch b over all points is row c of that batch's Jacobian at every point.
    # (Plain autograd rather than torch.func.jacrev: on torch 2.11 jacrev through grid_sample
    # raised 'Expected a proper Tensor but got None'.)
    points.requires_grad_(True)
    out = ref.transform_points(chain, points)
    expected = torch.stack([
        torch.stack([torch.autograd.grad(out[b, c].sum(), points, retain_graph=True)[0][0] for c in range(d)])
        for b in range(out.shape[0])])  # (B, d, d, *P)
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=1e-12)


def _smooth_field(d, size, batch, amplitude, phase):
    """A displacement sampled from a smooth, low-frequency function (FD ≈ analytic).

    FD differs from the analytic Jacobian where x and x + δ ê_k straddle a cell boundary
    (a fraction ~δ·(S - 1) of the points) by the jump of the gradient there (~ frequency / (S - 1)
    relative): about δ · frequency relative in all, whatever the resolution.
    """
    identity = ref.identity_map(size, dtype=F64)
    out = []
    for c in range(d):
        arg = sum((1 + 0.5 * ((k + c) % d)) * identity[:, k] for k in range(d)) + phase + c
        out.append(amplitude * torch.sin(2.0 * arg))
    return torch.stack(out, dim=1).expand(batch, -1, *size).contiguous()


@pytest.mark.parametrize("d", [2, 3])
def test_analytic_close_to_fd_on_smooth_maps(rng, d):
    size = (33, 29) if d == 2 else (17, 15, 16)
    shape = (24, 22) if d == 2 else (12, 11, 10)
    chain_ab = [_smooth_field(d, size, 2, 0.05, 0.3), _smooth_field(d, size, 1, 0.04, 1.1)]
    chain_ba = [_smooth_field(d, size, 2, -0.03, 0.7)]
    noise = _rand(rng, 1, d, *shape)
    kwargs = dict(shape=shape, noise=noise, backend="torch", symmetric=True)
    fd = gf.gradicon_loss(chain_ab, chain_ba, mode="fd", **kwargs)
    analytic = gf.gradicon_loss(chain_ab, chain_ba, mode="analytic", **kwargs)
    assert fd.item() > 1e-3
    assert abs(analytic.item() - fd.item()) <= 1e-2 * fd.item()


def test_analytic_is_zero_for_translations(rng):
    shift = torch.full((1, 2, 4, 5), 0.01, dtype=F64)
    loss = ref.gradicon_loss_analytic([shift], [-shift], shape=(6, 7), noise=_rand(rng, 1, 2, 6, 7))
    assert loss.item() < 1e-30


@pytest.mark.parametrize("d", [2, 3])
def test_reference_gradcheck(rng, d):
    shape = (4, 5, 3)[:d]
    chain_ab = [f.requires_grad_() for f in _chain(rng, d, 2, 2, 0.1, max_size=4)]
    chain_ba = [f.requires_grad_() for f in _chain(rng, d, 2, 1, 0.1, max_size=4)]
    noise = _rand(rng, 1, d, *shape)

    def loss(*fields):
        return ref.gradicon_loss_analytic(fields[:2], fields[2:], shape=shape, noise=noise, noise_scale=0.2,
                                          symmetric=True)

    # fast_mode: a random projection of the Jacobian (the full one takes ~20 s in 3D here).
    assert torch.autograd.gradcheck(loss, (*chain_ab, *chain_ba), eps=1e-7, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_bad_mode():
    chain = [torch.zeros(1, 2, 3, 3)]
    with pytest.raises(ValueError, match="mode"):
        gf.gradicon_loss(chain, chain, shape=(4, 4), mode="exact")


# ---- fused CPU kernels vs the reference ---------------------------------------------------------


def _losses_and_grads(chain_ab, chain_ba, backend, **kwargs):
    ab = [f.detach().clone().requires_grad_() for f in chain_ab]
    ba = [f.detach().clone().requires_grad_() for f in chain_ba]
    loss = gf.gradicon_loss(ab, ba, mode="analytic", backend=backend, **kwargs)
    grads = torch.autograd.grad(loss, ab + ba)
    return loss.detach(), grads


CASES = [
    # d, stride, symmetric
    (2, 1, False),
    (2, 2, True),
    (3, 1, True),
    (3, 2, False),
]


@requires_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d,stride,symmetric", CASES)
def test_cpu_matches_reference(rng, dtype, d, stride, symmetric):
    batch = int(torch.randint(1, 4, (), generator=rng))
    shape = (9, 7, 8)[:d] if d == 2 else (7, 6, 5)
    points_shape = ref.loss_points_shape(shape, stride)
    chain_ab = _chain(rng, d, batch, int(torch.randint(1, 4, (), generator=rng)), 0.1, dtype)
    chain_ba = _chain(rng, d, batch, int(torch.randint(1, 3, (), generator=rng)), 0.1, dtype)
    noise = _rand(rng, 1, d, *points_shape, dtype=dtype)
    # noise_scale 0.15: many points fall outside [0, 1], where the index is clamped.
    kwargs = dict(shape=shape, stride=stride, noise=noise, noise_scale=0.15, symmetric=symmetric)
    loss_cpu, grads_cpu = _losses_and_grads(chain_ab, chain_ba, "cpu", **kwargs)
    loss_ref, grads_ref = _losses_and_grads(chain_ab, chain_ba, "torch", **kwargs)
    value_tol, grad_tol = (1e-10, 1e-10) if dtype == F64 else (1e-5, 1e-4)
    assert loss_cpu.dtype == dtype
    assert _max_rel(loss_cpu, loss_ref) <= value_tol
    for g_cpu, g_ref in zip(grads_cpu, grads_ref):
        assert g_cpu.shape == g_ref.shape
        assert _max_rel(g_cpu, g_ref) <= grad_tol


@requires_cpu_kernels
@pytest.mark.parametrize("d", [2, 3])
def test_cpu_partial_gradients(rng, d):
    """Only some fields need a gradient; the others get None."""
    shape = (6, 5, 4)[:d]
    chain_ab = _chain(rng, d, 2, 2, 0.1)
    chain_ba = _chain(rng, d, 2, 2, 0.1)
    chain_ab[1].requires_grad_()
    chain_ba[0].requires_grad_()
    noise = _rand(rng, 1, d, *shape)
    loss = gf.gradicon_loss(chain_ab, chain_ba, shape=shape, noise=noise, mode="analytic", backend="cpu")
    g_ab, g_ba = torch.autograd.grad(loss, [chain_ab[1], chain_ba[0]])
    loss_ref = ref.gradicon_loss_analytic(chain_ab, chain_ba, shape=shape, noise=noise)
    r_ab, r_ba = torch.autograd.grad(loss_ref, [chain_ab[1], chain_ba[0]])
    assert _max_rel(g_ab, r_ab) <= 1e-10 and _max_rel(g_ba, r_ba) <= 1e-10


@requires_cpu_kernels
def test_cpu_backward_many_blocks(rng):
    """More threads than cores and few gradient rows: blocks share cell rows at their borders."""
    d, shape = 2, (48, 40)
    chain_ab = [_rand(rng, 1, d, 6, 40, scale=0.05).requires_grad_()]
    chain_ba = [_rand(rng, 2, d, 9, 33, scale=0.05).requires_grad_()]
    noise = _rand(rng, 1, d, *shape)
    loss_ref = ref.gradicon_loss_analytic(chain_ab, chain_ba, shape=shape, noise=noise)
    grads_ref = torch.autograd.grad(loss_ref, chain_ab + chain_ba)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(6)
        for _ in range(3):
            loss = gf.gradicon_loss(chain_ab, chain_ba, shape=shape, noise=noise, mode="analytic", backend="cpu")
            for g, r in zip(torch.autograd.grad(loss, chain_ab + chain_ba), grads_ref):
                assert _max_rel(g, r) <= 1e-10
    finally:
        torch.set_num_threads(threads)


@requires_cpu_kernels
@pytest.mark.parametrize("d", [2, 3])
def test_cpu_gradcheck(rng, d):
    shape = (4, 3, 5)[:d]
    chain_ab = [f.requires_grad_() for f in _chain(rng, d, 2, 2, 0.1, max_size=4)]
    chain_ba = [f.requires_grad_() for f in _chain(rng, d, 2, 1, 0.1, max_size=4)]
    noise = _rand(rng, 1, d, *ref.loss_points_shape(shape, 2))

    def loss(*fields):
        return gf.ops.gradicon_analytic_loss(fields[:2], fields[2:], shape, 2, noise, 0, 0.2)

    assert torch.autograd.gradcheck(loss, (*chain_ab, *chain_ba), eps=1e-7, atol=1e-7, rtol=1e-5)


@requires_cpu_kernels
@pytest.mark.parametrize("d", [2, 3])
def test_seeded_noise_matches_reference(rng, d):
    shape, stride, scale = (7, 6, 5)[:d], 2, 0.1
    points_shape = ref.loss_points_shape(shape, stride)
    chain_ab = [f.requires_grad_() for f in _chain(rng, d, 2, 2, 0.1)]
    chain_ba = [f.requires_grad_() for f in _chain(rng, d, 2, 1, 0.1)]
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    loss = gf.ops.gradicon_analytic_loss(chain_ab, chain_ba, shape, stride, None, seed, scale)
    grads = torch.autograd.grad(loss, chain_ab + chain_ba)
    noise = gf.ops.normal_noise(seed, d, points_shape, dtype=F64)
    loss_ref = ref.gradicon_loss_analytic(chain_ab, chain_ba, shape=shape, stride=stride, noise=noise,
                                          noise_scale=scale)
    grads_ref = torch.autograd.grad(loss_ref, chain_ab + chain_ba)
    assert _max_rel(loss, loss_ref) <= 1e-10
    for g, r in zip(grads, grads_ref):
        assert _max_rel(g, r) <= 1e-10


@requires_cpu_kernels
def test_functional_generator_path(rng):
    """noise=None on the CPU backend: drawn from the generator's seed, deterministic given it."""
    d, shape = 3, (6, 5, 4)
    chain_ab, chain_ba = _chain(rng, d, 2, 2, 0.1), _chain(rng, d, 2, 1, 0.1)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    losses = [gf.gradicon_loss(chain_ab, chain_ba, shape=shape, stride=2, mode="analytic", symmetric=True,
                               generator=torch.Generator().manual_seed(seed), backend="cpu") for _ in range(2)]
    assert losses[0].item() == losses[1].item() and losses[0].item() > 0


@requires_cpu_kernels
@pytest.mark.parametrize("d", [2, 3])
def test_opcheck(rng, d):
    shape = (5, 4, 3)[:d]
    chain_ab = [f.requires_grad_() for f in _chain(rng, d, 2, 2, 0.1, max_size=4)]
    chain_ba = [f.requires_grad_() for f in _chain(rng, d, 2, 1, 0.1, max_size=4)]
    noise = _rand(rng, 1, d, *shape)
    ops = torch.ops.gradicon_fast
    torch.library.opcheck(ops.gradicon_analytic_loss.default, (chain_ab, chain_ba, list(shape), 1, noise, 0, 0.2))
    torch.library.opcheck(ops.gradicon_analytic_loss.default, (chain_ab, chain_ba, list(shape), 1, None, 123, 0.2))
    ab = [f.detach() for f in chain_ab]
    ba = [f.detach() for f in chain_ba]
    grad = torch.tensor(1.5, dtype=F64)
    torch.library.opcheck(ops.gradicon_analytic_loss_backward.default,
                          (grad, ab, ba, list(shape), 1, noise, 0, 0.2, [True, False], [True]))
