"""Initial alignment (gradicon_fast.alignment, ``register --init``/``--affine-out``) and the loss grid in
millimetres (registration.loss_grid_shape) on scans that lie far apart or have thick slices.

Everything is small (24³-40³ volumes, short schedules) so each test takes a few seconds on two cores.
"""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gradicon_fast import io
from gradicon_fast import registration as R
from gradicon_fast.alignment import Affine, center_of_mass, geometric_center, initial_alignment
from gradicon_fast.cli import main as cli_main
from gradicon_fast.data.scans import displaced_pair, thick_slice_pair
from gradicon_fast.demo import make_synthetic_pair
from gradicon_fast.io.affine import write_affine

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems on shared cores

SHORT = R.RegistrationSettings(levels=(R.Level(4, 4, 40), R.Level(2, 4, 40), R.Level(1, 2, 20)))


@pytest.fixture(scope="module")
def pair():
    # a 300 mm field of view, deformation up to 6 mm
    return make_synthetic_pair((32, 32, 32), 300 / 31, max_displacement_mm=6.0, num_landmarks=100, seed=3)


def mean_error(scans, mapped) -> float:
    return float(np.linalg.norm(scans.errors(mapped), axis=1).mean())


# ------------------------------------------------------------------------------------------------
# Loss grid in millimetres
# ------------------------------------------------------------------------------------------------


def test_loss_grid_is_near_isotropic_in_millimetres():
    shape, spacing = (500, 500, 48), (0.6, 0.6, 5.0)  # a thick-slice CT
    grid = R.loss_grid_shape(shape, 80, spacing)
    voxel = [(n - 1) * h / (m - 1) for n, h, m in zip(shape, spacing, grid)]
    assert max(grid) == 80
    assert max(voxel) / min(voxel) < 1.05, (grid, voxel)
    assert R.loss_grid_shape(shape, 80) == (80, 80, 8)  # by voxel count alone: 3.8 x 3.8 x 34 mm voxels
    # an isotropic image gets the same grid either way; a small one keeps its own
    assert R.loss_grid_shape((150, 150, 150), 80, (2.0, 2.0, 2.0)) == (80, 80, 80)
    assert R.loss_grid_shape((64, 40, 64), 80, (1.5, 1.5, 1.5)) == (64, 40, 64)
    # fine voxels are never refined further; the thick axis is interpolated up to the fine spacing
    assert R.loss_grid_shape((40, 40, 10), 80, (1.0, 1.0, 4.0)) == (40, 40, 37)
    # the memory cap coarsens the whole grid
    capped = R.loss_grid_shape(shape, 80, spacing, max_voxels=30 ** 3)
    assert np.prod(capped) <= 30 ** 3 and max(capped) > 25


def test_resize_smooths_only_the_axes_it_shrinks():
    step = torch.zeros(1, 1, 64, 8, 20)
    step[..., 10:] = 1.0  # a sharp edge along the last axis
    out = R.resize(step, (16, 8, 39))  # shrink axis 0 by 4, refine axis 2 by 2
    profile = out[0, 0, 8, 4]
    assert int(((profile > 0.01) & (profile < 0.99)).sum()) <= 1  # linear interpolation: one sample on the edge
    ramp = torch.linspace(0, 1, 64).view(1, 1, 64, 1, 1).expand(1, 1, 64, 8, 20)
    assert torch.allclose(R.resize(ramp, (16, 8, 39))[0, 0, 2:-2, 4, 5], torch.linspace(0, 1, 16)[2:-2], atol=1e-3)


def test_anisotropy_warnings():
    assert R.anisotropy_warning((1.0, 1.0, 1.2)) is None
    assert R.anisotropy_warning((0.9, 0.9, 3.5)) is None
    thick = R.anisotropy_warning((0.6, 0.6, 5.0), "fixed image")
    assert "fixed image" in thick and "axis 2" in thick and "5 mm apart" in thick
    absurd = R.anisotropy_warning((0.1, 30.0, 0.1))
    assert "axis 1" in absurd and "not a usable volume" in absurd


def test_thick_slices_register_better_on_the_millimetre_grid():
    """Thick slices along axis 2 (2.5 x 2.5 x 15 mm from a 5 mm isotropic pair): the near-isotropic loss grid
    resolves the deformation along the slices far better than the grid chosen by voxel count."""
    source = make_synthetic_pair((41, 41, 41), 5.0, max_displacement_mm=12.0, num_landmarks=150, seed=4)
    scans = thick_slice_pair(source, (2.5, 2.5, 15.0))
    errors = {}
    for physical in (False, True):
        settings = R.RegistrationSettings(levels=SHORT.levels, max_size=32, physical_grid=physical)
        with pytest.warns(UserWarning, match="axis 2"):
            out = R.register_images(scans.fixed, scans.moving, intensity="none", settings=settings, init="none")
        e = scans.errors(out.forward.transform_points(scans.landmarks_fixed))
        errors[physical] = (np.abs(e[:, 2]).mean(), np.linalg.norm(e, axis=1).mean(), out.details["loss_shape"])
    print(f"slice-axis / overall error: voxel grid {errors[False]}, mm grid {errors[True]}")
    assert errors[False][2][2] < 10 and errors[True][2][2] > 25
    assert errors[True][0] < 0.6 * errors[False][0]
    assert errors[True][1] < errors[False][1]


# ------------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------------


def test_affine_is_an_affine_map():
    rng = np.random.default_rng(0)
    a = Affine(np.eye(3) + 0.1 * rng.standard_normal((3, 3)), rng.standard_normal(3) * 50)
    p = rng.standard_normal((20, 3)) * 100
    assert np.allclose(a.inverse()(a(p)), p)
    assert Affine.identity(3).is_identity() and not a.is_identity()
    assert np.allclose(Affine.translation([1.0, 2.0])(np.zeros((1, 2))), [[1.0, 2.0]])


@pytest.mark.parametrize("d, suffix", [(3, ".mat"), (3, ".txt"), (2, ".tfm")])
def test_affine_file_is_what_simpleitk_applies(tmp_path, d, suffix):
    rng = np.random.default_rng(d)
    a = Affine(np.eye(d) + 0.1 * rng.standard_normal((d, d)), rng.standard_normal(d) * 300)
    centre = rng.standard_normal(d) * 40
    path = tmp_path / f"affine{suffix}"
    write_affine(path, a.matrix, a.offset, center=centre)
    tx = sitk.ReadTransform(str(path))
    assert tx.GetName() == "AffineTransform" and tx.GetDimension() == d
    assert np.allclose(tx.GetFixedParameters(), centre)
    p = rng.standard_normal((10, d)) * 100
    assert np.allclose([tx.TransformPoint(tuple(q)) for q in p], a(p), atol=1e-6)
    assert sorted(x.name for x in tmp_path.iterdir()) == [path.name]  # nothing left beside it
    with pytest.raises(io.InputError, match="unsupported file type"):
        write_affine(tmp_path / "affine.nii.gz", a.matrix, a.offset)


def test_centres():
    g = io.Geometry((11, 21), (2.0, 1.0), (100.0, -50.0), (0.0, -1.0, 1.0, 0.0))
    assert np.allclose(geometric_center(g), g.index_to_physical([5.0, 10.0]))
    array = np.zeros((11, 21), np.float32)
    array[2, 3] = 1.0
    array[4, 3] = 3.0
    assert np.allclose(center_of_mass(io.Image(array, g)), g.index_to_physical([3.5, 3.0]))
    assert np.allclose(center_of_mass(io.Image(np.zeros_like(array), g)), geometric_center(g))


def test_center_and_moments_find_a_far_translation(pair):
    scans = displaced_pair(pair, (700.0, -350.0, 150.0))
    before = mean_error(scans, scans.landmarks_fixed)
    for mode in ("center", "moments"):
        affine, details = initial_alignment(scans.fixed, scans.moving, mode)
        assert details["init"] == mode
        after = mean_error(scans, affine(scans.landmarks_fixed))
        assert before > 700 and after < 5.0, (mode, after)
    affine, _ = initial_alignment(scans.fixed, scans.moving, "none")
    assert affine.is_identity()
    with pytest.raises(io.InputError, match="unknown initial alignment"):
        initial_alignment(scans.fixed, scans.moving, "rigid")


def test_affine_alignment_recovers_rotation_and_scale(pair):
    scans = displaced_pair(pair, (700.0, -350.0, 150.0), angle_deg=15.0, scale=1.1)
    moments, _ = initial_alignment(scans.fixed, scans.moving, "moments")
    affine, details = initial_alignment(scans.fixed, scans.moving, "affine")
    errors = {name: mean_error(scans, a(scans.landmarks_fixed)) for name, a in (("moments", moments), ("affine", affine))}
    deformation_only = mean_error(scans, scans.true_affine(scans.landmarks_fixed))  # the affine part exactly
    print(f"landmark error: moments {errors['moments']:.2f} mm, affine {errors['affine']:.2f} mm, true affine "
          f"{deformation_only:.2f} mm")
    assert details["start"] in ("center", "moments")
    assert errors["moments"] > 10
    assert errors["affine"] < deformation_only + 2.0
    assert np.abs(np.linalg.svd(affine.matrix, compute_uv=False) - 1 / 1.1).max() < 0.05


def test_registering_a_far_pair_includes_the_alignment_in_both_fields(pair):
    scans = displaced_pair(pair, (700.0, -350.0, 150.0), angle_deg=10.0, scale=1.05)
    with pytest.raises(io.InputError, match="does not overlap"):
        R.register_images(scans.fixed, scans.moving, intensity="none", settings=SHORT, init="none")
    out = R.register_images(scans.fixed, scans.moving, intensity="none", settings=SHORT)  # default: affine
    before = mean_error(scans, scans.landmarks_fixed)
    aligned = mean_error(scans, out.affine(scans.landmarks_fixed))
    after = mean_error(scans, out.forward.transform_points(scans.landmarks_fixed))
    back = np.linalg.norm(out.inverse.transform_points(scans.landmarks_moving) - scans.landmarks_fixed, axis=1).mean()
    print(f"far pair: {before:.1f} mm -> {aligned:.2f} (affine) -> {after:.2f} mm (inverse {back:.2f} mm)")
    assert out.details["alignment"]["init"] == "affine"
    assert after < 3.0 and after < aligned
    assert back < 3.0
    assert out.fold_percentage < 0.01
    assert out.forward.geometry.same_grid(scans.fixed.geometry) and out.inverse.geometry.same_grid(scans.moving.geometry)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def test_register_far_apart_pair_from_the_command_line(pair, tmp_path, capsys):
    scans = displaced_pair(pair, (700.0, -350.0, 150.0), angle_deg=10.0, scale=1.05)
    io.write_image(tmp_path / "fixed.nii.gz", scans.fixed)
    io.write_image(tmp_path / "moving.nii.gz", scans.moving)
    common = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
              "--iterations", "40", "40", "20", "-q"]
    assert cli_main(common + ["--init", "none", "--transform-out", str(tmp_path / "none.nii.gz")]) == 1
    assert "does not overlap" in capsys.readouterr().err
    assert not (tmp_path / "none.nii.gz").exists()

    out_field, out_affine = tmp_path / "transform.nii.gz", tmp_path / "affine.mat"
    assert cli_main(common + ["--transform-out", str(out_field), "--affine-out", str(out_affine)]) == 0
    capsys.readouterr()
    field = io.read_displacement_field(out_field)
    tx = sitk.ReadTransform(str(out_affine))
    assert tx.GetName() == "AffineTransform"
    before = mean_error(scans, scans.landmarks_fixed)
    aligned = mean_error(scans, np.array([tx.TransformPoint(tuple(p)) for p in scans.landmarks_fixed]))
    after = mean_error(scans, field.transform_points(scans.landmarks_fixed))
    print(f"command line, far pair: {before:.1f} mm -> {aligned:.2f} mm (--affine-out) -> {after:.2f} mm")
    assert aligned < 10 and after < 3.0


def test_command_line_warns_about_thick_slices(pair, tmp_path, capsys):
    g = pair.geometry
    thick = io.Geometry((32, 32, 6), (g.spacing[0], g.spacing[1], 60.0), g.origin, g.direction)
    image = io.Image(np.ascontiguousarray(pair.image("fixed").array[:, :, ::6][:, :, :6]), thick)
    io.write_image(tmp_path / "thick.nii.gz", image)
    args = ["register", "--fixed", str(tmp_path / "thick.nii.gz"), "--moving", str(tmp_path / "thick.nii.gz"),
            "--iterations", "2", "2", "2", "--init", "none", "-q", "--transform-out", str(tmp_path / "t.nii.gz")]
    assert cli_main(args) == 0
    err = capsys.readouterr().err
    assert "warning: the fixed image's voxels are 9.67742x9.67742x60 mm" in err
    assert "warning: the moving image's voxels" in err
