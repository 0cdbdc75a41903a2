"""Exported warped images equal what ITK/ANTs make of the exported transform, outside the moving image too.

SimpleITK's ``Resample`` with the exported field (``DisplacementFieldTransform``, linear or nearest
neighbour, a default pixel value) is the reference: ``io.warp_image``, ``register --warped-out`` and
``warp --out`` must reproduce it at every voxel, on grids with non-trivial origin, spacing and
direction where a large part of the fixed grid maps outside the moving image (docs/conventions.md §7).
"""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gradicon_fast import cli, io
from gradicon_fast import reference
from gradicon_fast.demo import make_synthetic_pair


def rotation(a, b, c):
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


def oblique_geometry(shape, spacing, origin, rng):
    d = len(shape)
    direction = rotation(*rng.uniform(-0.6, 0.6, 3)) if d == 3 else rotation(rng.uniform(-0.6, 0.6), 0, 0)[:2, :2]
    flips = rng.choice([-1.0, 1.0], d)
    return io.Geometry(shape, spacing, origin, (direction * flips[None, :]).ravel())


def sitk_array(img):
    return np.transpose(sitk.GetArrayFromImage(img))


def sitk_resample(moving: io.Image, reference_geometry: io.Geometry, transform, *, nearest=False, default=0.0):
    ref = sitk.Image(list(reference_geometry.shape), sitk.sitkUInt8)
    reference_geometry.apply_to(ref)
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk_array(sitk.Resample(moving.to_sitk(), ref, transform, interpolator, float(default)))


def distance_to_ambiguity(index, shape, nearest):
    """Continuous indices' distance (voxels) to where the result jumps: the inside/outside threshold,
    and for nearest neighbour the half-integers. Points exactly there depend on the last bit of the
    physical-to-index conversion, which ITK rounds its own way."""
    upper = np.asarray(shape) - 0.5
    gap = np.minimum(np.abs(index + 0.5), np.abs(index - upper))
    if nearest:
        gap = np.minimum(gap, np.abs(index + 0.5 - np.round(index + 0.5)))
    return gap.min(axis=-1)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("nearest", [False, True])
@pytest.mark.parametrize("default", [0.0, -7.25])
@pytest.mark.parametrize("seed", range(3))
def test_warp_image_is_sitk_resample_everywhere(d, nearest, default, seed):
    rng = np.random.default_rng(seed)
    default = np.floor(default) if nearest else default  # a label value
    moving_shape = (7, 6, 5)[:d]
    moving_g = oblique_geometry(moving_shape, rng.uniform(0.6, 2.5, d), rng.uniform(-50, 50, d), rng)
    if nearest:
        moving = io.Image(rng.integers(-30, 30, moving_shape).astype(np.int16), moving_g)
    else:
        moving = io.Image(rng.normal(size=moving_shape).astype(np.float32), moving_g)
    fixed_g = oblique_geometry((9, 8, 7)[:d], rng.uniform(0.6, 2.5, d), rng.uniform(-50, 50, d), rng)
    # targets anywhere from 1.5 voxels before the moving image to 1.5 after it: outside, in the half
    # voxel bands past the first and last voxel centres, and inside
    index = rng.uniform(-1.5, np.asarray(moving_shape) + 0.5, (*fixed_g.shape, d))
    field = io.DisplacementField(moving_g.index_to_physical(index) - fixed_g.grid_physical(), fixed_g)

    ours = io.warp_image(moving, field, mode="nearest" if nearest else "bilinear", default_value=default).array
    theirs = sitk_resample(moving, fixed_g, field.to_sitk_transform(), nearest=nearest, default=default)

    assert ours.dtype == (moving.array.dtype if nearest else np.float32)
    clear = distance_to_ambiguity(index, moving_shape, nearest) > 1e-6
    assert clear.mean() > 0.99
    assert np.abs(ours.astype(np.float64) - theirs)[clear].max() < 1e-5
    outside = ~np.all((index >= -0.5) & (index < np.asarray(moving_shape) - 0.5), axis=-1)
    band = np.any(((index >= -0.5) & (index < 0)) | ((index > np.asarray(moving_shape) - 1)
                                                      & (index < np.asarray(moving_shape) - 0.5)), axis=-1)
    assert 0.2 < outside.mean() < 0.9 and (band & ~outside).any()
    assert np.all(ours[outside & clear] == np.asarray(default, ours.dtype))


def test_default_value_none_clamps_to_the_border_as_training_does():
    rng = np.random.default_rng(0)
    moving_g = oblique_geometry((6, 7, 5), (1.2, 0.8, 2.0), (3.0, -4.0, 5.0), rng)
    moving = io.Image(rng.normal(size=moving_g.shape).astype(np.float32), moving_g)
    fixed_g = io.Geometry.isotropic((8, 9, 7), 1.1)
    index = rng.uniform(-3, np.asarray(moving_g.shape) + 2, (*fixed_g.shape, 3))
    field = io.DisplacementField(moving_g.index_to_physical(index) - fixed_g.grid_physical(), fixed_g)

    clamped = io.warp_image(moving, field, default_value=None).array
    coords = torch.as_tensor(index / moving_g.map_scale, dtype=torch.float32).movedim(-1, 0)[None]
    expected = reference.sample(moving.tensor(), coords)[0, 0].numpy()  # the border-clamped sampling of §1
    assert np.abs(clamped - expected).max() < 1e-5
    filled = io.warp_image(moving, field, default_value=123.0).array
    outside = filled == 123.0
    assert outside.mean() > 0.3 and not np.any(clamped[outside] == 123.0)
    assert np.array_equal(clamped[~outside], filled[~outside])


@pytest.mark.parametrize("value, dtype", [(-1, np.uint8), (0.5, np.int16), (70000, np.int16), (np.nan, np.int32)])
def test_a_default_value_the_label_type_cannot_hold_is_an_error(value, dtype):
    g = io.Geometry.isotropic((4, 5, 6))
    labels = io.Image(np.ones(g.shape, dtype), g)
    field = io.DisplacementField(np.zeros((*g.shape, 3)), g)
    with pytest.raises(io.InputError, match="cannot be stored"):
        io.warp_image(labels, field, mode="nearest", default_value=value)
    assert io.warp_image(labels, field, mode="nearest", default_value=7).array.dtype == dtype


# ------------------------------------------------------------------------------------------------
# The command line: register and warp
# ------------------------------------------------------------------------------------------------

FAST = ["--iterations", "20", "15", "10", "--max-size", "24", "-q"]


@pytest.fixture(scope="module")
def cropped_pair(tmp_path_factory):
    """Fixed: a 32³ image at (6, 5.5, 6.5) mm, axes permuted and flipped. Moving: the deformed image
    resampled on a smaller, rotated grid inside it (about half of the fixed grid lies outside), with
    intensities that do not vanish at its border."""
    folder = tmp_path_factory.mktemp("cropped")
    pair = make_synthetic_pair((32, 32, 32), 6.0, max_displacement_mm=12.0, num_landmarks=10, seed=5)
    fixed_g = io.Geometry((32, 32, 32), (6.0, 5.5, 6.5), (100.0, -50.0, 20.0),
                          (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    shape, spacing = np.array([22, 20, 21]), np.array([6.5, 6.0, 5.5])
    direction = rotation(0.35, -0.25, 0.2)
    centre = fixed_g.index_to_physical((np.array(fixed_g.shape) - 1) / 2) + np.array([8.0, -5.0, 6.0])
    origin = centre - direction @ ((shape - 1) / 2 * spacing)
    moving_g = io.Geometry(tuple(shape), tuple(spacing), tuple(origin), direction.ravel())
    identity = sitk.Transform(3, sitk.sitkIdentity)
    files = {}
    for name, nearest in (("fixed", False), ("moving", False), ("moving_labels", True)):
        image = pair.image(name)
        if name.startswith("moving"):
            on_fixed = io.Image(image.array, fixed_g)
            array = sitk_resample(on_fixed, moving_g, identity, nearest=nearest).astype(image.array.dtype)
            image = io.Image(array + (0.2 if name == "moving" else 0), moving_g)
        else:
            image = io.Image(image.array, fixed_g)
        files[name] = folder / f"{name}.{'nii.gz' if name == 'fixed' else 'nrrd'}"
        io.write_image(files[name], image)
    return files


def run(*args):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main([str(a) for a in args])
    finally:
        torch.set_num_threads(before)


def test_register_and_warp_outputs_are_what_sitk_makes_of_the_transform(cropped_pair, tmp_path):
    fixed = io.read_image(cropped_pair["fixed"])
    moving = io.read_image(cropped_pair["moving"])
    assert run("register", "--fixed", cropped_pair["fixed"], "--moving", cropped_pair["moving"],
               "--warped-out", tmp_path / "warped.nii.gz", "--transform-out", tmp_path / "transform.h5",
               "--default-value", -5, *FAST) == 0
    ours = io.read_image(tmp_path / "warped.nii.gz").array
    transform = io.read_transform(tmp_path / "transform.h5")
    theirs = sitk_resample(moving, fixed.geometry, transform, default=-5)
    assert 0.2 < (theirs == -5).mean() < 0.8
    assert np.abs(ours - theirs).max() < 1e-4

    # warp, with the field as a vector NIfTI, the default value 0 and another one, linear and nearest
    io.write_displacement_field(tmp_path / "transform.nii.gz", io.read_displacement_field(tmp_path / "transform.h5"))
    transform = io.read_transform(tmp_path / "transform.nii.gz")
    for extra, default in (((), 0.0), (("--default-value", 2.5), 2.5)):
        assert run("warp", "--moving", cropped_pair["moving"], "--transform", tmp_path / "transform.nii.gz",
                   "--reference", cropped_pair["fixed"], "--out", tmp_path / "w.mha", *extra, "-q") == 0
        theirs = sitk_resample(moving, fixed.geometry, transform, default=default)
        assert (theirs == default).mean() > 0.2
        assert np.abs(io.read_image(tmp_path / "w.mha").array - theirs).max() < 1e-4

    labels = io.read_image(cropped_pair["moving_labels"], dtype=None)
    assert run("warp", "--moving", cropped_pair["moving_labels"], "--transform", tmp_path / "transform.nii.gz",
               "--reference", cropped_pair["fixed"], "--out", tmp_path / "labels.nii.gz", "--nearest",
               "--default-value", 9, "-q") == 0
    ours = io.read_image(tmp_path / "labels.nii.gz", dtype=None).array
    theirs = sitk_resample(labels, fixed.geometry, transform, nearest=True, default=9)
    assert ours.dtype == labels.array.dtype and (theirs == 9).mean() > 0.2
    assert np.array_equal(ours, theirs)


def test_warp_rejects_a_default_value_the_labels_cannot_hold(cropped_pair, tmp_path, capsys):
    g = io.read_image(cropped_pair["fixed"]).geometry
    io.write_displacement_field(tmp_path / "zero.nii.gz", io.DisplacementField(np.zeros((*g.shape, 3)), g))
    status = run("warp", "--moving", cropped_pair["moving_labels"], "--transform", tmp_path / "zero.nii.gz",
                 "--reference", cropped_pair["fixed"], "--out", tmp_path / "labels.nii.gz", "--nearest",
                 "--default-value", 0.5)
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0 and len(err) == 1 and "cannot be stored" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero.nii.gz"]
