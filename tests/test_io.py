"""gradicon_fast.io: geometry, image files, intensity presets, masks and the exported transforms.

The exported displacement fields are checked against SimpleITK itself: sitk.Resample with the
DisplacementFieldTransform read from our files must reproduce our own warped image, and
TransformPoint must agree with gf.transform_points.
"""

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import gradicon_fast as gf
from gradicon_fast import io

# A direction that permutes and flips the axes, with anisotropic spacing: any mix-up of axis order,
# LPS/RAS or spacing shows.
DIRECTION_3D = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def oblique_direction():
    a, b = 0.3, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def geometry_3d(shape=(20, 24, 18), direction=DIRECTION_3D):
    return io.Geometry(shape, (1.5, 2.0, 2.5), (10.0, -20.0, 30.0), np.asarray(direction).ravel())


def smooth_image(shape):
    x = np.stack(np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij"), -1)
    out = np.sin(7 * x[..., 0]) * np.cos(5 * x[..., 1])
    for k in range(2, len(shape)):
        out = out + x[..., k] ** 2
    return out.astype(np.float32)


def smooth_displacement(shape, amplitude=0.03):
    d = len(shape)
    x = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij"))
    disp = torch.zeros(1, d, *shape)
    for k in range(d):
        disp[0, k] = amplitude * torch.sin(3 * x[(k + 1) % d] + k) * torch.cos(2 * x[k])
    return disp


def sitk_array(img):
    return np.transpose(sitk.GetArrayFromImage(img))


# ------------------------------------------------------------------------------------------------
# Geometry and images
# ------------------------------------------------------------------------------------------------


def test_geometry_coordinate_round_trips():
    g = geometry_3d(direction=oblique_direction())
    rng = np.random.default_rng(0)
    idx = rng.uniform(0, 17, (50, 3))
    assert np.allclose(g.physical_to_index(g.index_to_physical(idx)), idx)
    x = idx / g.map_scale
    assert np.allclose(g.map_to_physical(x), g.index_to_physical(idx))
    assert np.allclose(g.physical_to_map(g.map_to_physical(x)), x)
    # voxel (0,0,0) is the origin; one step along index axis k moves spacing[k] along direction column k
    assert np.allclose(g.index_to_physical(np.zeros(3)), g.origin)
    for k in range(3):
        step = np.zeros(3)
        step[k] = 1
        assert np.allclose(g.index_to_physical(step) - g.origin, g.direction_matrix[:, k] * g.spacing[k])
    # the identity map's channel k is index_k / (S_k - 1)
    ident = gf.identity_map(g.shape)[0].movedim(0, -1).double().numpy()
    assert np.allclose(g.map_to_physical(ident), g.grid_physical(), atol=1e-4)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_image_round_trip_keeps_array_and_geometry(tmp_path, suffix):
    g = geometry_3d(direction=oblique_direction())
    image = io.Image(smooth_image(g.shape), g)
    path = tmp_path / f"img{suffix}"
    io.write_image(path, image)
    back = io.read_image(path)
    assert back.array.shape == g.shape
    assert np.allclose(back.array, image.array)
    assert back.geometry.same_grid(g, tol=1e-5)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_axis_order_and_affine_match_nibabel(tmp_path):
    g = geometry_3d(direction=oblique_direction())
    image = io.Image(smooth_image(g.shape), g)
    io.write_image(tmp_path / "a.nii.gz", image)
    nimg = nib.load(tmp_path / "a.nii.gz")
    assert nimg.shape == g.shape
    assert np.allclose(nimg.get_fdata(), image.array, atol=1e-6)      # (i, j, k) order
    assert np.allclose(nimg.affine, g.affine_ras, atol=1e-4)          # RAS = diag(-1,-1,1) · LPS


def test_2d_image_round_trip(tmp_path):
    g = io.Geometry((30, 20), (0.7, 1.3), (5.0, -3.0), (0.0, 1.0, -1.0, 0.0))
    image = io.Image(smooth_image(g.shape), g)
    io.write_image(tmp_path / "a.nrrd", image)
    back = io.read_image(tmp_path / "a.nrrd")
    assert back.ndim == 2 and np.allclose(back.array, image.array) and back.geometry.same_grid(g)


def test_read_errors_are_input_errors(tmp_path):
    with pytest.raises(io.InputError, match="does not exist"):
        io.read_image(tmp_path / "missing.nii.gz", what="fixed image")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(io.InputError, match="cannot read fixed image"):
        io.read_image(bad, what="fixed image")
    vec = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3)), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "vec.nrrd"))
    with pytest.raises(io.InputError, match="components"):
        io.read_image(tmp_path / "vec.nrrd")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    # a writer's failure (SimpleITK raises RuntimeError) becomes one line naming the file
    with pytest.raises(io.OutputError, match=r"cannot write output '.*out\.nii\.gz': interrupted"):
        with io.atomic_output(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with pytest.raises(KeyError):  # other errors (a bug in the body) pass through unchanged
        with io.atomic_output(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise KeyError("bug")
    assert os.listdir(tmp_path) == []
    with pytest.raises(io.InputError, match="unsupported file type"):
        io.write_image(tmp_path / "out.png", io.Image(np.zeros((4, 4, 4), np.float32), io.Geometry.isotropic((4, 4, 4))))
    with pytest.raises(io.InputError, match="does not exist"):
        io.check_writable(tmp_path / "no_such_dir" / "x.nii.gz")


def test_intensity_presets():
    ct = np.array([-2000, -1000, -500, 0, 800], np.float32)
    assert np.allclose(io.normalize_intensity(ct, "ct"), [0, 0, 0.5, 1, 1])
    assert io.guess_modality(np.full(100, -1000.0)) == "ct"
    assert np.allclose(io.normalize_intensity(ct, "auto"), io.normalize_intensity(ct, "ct"))
    mri = np.linspace(0, 1000, 100001).astype(np.float32)
    out = io.normalize_intensity(mri, "mri")
    assert out.min() == 0 and out.max() == 1
    assert abs(out[50000] - 0.5) < 1e-3                             # percentiles 0.5 and 99.5 -> 0 and 1
    assert np.isclose(io.normalize_intensity(mri, "mri")[int(0.005 * 100000)], 0, atol=1e-3)
    assert np.allclose(io.normalize_intensity(mri, "none"), mri)
    with pytest.raises(io.InputError):
        io.normalize_intensity(mri, "pet")


def test_masks(tmp_path):
    g = geometry_3d()
    image = io.Image(smooth_image(g.shape), g)
    m = np.zeros(g.shape, np.uint8)
    m[5:10, 5:10, 5:10] = 1
    io.write_image(tmp_path / "m.nii.gz", io.Image(m, g))
    assert io.read_mask(tmp_path / "m.nii.gz", image).sum() == 125
    io.write_image(tmp_path / "empty.nii.gz", io.Image(np.zeros_like(m), g))
    with pytest.raises(io.InputError, match="empty"):
        io.read_mask(tmp_path / "empty.nii.gz", image)
    other = io.Geometry((10, 10, 10), g.spacing, g.origin, g.direction)
    io.write_image(tmp_path / "small.nii.gz", io.Image(np.ones((10, 10, 10), np.uint8), other))
    with pytest.raises(io.InputError, match="shape"):
        io.read_mask(tmp_path / "small.nii.gz", image)
    moved = io.Geometry(g.shape, g.spacing, (0.0, 0.0, 0.0), g.direction)
    io.write_image(tmp_path / "moved.nii.gz", io.Image(m, moved))
    with pytest.raises(io.InputError, match="grid"):
        io.read_mask(tmp_path / "moved.nii.gz", image)


# ------------------------------------------------------------------------------------------------
# Transforms: our conventions against SimpleITK's
# ------------------------------------------------------------------------------------------------


def test_displacement_unit_conversion_round_trip():
    g = geometry_3d(direction=oblique_direction())
    disp = smooth_displacement(g.shape)
    u = io.displacement_to_physical(disp, g)
    assert u.shape == (*g.shape, 3)
    assert torch.allclose(io.physical_to_displacement(u, g), disp, atol=1e-6)
    # a displacement of one voxel along index axis k is spacing[k] mm along direction column k
    one = torch.zeros(1, 3, *g.shape)
    one[0, 1] = 1 / (g.shape[1] - 1)
    assert np.allclose(io.displacement_to_physical(one, g)[3, 4, 5], g.direction_matrix[:, 1] * g.spacing[1])


def test_vector_nifti_is_written_as_ants_does(tmp_path):
    g = geometry_3d(direction=oblique_direction())
    field = io.DisplacementField.from_map_displacement(smooth_displacement(g.shape), g)
    io.write_displacement_field(tmp_path / "warp.nii.gz", field)
    n = nib.load(tmp_path / "warp.nii.gz")
    assert n.shape == (*g.shape, 1, 3)
    assert n.header.get_intent()[0] == "vector" and int(n.header["intent_code"]) == 1007
    assert n.get_data_dtype() == np.float32
    assert np.allclose(n.affine, g.affine_ras, atol=1e-4)
    # components stored as they are: LPS millimetres (no RAS flip), in x, y, z order
    assert np.allclose(n.get_fdata()[:, :, :, 0, :], field.vectors, atol=1e-4)
    back = io.read_displacement_field(tmp_path / "warp.nii.gz")
    assert back.geometry.same_grid(g, tol=1e-5) and np.allclose(back.vectors, field.vectors, atol=1e-4)


@pytest.mark.parametrize("suffix", [".nii.gz", ".h5", ".nrrd", ".mha"])
@pytest.mark.parametrize("oblique", [False, True])
def test_sitk_resample_reproduces_our_warp(tmp_path, suffix, oblique):
    g = geometry_3d(direction=oblique_direction() if oblique else DIRECTION_3D)
    moving = io.Image(smooth_image(g.shape), g)
    disp = smooth_displacement(g.shape)
    ours = gf.warp(moving.tensor(), [disp])[0, 0].numpy()

    io.write_displacement_field(tmp_path / f"t{suffix}", io.DisplacementField.from_map_displacement(disp, g))
    io.write_image(tmp_path / "moving.nrrd", moving)
    if suffix == ".h5":
        tx = sitk.ReadTransform(str(tmp_path / f"t{suffix}"))     # what an ITK tool sees
    else:
        tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(tmp_path / f"t{suffix}")),
                                                       sitk.sitkVectorFloat64))
    ref = sitk.ReadImage(str(tmp_path / "moving.nrrd"))
    theirs = sitk_array(sitk.Resample(ref, ref, tx, sitk.sitkLinear, 0.0))
    inner = (slice(2, -2),) * 3  # away from the border, where ITK pads with 0 and we clamp
    assert np.abs(theirs - ours)[inner].max() < 1e-3

    # points: sitk's TransformPoint, our DisplacementField and gf.transform_points agree
    rng = np.random.default_rng(1)
    idx = rng.uniform(2, np.array(g.shape) - 3, (20, 3))
    p = g.index_to_physical(idx)
    sitk_points = np.array([tx.TransformPoint(tuple(q)) for q in p])
    x = torch.as_tensor(idx / g.map_scale, dtype=torch.float32).T[None]
    ours_points = g.map_to_physical(gf.transform_points([disp], x)[0].T.double().numpy())
    assert np.abs(sitk_points - ours_points).max() < 1e-3
    field = io.read_displacement_field(tmp_path / f"t{suffix}")
    assert np.abs(field.transform_points(p) - sitk_points).max() < 1e-3


def test_warp_image_across_grids_matches_sitk(tmp_path):
    """Moving image on another grid than the field (the fixed grid): resampling goes through physical space."""
    fixed_g = geometry_3d(shape=(16, 18, 14), direction=oblique_direction())
    shape, spacing = (22, 20, 24), (1.8, 1.6, 1.7)
    # centred on the fixed grid's centre, but with another orientation, spacing and size
    offset = DIRECTION_3D @ ((np.array(shape) - 1) / 2 * np.array(spacing))
    centre = fixed_g.index_to_physical((np.array(fixed_g.shape) - 1) / 2)
    moving_g = io.Geometry(shape, spacing, tuple(centre - offset), DIRECTION_3D.ravel())
    moving = io.Image(smooth_image(moving_g.shape), moving_g)
    field = io.DisplacementField.from_map_displacement(smooth_displacement(fixed_g.shape, 0.02), fixed_g)
    ours = io.warp_image(moving, field).array
    ref = sitk.Image(list(fixed_g.shape), sitk.sitkFloat32)
    fixed_g.apply_to(ref)
    theirs = sitk_array(sitk.Resample(moving.to_sitk(), ref, field.to_sitk_transform(), sitk.sitkLinear, -99.0))
    inside = theirs != -99.0
    assert inside.mean() > 0.3
    assert np.abs(theirs - ours)[inside].max() < 1e-3


def test_2d_field_export(tmp_path):
    g = io.Geometry((30, 20), (0.7, 1.3), (5.0, -3.0), (0.0, 1.0, -1.0, 0.0))
    moving = io.Image(smooth_image(g.shape), g)
    disp = smooth_displacement(g.shape)
    field = io.DisplacementField.from_map_displacement(disp, g)
    for suffix in (".nii.gz", ".h5"):
        io.write_displacement_field(tmp_path / f"t{suffix}", field)
        back = io.read_displacement_field(tmp_path / f"t{suffix}")
        assert back.geometry.same_grid(g) and np.allclose(back.vectors, field.vectors, atol=1e-4)
    tx = io.read_transform(tmp_path / "t.h5")
    theirs = sitk_array(sitk.Resample(moving.to_sitk(), moving.to_sitk(), tx, sitk.sitkLinear, 0.0))
    ours = gf.warp(moving.tensor(), [disp])[0, 0].numpy()
    assert np.abs(theirs - ours)[2:-2, 2:-2].max() < 1e-3


def test_affine_transform_file_sampled_on_a_reference(tmp_path):
    g = geometry_3d()
    tx = sitk.AffineTransform(3)
    tx.SetTranslation((3.0, -2.0, 1.5))
    sitk.WriteTransform(tx, str(tmp_path / "affine.tfm"))
    with pytest.raises(io.InputError, match="reference"):
        io.read_displacement_field(tmp_path / "affine.tfm")
    field = io.read_displacement_field(tmp_path / "affine.tfm", g)
    assert np.allclose(field.vectors, [3.0, -2.0, 1.5])
    assert field.fold_percentage() == 0


def test_jacobian_of_a_field_is_physical():
    # a uniform 10 % stretch along physical x: determinant 1.1 whatever the grid's orientation
    g = geometry_3d(direction=oblique_direction())
    pts = g.grid_physical()
    u = np.zeros_like(pts)
    u[..., 0] = 0.1 * (pts[..., 0] - pts[..., 0].mean())
    field = io.DisplacementField(u, g)
    det = field.jacobian_determinant()
    assert det.shape == tuple(s - 1 for s in g.shape)
    assert torch.allclose(det, torch.full_like(det, 1.1), atol=1e-5)


def test_nii_gz_is_read_even_beside_a_nii_of_the_same_name(tmp_path):
    """ITK's NIfTI reader, asked for a.nii.gz, opens a.nii when it exists."""
    geometry = io.Geometry.isotropic((4, 5, 6))
    io.write_image(tmp_path / "a.nii", io.Image(np.zeros((4, 5, 6), np.float32), geometry))
    io.write_image(tmp_path / "a.nii.gz", io.Image(np.ones((4, 5, 6), np.float32), geometry))
    assert (io.read_image(tmp_path / "a.nii.gz").array == 1).all()
    assert (io.read_image(tmp_path / "a.nii").array == 0).all()
