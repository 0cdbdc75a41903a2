"""Non-finite input gives non-finite output where it is used, finite output elsewhere, and never a crash.

A NaN or an Inf in a field at a voxel that the penalty's points sample makes GradICON and ICON
non-finite; transform_points and warp are non-finite exactly where the map goes through that voxel.
NaN (and ±Inf) points give non-finite outputs, and the backward passes still run.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import reference as R

from conftest import HAS_CPU_KERNELS, rand_uniform, random_field, random_points, random_shape

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_KERNELS, reason="extension not built"))]
BAD = [float("nan"), float("inf"), float("-inf")]


def poisoned(rng, d, batch, shape, value, magnitude=0.03):
    """A small random field with ``value`` at one interior voxel of batch entry 0, channel 0; and that voxel.

    The voxel has even indices, so that the sparse penalty (every second grid point) has a point near it.
    """
    f = random_field(rng, batch, shape, magnitude)
    voxel = tuple(2 * int(torch.randint(1, s // 2, (1,), generator=rng)) if s > 4 else 2 for s in shape)
    assert all(1 <= v <= s - 2 for v, s in zip(voxel, shape))
    f[(0, 0) + voxel] = value
    return f, voxel


def touches(points, shape, voxel):
    """Which points (B, d, *P) have ``voxel`` of a grid of ``shape`` among their interpolation corners."""
    near = torch.ones(points.shape[:1] + points.shape[2:], dtype=torch.bool)
    for k, (s, v) in enumerate(zip(shape, voxel)):
        p = (points[:, k] * (s - 1)).clamp(0, s - 1)
        near &= (p > v - 1) & (p < v + 1)
    return near


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
def test_penalties_are_non_finite(rng, backend, d, value):
    shape = random_shape(rng, d, 4, 7)
    bad, _ = poisoned(rng, d, 2, shape, value)
    good = random_field(rng, 2, random_shape(rng, d, 3, 6), 0.03)
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64).clamp(-3, 3)
    sparse = noise[(slice(None), slice(None)) + (slice(None, None, 2),) * d]
    # a noise scale of a fraction of a cell: the point at the poisoned voxel stays in a cell that has it
    scale = 0.25 / max(shape)
    # the poisoned field applied first (inner), and applied last (outer)
    for ab, ba in (([good], [bad]), ([bad], [good])):
        for stride, n in ((1, noise), (2, sparse)):
            loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=n, noise_scale=scale, backend=backend)
            assert not torch.isfinite(loss), (stride, loss)
        assert not torch.isfinite(gf.icon_loss(ab, ba, shape=shape, noise=noise, noise_scale=scale, backend=backend))
        # seeded noise (the kernels draw it themselves; points beyond 4 standard deviations have
        # probability below 1e-4 here, and the point at the voxel only has to stay within a cell)
        for stride in (1, 2):
            loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, generator=rng, noise_scale=scale,
                                    backend=backend)
            assert not torch.isfinite(loss), (stride, loss)
        assert not torch.isfinite(gf.icon_loss(ab, ba, shape=shape, generator=rng, noise_scale=scale,
                                               backend=backend))
    if backend == "torch" and value != value:
        return  # NaN positions reach F.grid_sample's backward: see test_reference_backward_with_nan_positions
    # the backward passes run
    leaf = bad.clone().requires_grad_(True)
    gf.gradicon_loss([good], [leaf], shape=shape, noise=noise, backend=backend).backward()
    gf.icon_loss([leaf], [good], shape=shape, noise=noise, backend=backend).backward()
    assert leaf.grad is not None and leaf.grad.shape == bad.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
def test_transform_points_and_warp_are_non_finite_where_the_map_passes(rng, backend, d, value):
    shape = random_shape(rng, d, 4, 7)
    bad, voxel = poisoned(rng, d, 2, shape, value)
    points = random_points(rng, 2, d, (200,), lo=0.0, hi=1.0)
    out = gf.transform_points([bad], points, backend=backend)
    hit = touches(points, shape, voxel)
    hit[1] = False  # only batch entry 0 is poisoned
    assert hit.any()
    finite = torch.isfinite(out).all(dim=1)
    assert not finite[hit].any()
    assert finite[~hit].all()
    # a second field applied after: the non-finite position stays non-finite
    after = random_field(rng, 1, random_shape(rng, d, 2, 5), 0.05)
    out2 = gf.transform_points([after, bad], points, backend=backend)
    assert not torch.isfinite(out2).all(dim=1)[hit].any()

    # warp on the poisoned field's own grid: the voxel itself and the image value there
    image = rand_uniform(rng, (1, 2, *random_shape(rng, d, 3, 7)))
    warped = gf.warp(image, [bad], shape=shape, backend=backend)
    assert not torch.isfinite(warped[(0, slice(None)) + voxel]).any()
    assert torch.isfinite(warped[1]).all()  # the other batch entry is clean
    # and through a chain of two fields
    warped2 = gf.warp(image, [after, bad], shape=shape, backend=backend)
    assert not torch.isfinite(warped2[(0, slice(None)) + voxel]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3])
def test_non_finite_image_value(rng, backend, d):
    shape = random_shape(rng, d, 4, 7)
    image = rand_uniform(rng, (1, 1, *shape))
    voxel = tuple(int(torch.randint(1, s - 1, (1,), generator=rng)) for s in shape)
    image[(0, 0) + voxel] = float("nan")
    zero = [torch.zeros(1, d, *shape, dtype=torch.float64)]
    warped = gf.warp(image, zero, backend=backend)  # the identity map samples every voxel exactly
    assert torch.isnan(warped[(0, 0) + voxel])
    # voxels whose interpolation cell does not contain the NaN voxel stay finite (the cell of node i
    # is [i, i + 1]: nodes v - 1 may pick the NaN up with weight 0, and 0 * NaN is NaN)
    far = torch.ones(shape, dtype=torch.bool)
    far[tuple(slice(v - 1, v + 1) for v in voxel)] = False
    assert torch.isfinite(warped[0, 0][far]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3])
def test_non_finite_points(rng, backend, d):
    chain = [random_field(rng, 2, random_shape(rng, d, 2, 6), 0.05),
             random_field(rng, 1, random_shape(rng, d, 2, 6), 0.05)]
    points = random_points(rng, 2, d, (5, 4), lo=-0.2, hi=1.2)
    bad = points.clone()
    bad[0, 0, 1, 2] = float("nan")
    bad[1, d - 1, 3, 0] = float("nan")
    bad[0, 1, 4, 3] = float("inf")
    bad[1, 0, 0, 1] = float("-inf")
    leaf = bad.clone().requires_grad_(True)
    fields = [f.clone().requires_grad_(True) for f in chain]
    out = gf.transform_points(fields, leaf, backend=backend)
    finite = torch.isfinite(out).all(dim=1)
    expected_finite = torch.isfinite(bad).all(dim=1)
    assert torch.equal(finite, expected_finite)
    assert torch.isnan(out[0, :, 1, 2]).any() and torch.isnan(out[1, :, 3, 0]).any()
    # the finite points are unaffected
    clean = gf.transform_points(chain, points, backend=backend)
    torch.testing.assert_close(out.detach()[:, :, expected_finite[0] & expected_finite[1]],
                               clean[:, :, expected_finite[0] & expected_finite[1]], rtol=0, atol=0)
    if backend == "torch":
        return  # NaN positions reach F.grid_sample's backward: see test_reference_backward_with_nan_positions
    # the backward pass runs and has the right shapes
    out.backward(torch.ones_like(out))
    assert leaf.grad.shape == bad.shape and all(f.grad.shape == c.shape for f, c in zip(fields, chain))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_noise(rng, backend):
    d, shape = 2, (5, 6)
    ab = [random_field(rng, 1, shape, 0.05)]
    ba = [random_field(rng, 1, shape, 0.05)]
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64)
    noise[0, 1, 2, 3] = float("nan")
    assert torch.isnan(gf.gradicon_loss(ab, ba, shape=shape, noise=noise, backend=backend))
    assert torch.isnan(gf.icon_loss(ab, ba, shape=shape, noise=noise, backend=backend))


# Each scenario runs in a subprocess: a crash must fail the test, not end the test session.
NAN_BACKWARD_SCENARIOS = {
    "transform_points, NaN point": """
        x = torch.rand(2, 2, 7, dtype=torch.float64); x[0, 0, 3] = float("nan"); x.requires_grad_(True)
        f = (0.05 * torch.rand(2, 2, 4, 5, dtype=torch.float64)).requires_grad_(True)
        gf.transform_points([f], x, backend=BACKEND).sum().backward()
    """,
    "gradicon_loss, NaN in the inner field": """
        bad = 0.05 * torch.rand(1, 2, 5, 6, dtype=torch.float64); bad[0, 0, 2, 2] = float("nan")
        bad.requires_grad_(True)
        good = (0.05 * torch.rand(1, 2, 4, 5, dtype=torch.float64)).requires_grad_(True)
        noise = torch.randn(1, 2, 5, 6, dtype=torch.float64)
        gf.gradicon_loss([good], [bad], shape=(5, 6), noise=noise, backend=BACKEND).backward()
    """,
    "icon_loss, NaN field": """
        bad = 0.05 * torch.rand(1, 2, 5, 6, dtype=torch.float64); bad[0, 0, 2, 2] = float("nan")
        bad.requires_grad_(True)
        good = (0.05 * torch.rand(1, 2, 4, 5, dtype=torch.float64)).requires_grad_(True)
        noise = torch.randn(1, 2, 5, 6, dtype=torch.float64)
        gf.icon_loss([good], [bad], shape=(5, 6), noise=noise, backend=BACKEND).backward()
    """,
    "warp, NaN field": """
        bad = 0.05 * torch.rand(1, 2, 5, 6, dtype=torch.float64); bad[0, 0, 2, 2] = float("nan")
        bad.requires_grad_(True)
        image = torch.rand(1, 1, 5, 6, dtype=torch.float64, requires_grad=True)
        gf.warp(image, [bad], backend=BACKEND).sum().backward()
    """,
}


def run_backward_scenario(code, backend):
    script = "import torch\nimport gradicon_fast as gf\nBACKEND = %r\n" % backend + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr[-2000:]


@pytest.mark.parametrize("scenario", list(NAN_BACKWARD_SCENARIOS))
@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_KERNELS, reason="extension not built")),
])
def test_reference_backward_with_nan_positions(backend, scenario):
    """The backward pass with NaN sampling positions must not crash (gradients may be NaN)."""
    code, err = run_backward_scenario(NAN_BACKWARD_SCENARIOS[scenario], backend)
    assert code == 0, f"exit status {code}: {err}"
