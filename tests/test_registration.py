"""Model-free registration (gradicon_fast.registration): its pieces, and recovery of known deformations.

The default run keeps the problems small; the ~150³ case at 2 mm is ``@pytest.mark.slow`` (and in
benchmarks/registration.py, which also compares the fused and reference backends).
"""

import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

import gradicon_fast as gf
from gradicon_fast import io
from gradicon_fast import registration as R
from gradicon_fast.demo import dice, landmark_error_mm, make_synthetic_pair

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems on shared cores


def conv_blur(x, sigma):
    """docs/conventions.md §3's Gaussian smoothing written directly as depthwise convolutions (the oracle)."""
    k = 4 * sigma + 1
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-t ** 2 / (2 * sigma ** 2))
    w = (w / w.sum()).float()
    d = x.ndim - 2
    conv = F.conv3d if d == 3 else F.conv2d
    for axis in range(d):
        shape = [1] * d
        shape[axis] = k
        pad = [0] * d
        pad[axis] = k // 2
        x = conv(x, w.view(1, 1, *shape).repeat(x.shape[1], 1, *[1] * d), padding=pad, groups=x.shape[1])
    return x


@pytest.mark.parametrize("shape", [(17, 20, 23), (31, 26)])
@pytest.mark.parametrize("sigma", [1, 3, 5])
def test_gaussian_blur_is_spec_smoothing(shape, sigma):
    x = torch.rand(2, 3, *shape, dtype=torch.float32)
    ours = R.GaussianBlur(sigma, shape)(x)
    assert torch.allclose(ours, conv_blur(x, sigma), atol=1e-6)


def test_lncc_loss_matches_spec():
    a, b = torch.rand(1, 1, 20, 18, 16), torch.rand(1, 1, 20, 18, 16)
    b = 0.5 * a + 0.5 * b
    blur = R.GaussianBlur(3, a.shape[2:])
    stats = conv_blur(torch.cat([a, b, a * a, b * b, a * b], 1), 3)
    ma, mb, maa, mbb, mab = stats.unbind(1)
    cc = (mab - ma * mb) / torch.sqrt((torch.relu(maa - ma ** 2) + 1e-5) * (torch.relu(mbb - mb ** 2) + 1e-5))
    assert torch.allclose(R.lncc_loss(a, b, blur), 1 - cc.mean(), atol=1e-5)
    assert torch.allclose(R.lncc_loss(a, b, blur, squared=True), 1 - (cc ** 2).mean(), atol=1e-5)
    assert R.lncc_loss(a, a, blur) < 1e-3
    try:
        from gradicon_fast.nn import lncc_loss
    except ImportError:
        return
    assert torch.allclose(R.lncc_loss(a, b, blur), lncc_loss(a, b, 3), atol=1e-5)  # the network layer's


def test_resize_keeps_the_unit_coordinates():
    shape = (41, 37, 29)
    ramp = gf.identity_map(shape)[:, :1]  # channel 0 of the identity: x_0 in [0, 1]
    small = R.resize(ramp, (11, 10, 8))
    expected = gf.identity_map((11, 10, 8))[:, :1]
    # exact inside; the anti-aliasing (one-sided at the border) moves the end samples by < 1/3 voxel
    assert torch.allclose(small[:, :, 1:-1], expected[:, :, 1:-1], atol=2e-3)
    assert torch.allclose(small, expected, atol=0.1 / 3)
    assert torch.allclose(R.resize(ramp, (21, 19, 15), antialias=False), gf.identity_map((21, 19, 15))[:, :1],
                          atol=1e-6)
    ones = torch.ones(1, 1, *shape)
    assert torch.allclose(R.resize(ones, (11, 10, 8)), torch.ones(1, 1, 11, 10, 8), atol=1e-5)


def test_grid_shapes():
    assert R.loss_grid_shape((150, 150, 150), 80) == (80, 80, 80)
    assert R.loss_grid_shape((64, 64, 64), 80) == (64, 64, 64)
    assert R.loss_grid_shape((160, 200, 100), 80) == (64, 80, 40)
    assert R.scaled_shape((80, 80, 40), 4) == (21, 21, 11)
    assert R.scaled_shape((8, 8), 4) == (6, 6)


def test_register_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same grid"):
        R.register(torch.rand(1, 1, 10, 10, 10), torch.rand(1, 1, 10, 10, 12))


def _recovery(pair, settings=None, backend=None):
    start = time.perf_counter()
    result = R.register(pair.fixed, pair.moving, settings=settings, backend=backend)
    seconds = time.perf_counter() - start
    shape = pair.geometry.shape
    phi = gf.identity_map(shape) + gf.compose(result.chain_AB, shape)
    before, after = landmark_error_mm(None, pair), landmark_error_mm(result.chain_AB, pair)
    warped_labels = gf.warp(pair.moving_labels, result.chain_AB, mode="nearest")
    return dict(before=float(before.mean()), after=float(after.mean()), folds=float(gf.fold_percentage(phi)),
                dice_before=dice(pair.moving_labels, pair.fixed_labels, pair.num_labels),
                dice_after=dice(warped_labels, pair.fixed_labels, pair.num_labels), seconds=seconds,
                result=result)


def test_recovers_a_known_3d_deformation():
    # 48³ voxels of 6.25 mm (a 300 mm field of view), deformation up to 15 mm
    pair = make_synthetic_pair((48, 48, 48), 300 / 47, max_displacement_mm=15.0, num_landmarks=200, seed=1)
    r = _recovery(pair)
    print(f"48³: landmark error {r['before']:.2f} -> {r['after']:.2f} mm, Dice {r['dice_before']:.3f} -> "
          f"{r['dice_after']:.3f}, folds {r['folds']:.4f} %, {r['seconds']:.1f} s")
    assert r["after"] < 0.4 * r["before"]
    assert r["dice_after"] > r["dice_before"] + 0.1
    assert r["folds"] < 0.01
    # the two directions are (approximately) inverse to each other
    res = r["result"]
    x = gf.identity_map((24, 24, 24))
    roundtrip = gf.transform_points(res.chain_AB + res.chain_BA, x)
    assert (roundtrip - x).abs().mean() * 47 * 300 / 47 < 1.0  # mean round-trip error < 1 mm


def test_recovers_a_known_2d_deformation():
    pair = make_synthetic_pair((96, 96), 3.0, max_displacement_mm=12.0, num_landmarks=200, seed=2)
    r = _recovery(pair)
    assert r["after"] < 0.4 * r["before"]
    assert r["folds"] < 0.01


def test_reference_backend_also_registers():
    pair = make_synthetic_pair((24, 24, 24), 12.5, max_displacement_mm=15.0, num_landmarks=50, seed=4)
    settings = R.RegistrationSettings(levels=(R.Level(2, 2, 40), R.Level(1, 2, 20)))
    r = _recovery(pair, settings, backend="torch")
    assert r["after"] < 0.6 * r["before"]


def test_register_images_works_in_physical_space():
    """The moving image on another grid (flipped/permuted axes, other spacing and size): the exported field
    maps fixed landmarks (physical) to the true moving landmarks (physical)."""
    pair = make_synthetic_pair((40, 40, 40), 7.5, max_displacement_mm=15.0, num_landmarks=100, seed=5)
    fixed = pair.image("fixed")
    moving_same_grid = pair.image("moving")
    direction = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    shape, spacing = (44, 36, 42), (6.5, 8.0, 7.0)
    centre = fixed.geometry.index_to_physical(np.full(3, 19.5))
    origin = centre - direction @ ((np.array(shape) - 1) / 2 * np.array(spacing))
    grid = io.Geometry(shape, spacing, tuple(origin), direction.ravel())
    ref = sitk.Image(list(shape), sitk.sitkFloat32)
    grid.apply_to(ref)
    moving = io.Image(np.transpose(sitk.GetArrayFromImage(
        sitk.Resample(moving_same_grid.to_sitk(), ref, sitk.Transform(), sitk.sitkLinear, 0.0))), grid)

    out = R.register_images(fixed, moving, intensity="none")
    assert out.forward.geometry.same_grid(fixed.geometry)
    assert out.inverse.geometry.same_grid(moving.geometry)
    assert out.warped.geometry.same_grid(fixed.geometry)
    p_fixed = fixed.geometry.index_to_physical(pair.landmarks_fixed)
    p_moving = fixed.geometry.index_to_physical(pair.landmarks_moving)
    before = np.linalg.norm(p_fixed - p_moving, axis=1).mean()
    after = np.linalg.norm(out.forward.transform_points(p_fixed) - p_moving, axis=1).mean()
    back = np.linalg.norm(out.inverse.transform_points(p_moving) - p_fixed, axis=1).mean()
    print(f"physical space: landmark error {before:.2f} -> {after:.2f} mm (inverse {back:.2f} mm)")
    assert after < 0.5 * before
    assert back < 0.5 * before
    assert out.fold_percentage < 0.01


def test_masks_and_empty_overlap():
    pair = make_synthetic_pair((24, 24, 24), 12.5, num_landmarks=10, seed=6)
    fixed, moving = pair.image("fixed"), pair.image("moving")
    far = io.Geometry(moving.shape, moving.geometry.spacing, (5000.0, 0.0, 0.0), moving.geometry.direction)
    with pytest.raises(io.InputError, match="overlap.*align them first"):  # the default aligns them (test_alignment.py)
        R.register_images(fixed, io.Image(moving.array, far), intensity="none", init="none")
    two_d = io.Image(np.zeros((24, 24), np.float32), io.Geometry.isotropic((24, 24)))
    with pytest.raises(io.InputError, match="3D"):
        R.register_images(fixed, two_d)


@pytest.mark.slow
def test_recovers_a_known_deformation_at_150_cubed():
    """The issue's case: ~150³ at 2 mm, deformation up to 20 mm, default settings."""
    pair = make_synthetic_pair((150, 150, 150), 2.0, max_displacement_mm=20.0, num_landmarks=300, seed=0)
    r = _recovery(pair)
    print(f"150³: landmark error {r['before']:.2f} -> {r['after']:.2f} mm, Dice {r['dice_before']:.3f} -> "
          f"{r['dice_after']:.3f}, folds {r['folds']:.4f} %, {r['seconds']:.1f} s")
    assert r["after"] < 0.15 * r["before"]
    assert r["after"] < 1.0
    assert r["folds"] < 0.01
