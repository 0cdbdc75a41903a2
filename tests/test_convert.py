"""gradicon_fast.convert against the frameworks' own sampling, both ways, 2D and 3D, non-cubic, batched.

Each convention is checked by warping an image with the framework's own sampler and with
``gradicon_fast.warp`` of the converted field. MONAI (``Warp``, ``DVF2DDF``) and SimpleITK
(``DisplacementFieldTransform`` + ``Resample``) are the real packages; ``torch.nn.functional.grid_sample``
is torch's. VoxelMorph's ``SpatialTransformer`` is checked against its formula written out here
(identity voxel grid + flow, normalised by ``2 / (S - 1)`` and shifted by -1, channels reversed,
``grid_sample`` with ``align_corners=True`` and zero padding), since installing voxelmorph drags in
SciPy and scikit-image; where voxelmorph is installed the real package is checked too.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradicon_fast as gf
from gradicon_fast import convert, io
from gradicon_fast.io.itk_sampling import inside_image

SHAPES = {2: (9, 13), 3: (6, 9, 7)}
WARP_TOL = 2e-5  # float32 interpolation of images in [0, 1]


def smooth_field(batch, shape, amplitude, generator, dtype=torch.float32):
    """A smooth random field ``(batch, d, *shape)``: coarse noise upsampled, up to about ``amplitude``."""
    d = len(shape)
    coarse = torch.randn(batch, d, *([3] * d), generator=generator, dtype=torch.float64)
    mode = "bilinear" if d == 2 else "trilinear"
    return (amplitude * F.interpolate(coarse, size=shape, mode=mode, align_corners=True)).to(dtype)


def random_image(batch, shape, generator, channels=2):
    return torch.rand(batch, channels, *shape, generator=generator)


def voxel_scale(shape):
    return torch.tensor([s - 1 for s in shape], dtype=torch.float64).view(1, len(shape), *([1] * len(shape)))


def targets_inside(flow):
    """Voxels whose target ``p + flow(p)`` lies within [0, S - 1] on every axis: there every padding mode
    samples the same values."""
    shape = flow.shape[2:]
    p = gf.identity_map(shape, dtype=torch.float64) * voxel_scale(shape) + flow.double()
    return ((p >= 0) & (p <= voxel_scale(shape))).all(dim=1, keepdim=True)


def voxelmorph_warp(image, flow, padding_mode="zeros"):
    """VoxelMorph's documented SpatialTransformer: grid = voxel meshgrid + flow, each axis normalised
    to [-1, 1] by 2 / (S - 1), channels reversed to grid_sample's order, align_corners=True."""
    shape = flow.shape[2:]
    meshgrid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=flow.dtype) for s in shape], indexing="ij"))
    coords = meshgrid[None] + flow
    normalised = torch.stack([coords[:, k] * 2 / (s - 1) - 1 for k, s in enumerate(shape)], dim=1)
    grid = normalised.movedim(1, -1).flip(-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def voxelmorph_integrate(velocity, steps):
    """VoxelMorph's scaling and squaring (IntegrateVelocityField, integrate_vec): v / 2^steps, then
    disp += warp(disp, disp) `steps` times."""
    disp = velocity / 2 ** steps
    for _ in range(steps):
        disp = disp + voxelmorph_warp(disp, disp)
    return disp


def border_vanishing(velocity):
    """``velocity`` times a window that is 0 on the grid's border: no squaring step then samples outside the
    grid, where zero padding and border clamping differ."""
    shape = velocity.shape[2:]
    window = torch.ones(shape, dtype=velocity.dtype)
    for k, s in enumerate(shape):
        ramp = torch.sin(torch.linspace(0, torch.pi, s, dtype=torch.float64)) ** 2
        window = window * ramp.to(velocity.dtype).view(*[s if i == k else 1 for i in range(len(shape))])
    return velocity * window


def two_field_chain(batch, shape, generator):
    """A chain of a coarse and a full-resolution field (the coarse one with batch 1, broadcast)."""
    coarse = tuple((s + 1) // 2 for s in shape)
    return [smooth_field(1, coarse, 0.08, generator), smooth_field(batch, shape, 0.05, generator)]


# --------------------------------------------------------------------------------------------
# Voxel displacements: VoxelMorph SpatialTransformer, MONAI Warp
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_voxel_displacement_warps_as_voxelmorph(d, seed):
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[d]
    image, flow = random_image(3, shape, g), smooth_field(3, shape, 2.5, g)
    ours = gf.warp(image, convert.from_voxel_displacement(flow))
    theirs = voxelmorph_warp(image, flow)
    inside = targets_inside(flow).expand_as(ours)
    assert 0.3 < inside.float().mean() < 1  # the field reaches outside: the comparison is restricted
    torch.testing.assert_close(ours[inside], theirs[inside], atol=WARP_TOL, rtol=0)
    torch.testing.assert_close(ours, voxelmorph_warp(image, flow, "border"), atol=WARP_TOL, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
def test_voxel_displacement_warps_as_real_voxelmorph(d):
    vxm = pytest.importorskip("voxelmorph")
    g = torch.Generator().manual_seed(d)
    shape = SHAPES[d]
    image, flow = random_image(2, shape, g), smooth_field(2, shape, 2.0, g)
    ours = gf.warp(image, convert.from_voxel_displacement(flow))
    theirs = vxm.nn.modules.SpatialTransformer()(image, flow)
    inside = targets_inside(flow).expand_as(ours)
    torch.testing.assert_close(ours[inside], theirs[inside], atol=WARP_TOL, rtol=0)
    velocity = border_vanishing(smooth_field(2, shape, 1.5, g, torch.float64))
    torch.testing.assert_close(convert.to_voxel_displacement(convert.from_velocity(velocity, steps=5)),
                               vxm.nn.functional.integrate_vec(velocity, steps=5), atol=1e-10, rtol=0)


@pytest.mark.filterwarnings("ignore:monai")
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("padding_mode", ["border", "zeros", "reflection"])
def test_voxel_displacement_warps_as_monai(d, padding_mode):
    monai_blocks = pytest.importorskip("monai.networks.blocks")
    g = torch.Generator().manual_seed(d)
    shape = SHAPES[d]
    image, flow = random_image(2, shape, g), smooth_field(2, shape, 2.5, g)
    ours = gf.warp(image, convert.from_voxel_displacement(flow))
    theirs = monai_blocks.Warp(mode="bilinear", padding_mode=padding_mode)(image, flow)
    # MONAI's default "border" is gradicon_fast's sampling everywhere; the other modes differ outside only
    everywhere = torch.ones_like(ours, dtype=torch.bool)
    where = everywhere if padding_mode == "border" else targets_inside(flow).expand_as(ours)
    torch.testing.assert_close(ours[where], theirs[where], atol=WARP_TOL, rtol=0)


@pytest.mark.filterwarnings("ignore:monai")
@pytest.mark.parametrize("d", [2, 3])
def test_chain_to_voxel_displacement_warps_as_monai_and_voxelmorph(d):
    monai_blocks = pytest.importorskip("monai.networks.blocks")
    g = torch.Generator().manual_seed(10 + d)
    shape = SHAPES[d]
    image, chain = random_image(2, shape, g), two_field_chain(2, shape, g)
    flow = convert.to_voxel_displacement(chain, shape)
    assert flow.shape == (2, d, *shape)
    ours = gf.warp(image, chain)
    torch.testing.assert_close(monai_blocks.Warp(padding_mode="border")(image, flow), ours, atol=WARP_TOL, rtol=0)
    inside = targets_inside(flow).expand_as(ours)
    torch.testing.assert_close(voxelmorph_warp(image, flow)[inside], ours[inside], atol=WARP_TOL, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
def test_voxel_displacement_round_trips(d):
    g = torch.Generator().manual_seed(20 + d)
    shape = SHAPES[d]
    flow = smooth_field(3, shape, 3.0, g)
    chain = convert.from_voxel_displacement(flow)
    assert len(chain) == 1 and chain[0].shape == flow.shape
    torch.testing.assert_close(chain[0], (flow.double() / voxel_scale(shape)).float(), atol=0, rtol=1e-6)
    torch.testing.assert_close(convert.to_voxel_displacement(chain), flow, atol=1e-6, rtol=1e-6)
    disp = smooth_field(3, shape, 0.1, g)
    torch.testing.assert_close(convert.from_voxel_displacement(convert.to_voxel_displacement([disp]))[0], disp,
                               atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Velocities: MONAI DVF2DDF, VoxelMorph integrate_vec
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:monai")
@pytest.mark.parametrize("d", [2, 3])
def test_velocity_integrates_as_monai_dvf2ddf(d):
    monai_blocks = pytest.importorskip("monai.networks.blocks")
    g = torch.Generator().manual_seed(30 + d)
    shape = SHAPES[d]
    velocity = smooth_field(2, shape, 3.0, g, torch.float64)  # reaches out of the grid
    chain = convert.from_velocity(velocity, steps=6)
    ddf = monai_blocks.DVF2DDF(num_steps=6, padding_mode="border")(velocity)
    torch.testing.assert_close(convert.to_voxel_displacement(chain), ddf, atol=1e-10, rtol=0)
    # MONAI's default zero padding agrees where no squaring step samples outside the grid
    inner = border_vanishing(velocity)
    torch.testing.assert_close(convert.to_voxel_displacement(convert.from_velocity(inner, steps=6)),
                               monai_blocks.DVF2DDF(num_steps=6)(inner), atol=1e-10, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("steps", [0, 1, 7])
def test_velocity_integrates_as_voxelmorph(d, steps):
    g = torch.Generator().manual_seed(40 + d)
    shape = SHAPES[d]
    velocity = border_vanishing(smooth_field(3, shape, 2.0, g, torch.float64))
    ours = convert.to_voxel_displacement(convert.from_velocity(velocity, steps=steps))
    torch.testing.assert_close(ours, voxelmorph_integrate(velocity, steps), atol=1e-10, rtol=0)
    if steps:  # an integrated velocity is not the velocity
        assert (ours - velocity).abs().max() > 1e-3


def test_velocity_integration_is_differentiable_on_every_backend():
    g = torch.Generator().manual_seed(50)
    velocity = smooth_field(2, SHAPES[3], 2.0, g).requires_grad_()
    weights = torch.randn(2, 3, *SHAPES[3], generator=g)
    grads = []
    for backend in ("torch", "cpu"):
        disp = convert.from_velocity(velocity, steps=4, backend=backend)[0]
        grads.append(torch.autograd.grad((disp * weights).sum(), velocity)[0])
    assert grads[0].abs().max() > 0.1
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# grid_sample grids
# --------------------------------------------------------------------------------------------


def random_grid(batch, output_shape, generator):
    """Grid positions in [-1.2, 1.2]: some fall outside the image."""
    d = len(output_shape)
    return torch.rand(batch, *output_shape, d, generator=generator) * 2.4 - 1.2


def grid_inside(grid, input_shape, align_corners):
    """Grid points whose unnormalised index lies within [0, S - 1] on every axis."""
    size = torch.tensor(list(reversed(input_shape)), dtype=grid.dtype)
    index = (grid + 1) / 2 * (size - 1) if align_corners else ((grid + 1) * size - 1) / 2
    return ((index >= 0) & (index <= size - 1)).all(dim=-1)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("align_corners", [True, False])
def test_grid_warps_as_grid_sample(d, align_corners):
    g = torch.Generator().manual_seed(60 + d)
    input_shape, output_shape = SHAPES[d], ((11, 6) if d == 2 else (5, 8, 4))
    image, grid = random_image(3, input_shape, g), random_grid(3, output_shape, g)
    chain = convert.from_grid(grid, align_corners=align_corners, input_shape=input_shape)
    assert chain[0].shape == (3, d, *output_shape)
    ours = gf.warp(image, chain, shape=output_shape)
    theirs = F.grid_sample(image, grid, padding_mode="border", align_corners=align_corners)
    torch.testing.assert_close(ours, theirs, atol=WARP_TOL, rtol=0)
    inside = grid_inside(grid, input_shape, align_corners)[:, None].expand_as(ours)
    assert 0.2 < inside.float().mean() < 1
    zeros = F.grid_sample(image, grid, padding_mode="zeros", align_corners=align_corners)
    torch.testing.assert_close(ours[inside], zeros[inside], atol=WARP_TOL, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("align_corners", [True, False])
def test_chain_to_grid_warps_as_grid_sample(d, align_corners):
    g = torch.Generator().manual_seed(70 + d)
    shape = SHAPES[d]
    input_shape = tuple(s + 3 for s in shape)  # the sampled image has its own grid
    image, chain = random_image(2, input_shape, g), two_field_chain(2, shape, g)
    grid = convert.to_grid(chain, shape, align_corners=align_corners, input_shape=input_shape)
    assert grid.shape == (2, *shape, d)
    theirs = F.grid_sample(image, grid, padding_mode="border", align_corners=align_corners)
    torch.testing.assert_close(theirs, gf.warp(image, chain, shape=shape), atol=WARP_TOL, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("align_corners", [True, False])
def test_grid_round_trips(d, align_corners):
    g = torch.Generator().manual_seed(80 + d)
    input_shape, output_shape = SHAPES[d], ((4, 10) if d == 2 else (7, 5, 6))
    grid = random_grid(2, output_shape, g)
    chain = convert.from_grid(grid, align_corners=align_corners, input_shape=input_shape)
    back = convert.to_grid(chain, align_corners=align_corners, input_shape=input_shape)
    torch.testing.assert_close(back, grid, atol=1e-6, rtol=0)
    disp = smooth_field(2, output_shape, 0.1, g)
    grid = convert.to_grid([disp], align_corners=align_corners, input_shape=input_shape)
    again = convert.from_grid(grid, align_corners=align_corners, input_shape=input_shape)[0]
    torch.testing.assert_close(again, disp, atol=1e-6, rtol=0)


def test_identity_grid_is_affine_grid_of_the_identity():
    """The identity chain gives torch's own identity grid (F.affine_grid), in either align_corners mode."""
    for shape in SHAPES.values():
        d = len(shape)
        theta = torch.eye(d, d + 1)[None]
        zero = [torch.zeros(1, d, *shape)]
        for align_corners in (True, False):
            expected = F.affine_grid(theta, (1, 1, *shape), align_corners=align_corners)
            grid = convert.to_grid(zero, align_corners=align_corners, input_shape=shape)
            torch.testing.assert_close(grid, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# ITK/ANTs physical fields
# --------------------------------------------------------------------------------------------


def oblique_geometry(shape, rng):
    d = len(shape)
    angle = rng.uniform(-0.5, 0.5)
    rotation = np.eye(d)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    direction = rotation * rng.choice([-1.0, 1.0], d)[None, :]
    return io.Geometry(shape, rng.uniform(0.7, 1.6, d), rng.uniform(-20, 20, d), direction.ravel())


def sitk_resample(moving: io.Image, fixed: io.Geometry, transform):
    import SimpleITK as sitk

    reference = sitk.Image(list(fixed.shape), sitk.sitkUInt8)
    fixed.apply_to(reference)
    warped = sitk.Resample(moving.to_sitk(), reference, transform, sitk.sitkLinear, 0.0)
    return torch.from_numpy(np.transpose(sitk.GetArrayFromImage(warped)).astype(np.float32))


def itk_pair(d, seed):
    """Fixed and moving grids that differ (oblique, anisotropic, other shapes) and a moving image."""
    rng = np.random.default_rng(seed)
    fixed = oblique_geometry(SHAPES[d], rng)
    moving_shape = tuple(s + 2 for s in SHAPES[d])
    moving = oblique_geometry(moving_shape, rng)
    # put the moving grid's centre on the fixed grid's, so most of the fixed grid maps inside it
    centre = fixed.map_to_physical(np.full(d, 0.5)) - moving.map_to_physical(np.full(d, 0.5))
    moving = io.Geometry(moving.shape, moving.spacing, np.asarray(moving.origin) + centre, moving.direction)
    image = io.Image(rng.random(moving_shape).astype(np.float32), moving)
    return fixed, moving, image


def itk_inside(field: io.DisplacementField, moving: io.Geometry):
    return torch.from_numpy(inside_image(moving.physical_to_index(field.target_points()), moving.shape))


@pytest.mark.parametrize("d", [2, 3])
def test_itk_field_warps_as_sitk_resample(d):
    import SimpleITK as sitk

    fixed, moving, image = itk_pair(d, seed=d)
    rng = np.random.default_rng(90 + d)
    field = io.DisplacementField(rng.normal(0, 1.5, (*fixed.shape, d)), fixed)
    expected = sitk_resample(image, fixed, field.to_sitk_transform())
    inside = itk_inside(field, moving)
    assert inside.float().mean() > 0.2  # a good part of the fixed grid maps inside the moving image
    for given in (field, field.to_sitk_image(dtype=np.float64), field.to_sitk_transform()):
        chain = convert.from_itk(given, moving=image)
        assert chain[0].shape == (1, d, *fixed.shape) and chain[0].dtype == torch.float32
        ours = gf.warp(image.tensor(), chain, shape=fixed.shape)[0, 0]
        torch.testing.assert_close(ours[inside], expected[inside], atol=WARP_TOL, rtol=0)
    assert isinstance(field.to_sitk_transform(), sitk.DisplacementFieldTransform)


@pytest.mark.parametrize("d", [2, 3])
def test_chain_to_itk_warps_as_sitk_resample(d):
    fixed, moving, image = itk_pair(d, seed=10 + d)
    g = torch.Generator().manual_seed(100 + d)
    chain = two_field_chain(1, fixed.shape, g)
    field = convert.to_itk(chain, fixed, moving=moving)
    assert field.geometry == fixed and field.vectors.shape == (*fixed.shape, d)
    expected = sitk_resample(image, fixed, field.to_sitk_transform())
    ours = gf.warp(image.tensor(), chain, shape=fixed.shape)[0, 0]
    inside = itk_inside(field, moving)
    assert inside.float().mean() > 0.2  # a good part of the fixed grid maps inside the moving image
    torch.testing.assert_close(ours[inside], expected[inside], atol=WARP_TOL, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
def test_itk_round_trips(d):
    fixed, moving, _ = itk_pair(d, seed=20 + d)
    g = torch.Generator().manual_seed(110 + d)
    disp = smooth_field(1, fixed.shape, 0.1, g, torch.float64)
    for target in (None, moving):
        field = convert.to_itk([disp], fixed, moving=target)
        back = convert.from_itk(field, moving=target, dtype=torch.float64)[0]
        torch.testing.assert_close(back, disp, atol=1e-12, rtol=0)
    rng = np.random.default_rng(d)
    field = io.DisplacementField(rng.normal(0, 2.0, (*fixed.shape, d)), fixed)
    for target in (None, moving):
        chain = convert.from_itk(field, moving=target, dtype=torch.float64)
        back = convert.to_itk(chain, fixed, moving=target)
        np.testing.assert_allclose(back.vectors, field.vectors, atol=1e-9)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    flow = torch.zeros(2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="batch dimension is missing"):
        convert.from_voxel_displacement(flow[0])
    with pytest.raises(ValueError, match=r"flow must be \(B, d, \*S\)"):
        convert.from_voxel_displacement(torch.zeros(2, 2, 4, 5, 6))
    with pytest.raises(TypeError, match="floating-point"):
        convert.from_voxel_displacement(flow.long())
    with pytest.raises(ValueError, match="steps must be"):
        convert.from_velocity(flow, steps=-1)
    with pytest.raises(ValueError, match="channels-first"):
        convert.from_grid(flow, align_corners=True)
    with pytest.raises(ValueError, match="needs input_shape"):
        convert.from_grid(torch.zeros(2, 4, 5, 6, 3), align_corners=False)
    with pytest.raises(TypeError, match="align_corners must be True or False"):
        convert.from_grid(torch.zeros(2, 4, 5, 6, 3), align_corners=None)
    with pytest.raises(ValueError, match="input_shape must have 3 entries"):
        convert.to_grid([flow], align_corners=False, input_shape=(4, 5))
    with pytest.raises(ValueError, match="different grids"):
        convert.to_voxel_displacement([flow, torch.zeros(1, 3, 2, 3, 3)])
    with pytest.raises(TypeError, match="single tensor"):
        convert.to_voxel_displacement(flow)
    with pytest.raises(ValueError, match="is on meta"):
        convert.to_grid([flow, torch.zeros(2, 3, 4, 5, 6, device="meta")], align_corners=True)
    fixed = io.Geometry.isotropic((4, 5, 6))
    with pytest.raises(ValueError, match="batch size 2"):
        convert.to_itk([flow], fixed)
    with pytest.raises(ValueError, match="the chain is 3D but the fixed grid is 2D"):
        convert.to_itk([flow[:1]], io.Geometry.isotropic((4, 5)))
    with pytest.raises(TypeError, match="fixed must be a gradicon_fast.io.Geometry"):
        convert.to_itk([flow[:1]], (4, 5, 6))
    with pytest.raises(TypeError, match="field must be"):
        convert.from_itk(flow)
    import SimpleITK as sitk

    with pytest.raises(TypeError, match="not a displacement field"):
        convert.from_itk(sitk.AffineTransform(3))


def test_exported_from_the_package():
    assert gf.convert is convert and "convert" in gf.__all__
