"""torch.autograd.gradcheck in float64 on the reference and on the fused CPU ops.

Linear interpolation is piecewise smooth: its derivative jumps where a sampled position crosses a
grid line (or the border, where clamping starts). gradcheck perturbs each input by eps = 1e-6, which
moves the sampled positions by about 1e-5 grid cells, so a kink only matters if a position lies that
close to a grid line. The inputs are fresh random draws, redrawn until every sampled position that
moves with the inputs is at least 1e-4 cells (ten times the perturbation) from any grid line:
deterministic non-flakiness without fixing the seed.
"""

import pytest
import torch
from torch.autograd import gradcheck

import gradicon_fast as gf
from gradicon_fast import reference as R

from conftest import HAS_CPU_KERNELS, rand_uniform, random_points, smooth_field

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems on shared cores

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_KERNELS, reason="extension not built"))]
MARGIN = 1e-4  # grid cells
SHAPES = {2: [(5, 4), (3, 6), (4, 5)], 3: [(4, 5, 3), (3, 4, 4), (5, 3, 4)]}


def grid_distance(sizes, y):
    """Smallest distance, in grid cells, of positions ``y`` from a line of a grid of ``sizes``.

    Positions outside the grid count by their distance to the border (where clamping starts); size-1
    axes have no kink.
    """
    best = float("inf")
    for k, size in enumerate(sizes):
        if size > 1:
            p = y[:, k] * (size - 1)
            nearest = p.round().clamp(0, size - 1)
            best = min(best, (p - nearest).abs().min().item())
    return best


def kink_distance(chain, points, skip_first=False):
    """(smallest grid_distance over the positions where the fields of ``chain`` are sampled, φ(points)).

    ``skip_first``: the first sampling (at ``points``) does not move with the inputs.
    """
    best = float("inf")
    y = points.detach()
    for j, field in enumerate(reversed(chain)):
        if not (skip_first and j == 0):
            best = min(best, grid_distance(field.shape[2:], y))
        y = y + R.sample(field.detach(), y)
    return best, y


def redraw(draw, acceptable, tries=100):
    for _ in range(tries):
        inputs = draw()
        if acceptable(*inputs):
            return inputs
    raise AssertionError("could not draw inputs away from the interpolation kinks")


def fields(rng, d, magnitude=0.08):
    """Two smooth fields at different resolutions, the second broadcast over a batch of 2."""
    s1, s2 = SHAPES[d][0], SHAPES[d][1]
    f1 = smooth_field(rng, 2, s1, magnitude) + rand_uniform(rng, (2, d, *s1), -0.01, 0.01)
    f2 = smooth_field(rng, 1, s2, magnitude) + rand_uniform(rng, (1, d, *s2), -0.01, 0.01)
    return [f1, f2]


def check(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3])
def test_transform_points(rng, backend, d):
    def draw():
        return fields(rng, d, 0.3), random_points(rng, 2, d, (3, 2), lo=-0.2, hi=1.2)

    chain, points = redraw(draw, lambda c, p: kink_distance(c, p)[0] > MARGIN)
    check(lambda f1, f2, x: gf.transform_points([f1, f2], x, backend=backend), chain + [points])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3])
def test_warp(rng, backend, d):
    shape = SHAPES[d][2]
    identity = R.identity_map(shape, dtype=torch.float64)

    def draw():
        chain = fields(rng, d)
        image = rand_uniform(rng, (1, 2, *SHAPES[d][1]))
        return chain, image

    def acceptable(chain, image):
        near, y = kink_distance(chain, identity, skip_first=True)  # the grid itself does not move
        return near > MARGIN and grid_distance(image.shape[2:], y) > MARGIN

    chain, image = redraw(draw, acceptable)
    check(lambda img, f1, f2: gf.warp(img, [f1, f2], shape=shape, backend=backend), [image] + chain)


def penalty_inputs(rng, d, stride, noise_scale, directions):
    shape = SHAPES[d][2]
    points_shape = R.loss_points_shape(shape, stride)

    def draw():
        ab, ba = fields(rng, d), fields(rng, d)
        noise = torch.randn(1, d, *points_shape, generator=rng, dtype=torch.float64)
        return ab, ba, noise

    def acceptable(ab, ba, noise):
        points = R.loss_points(shape, stride, noise, noise_scale)
        for chain in ([ab + ba, ba + ab] if directions == 2 else [ab + ba]):
            for k in range(-1, d):
                shifted = points.clone()
                if k >= 0:
                    shifted[:, k] += 1e-3
                if kink_distance(chain, shifted)[0] <= MARGIN:
                    return False
        return True

    return shape, redraw(draw, acceptable)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("stride, symmetric", [(1, False), (2, True)])
def test_gradicon_loss(rng, backend, d, stride, symmetric, monkeypatch):
    if backend == "cpu":
        # gradcheck backpropagates the same graph several times; the default fused CPU path (loss and
        # gradients in one pass) supports one backward pass, so check the two-pass ops here.
        # test_cpu_parity compares the fused path with the reference, and with the two-pass ops.
        from gradicon_fast import ops

        monkeypatch.setattr(ops, "fuse_cpu_loss_and_grad", False, raising=False)
    noise_scale = 0.3
    shape, (ab, ba, noise) = penalty_inputs(rng, d, stride, noise_scale, 2 if symmetric else 1)
    check(lambda a1, a2, b1, b2: gf.gradicon_loss([a1, a2], [b1, b2], shape=shape, stride=stride, noise=noise,
                                                  noise_scale=noise_scale, symmetric=symmetric, backend=backend),
          ab + ba)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3])
def test_icon_loss(rng, backend, d):
    noise_scale = 0.3
    shape, (ab, ba, noise) = penalty_inputs(rng, d, 1, noise_scale, 2)
    check(lambda a1, a2, b1, b2: gf.icon_loss([a1, a2], [b1, b2], shape=shape, noise=noise, noise_scale=noise_scale,
                                              backend=backend), ab + ba)
