"""The published uniGradICON protocol (gradicon_fast.published_protocol) for ``register --model``.

The preprocessing, the box-to-box resampling onto the network grid and the mapping back to physical
space are checked against independent re-implementations of the official conventions written here
(the official ITK wrapper's resampling transform as matrices, trilinear interpolation by hand),
and, where ``itk`` is installed, against ``icon_registration.itk_wrapper.register_pair`` itself.
MIND-SSC and the masked similarities are checked against a direct formula and the official losses.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import io
from gradicon_fast import published_protocol as P
from gradicon_fast.nn.mind import mind_ssc
from gradicon_fast.nn.similarity import Similarity


def rotation(a: float, b: float) -> np.ndarray:
    ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
    return np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])


def ct_volume(shape, seed: int) -> np.ndarray:
    """A CT-like volume in HU: air around a body with a dark (lung) and a bright (bone) blob, noise."""
    rng = np.random.default_rng(seed)
    x = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    inside = lambda centre, radii: np.sum(((x - centre[:x.shape[-1]]) / radii[:x.shape[-1]]) ** 2, -1) < 1  # noqa
    array = np.where(inside(np.zeros(3), np.array([0.8, 0.7, 0.9])), 40.0, -1000.0)
    array += np.where(inside(np.array([0.3, 0, 0]), np.full(3, 0.25)), -800.0, 0.0)
    array += np.where(inside(np.array([-0.3, 0.1, 0]), np.full(3, 0.2)), 900.0, 0.0)
    return (array + 30 * rng.standard_normal(shape)).astype(np.float32)


class FakeModel:
    """What the protocol reads of a model: its input shape and whether its weights are official."""

    def __init__(self, input_shape, official: bool):
        self.input_shape = tuple(input_shape)
        self.weights_format = "official" if official else "gradicon_fast"


# ------------------------------------------------------------------------------------------------
# Intensities
# ------------------------------------------------------------------------------------------------


def test_ct_is_clamped_to_the_hu_window_and_scaled():
    array = np.array([[-3000.0, -1000.0, -500.0], [0.0, 1000.0, 2500.0]], dtype=np.float32)
    np.testing.assert_allclose(P.preprocess(array, "ct"), [[0, 0, 0.25], [0.5, 1, 1]], atol=1e-7)
    mask = np.array([[1, 0, 3], [0, -2, 1]])
    np.testing.assert_allclose(P.preprocess(array, "ct", mask), [[0, 0, 0.25], [0, 0, 1]], atol=1e-7)


@pytest.mark.parametrize("count", [7, 50, 101, 1000])
def test_mri_is_clamped_to_its_minimum_and_the_kth_smallest_value(count):
    rng = np.random.default_rng(count)
    array = rng.normal(300, 100, size=count).astype(np.float32)
    # the official percentile: torch.kthvalue with k = int(0.99 * count), at least 1
    high = torch.kthvalue(torch.from_numpy(array), max(1, int(0.99 * count))).values.item()
    low = float(array.min())
    expected = (np.clip(array, low, high) - low) / (high - low)
    out = P.preprocess(array, "mri")
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() == 0 and abs(out.max() - 1) < 1e-6


def test_an_image_without_intensity_range_is_one_error():
    with pytest.raises(io.InputError, match="no intensity range"):
        P.preprocess(np.full((4, 4), 7.0), "mri")


# ------------------------------------------------------------------------------------------------
# The network grid: independent re-implementations of the official conventions
# ------------------------------------------------------------------------------------------------


def linear_resize_1d(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``array`` sampled along ``axis`` at the image indices of ``size`` network voxels: v + ½ = (n/N)(x + ½),
    linear, clamped to the ends (np.interp)."""
    n = array.shape[axis]
    v = (n / size) * (np.arange(size) + 0.5) - 0.5
    return np.apply_along_axis(lambda line: np.interp(v, np.arange(n), line), axis, array)


@pytest.mark.parametrize("official", [True, False])
def test_the_network_sees_each_image_box_stretched_onto_its_grid(official):
    rng = np.random.default_rng(3)
    array = rng.random((9, 14, 6)).astype(np.float32)  # our axis order (ITK index i, j, k)
    net_shape = (8, 11, 12)                             # the network's axis order
    out = P.network_input(array, FakeModel(net_shape, official))[0, 0].numpy()
    expected = array.transpose(2, 1, 0) if official else array  # official: numpy's reversed axes
    for axis, size in enumerate(net_shape):
        expected = linear_resize_1d(expected, axis, size)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def trilinear_clamped(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``field`` (C, X, Y, Z) at continuous indices ``points`` (P, 3), clamped to the grid, by hand."""
    size = np.array(field.shape[1:])
    p = np.clip(points, 0, size - 1)
    base = np.minimum(np.floor(p).astype(int), size - 2)
    t = p - base
    out = np.zeros((len(points), field.shape[0]))
    for corner in itertools.product((0, 1), repeat=3):
        weight = np.prod([t[:, k] if c else 1 - t[:, k] for k, c in enumerate(corner)], axis=0)
        index = base + np.array(corner)
        out += weight[:, None] * field[:, index[:, 0], index[:, 1], index[:, 2]].T
    return out


def official_resampling_transform(geometry: io.Geometry, network_size_itk: np.ndarray):
    """The official wrapper's map from network index (ITK order) to the image's physical space, as
    ``(matrix, centre, image_centre)``: p = matrix·(x − centre) + image_centre, where centre is the network
    grid's centre ((N − 1)/2), image_centre the image's (physical point of index (n − 1)/2) and matrix
    Direction·diag(spacing · n / N)."""
    n = np.array(geometry.shape, dtype=float)
    direction = np.array(geometry.direction).reshape(3, 3)
    matrix = direction @ np.diag(np.array(geometry.spacing) * n / network_size_itk)
    return matrix, (network_size_itk - 1) / 2, geometry.index_to_physical((n - 1) / 2)


@pytest.mark.parametrize("official", [True, False])
def test_the_maps_go_back_to_physical_space_as_the_official_composite_transform(official):
    net_shape = (7, 9, 8)
    model = FakeModel(net_shape, official)
    fixed = io.Geometry((11, 6, 10), (0.9, 1.3, 2.5), (-20.0, 10.0, 5.0), rotation(0.2, 0.1).ravel())
    moving = io.Geometry((8, 12, 5), (1.1, 0.7, 3.0), (-15.0, 12.0, 0.0), rotation(-0.3, 0.05).ravel())
    rng = np.random.default_rng(5)
    # [0, 1] units, network axis order; float32 as a network returns it
    displacement = (0.1 * rng.standard_normal((1, 3, *net_shape))).astype(np.float32)
    voxels = P.displacement_in_voxels(torch.from_numpy(displacement), model)
    ours = P.target_points(voxels, fixed, moving).reshape(-1, 3)

    # the official composite: fixed physical p → network index (inverse resampling transform of the
    # fixed image) → + the displacement field in network index space → moving physical (resampling
    # transform of the moving image); the field image's axes and components in ITK order
    sizes_net = np.array(net_shape, dtype=float)
    field = displacement[0].astype(np.float64) * (sizes_net - 1).reshape(3, 1, 1, 1)
    if official:
        field = field[::-1].transpose(0, 3, 2, 1)
    size_itk = np.array(field.shape[1:], dtype=float)
    m_B, c, centre_B = official_resampling_transform(fixed, size_itk)
    m_A, _, centre_A = official_resampling_transform(moving, size_itk)
    points = fixed.grid_physical().reshape(-1, 3)
    x = np.linalg.solve(m_B, (points - centre_B).T).T + c
    assert (x >= -0.5).all() and (x < size_itk - 0.5).all()  # inside ITK's field buffer: interpolated, clamped
    y = x + trilinear_clamped(field.astype(np.float64), x)
    expected = (y - c) @ m_A.T + centre_A
    np.testing.assert_allclose(ours, expected, atol=1e-8)
    assert np.abs(expected - points).max() > 1.0


# ------------------------------------------------------------------------------------------------
# The official pipeline itself (itk installed)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_register_model_gives_the_official_itk_pipelines_transforms(tmp_path):
    itk = pytest.importorskip("itk")
    from icon_oracle import official_loss, official_network, randomize
    from icon_registration import itk_wrapper

    net_shape = (66, 72, 68)  # numpy order; the official U-Net needs every axis >= 65 in 3D

    def itk_image(array, spacing, origin, direction):
        image = itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(itk.matrix_from_array(direction))
        return image

    def official_ct(image):  # the published preprocessing, with ITK's filters
        image = itk.clamp_image_filter(itk.CastImageFilter[type(image), itk.Image[itk.F, 3]].New()(image),
                                       Bounds=(-1000, 1000))
        return itk.shift_scale_image_filter(image, shift=1000.0, scale=1 / 2000)

    fixed_itk = itk_image(ct_volume((40, 50, 30), 1), (0.9, 0.8, 2.5), (-20.0, 10.0, 5.0), rotation(0.2, 0.1))
    moving_itk = itk_image(ct_volume((44, 36, 28), 2), (1.1, 1.0, 2.0), (-15.0, 12.0, 0.0), rotation(-0.1, 0.05))
    itk.imwrite(fixed_itk, str(tmp_path / "fixed.nrrd"))
    itk.imwrite(moving_itk, str(tmp_path / "moving.nrrd"))
    network = randomize(official_network(3), seed=3, scale=0.05).eval()
    torch.save(network.state_dict(), tmp_path / "weights.trch")
    phi_AB, phi_BA = itk_wrapper.register_pair(official_loss(network, net_shape).eval(), official_ct(moving_itk),
                                               official_ct(fixed_itk), finetune_steps=None)

    result = gf.register(tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd", tmp_path / "weights.trch",
                         model_shape=net_shape, fixed_modality="ct", moving_modality="ct", io_iterations=0)
    for field, transform in ((result.forward, phi_AB), (result.inverse, phi_BA)):
        points = field.geometry.grid_physical().reshape(-1, 3)
        theirs = np.array([transform.TransformPoint(p.tolist()) for p in points])
        assert np.abs(theirs - points).max() > 10  # mm: a real deformation
        # measured: 8.6e-6 mm (forward) and 1.0e-5 mm (inverse) for displacements up to 32 mm
        np.testing.assert_allclose(field.target_points().reshape(-1, 3), theirs, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# MIND-SSC and masked similarities
# ------------------------------------------------------------------------------------------------


def mind_direct(image: np.ndarray, radius: int = 2, dilation: int = 2) -> np.ndarray:
    """MIND-SSC (12, X, Y, Z) of one 3D image by its formula, voxel by voxel (clamped indices)."""
    size = np.array(image.shape)
    six = [(-1, 0, 0), (0, 0, -1), (0, -1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0)]
    pairs = [(i, j) for i in range(6) for j in range(i) if sum((a - b) ** 2 for a, b in zip(six[i], six[j])) == 2]
    at = lambda q: image[tuple(np.clip(q, 0, size - 1))]  # noqa: E731
    box = list(itertools.product(range(-radius, radius + 1), repeat=3))
    ssd = np.zeros((12,) + image.shape)
    for p in itertools.product(*[range(s) for s in image.shape]):
        for c, (i, j) in enumerate(pairs):
            total = 0.0
            for t in box:
                q = np.clip(np.add(p, t), 0, size - 1)
                total += (at(q + dilation * np.array(six[i])) - at(q + dilation * np.array(six[j]))) ** 2
            ssd[(c,) + p] = total / len(box)
    mind = ssd - ssd.min(0)
    variance = mind.mean(0)
    variance = np.clip(variance, 0.001 * variance.mean(), 1000 * variance.mean())
    return np.exp(-mind / variance)[[6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3]]


def test_mind_ssc_is_its_formula():
    image = np.random.default_rng(2).random((5, 6, 4))
    out = mind_ssc(torch.from_numpy(image)[None, None].float())[0].double().numpy()
    np.testing.assert_allclose(out, mind_direct(image), atol=1e-5)


def test_masked_similarities_equal_the_official_ones():
    icon_losses = pytest.importorskip("icon_registration.losses")
    gen = torch.Generator().manual_seed(4)
    a, b = torch.rand(2, 1, 12, 13, 11, generator=gen), torch.rand(2, 1, 12, 13, 11, generator=gen)
    mask = (torch.rand(2, 1, 12, 13, 11, generator=gen) > 0.4).float()
    official = {"lncc": icon_losses.LNCC(sigma=2), "squared_lncc": icon_losses.SquaredLNCC(sigma=2),
                "mind": icon_losses.MINDSSC(radius=2, dilation=2)}
    for name, theirs in official.items():
        ours = Similarity(name, sigma=2)
        for m in (None, mask):
            assert torch.allclose(ours(a, b, m), theirs(a, b, m), atol=1e-6), name
    assert not torch.allclose(Similarity("lncc", 2)(a, b, mask), Similarity("lncc", 2)(a, b))


# ------------------------------------------------------------------------------------------------
# register --model and gradicon_fast.register with an official weight file
# ------------------------------------------------------------------------------------------------

NET_2D = (20, 28)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 2D CT-like pair on different rotated grids, masks, a wrong-grid mask, official 2D weights."""
    from icon_oracle import official_network, randomize

    folder = tmp_path_factory.mktemp("protocol")
    angle = lambda a: np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]).ravel()  # noqa: E731
    fixed = io.Image(ct_volume((30, 26), 1), io.Geometry((30, 26), (0.8, 1.1), (-12.0, 3.0), angle(0.2)))
    moving = io.Image(ct_volume((24, 33), 2), io.Geometry((24, 33), (1.0, 0.9), (-10.0, 1.0), angle(-0.1)))
    paths = {name: folder / f"{name}.nrrd" for name in ("fixed", "moving", "fixed_mask", "moving_mask", "bad_mask")}
    io.write_image(paths["fixed"], fixed)
    io.write_image(paths["moving"], moving)
    io.write_image(paths["fixed_mask"], io.Image((fixed.array > -500).astype(np.uint8), fixed.geometry))
    io.write_image(paths["moving_mask"], io.Image((moving.array > -500).astype(np.uint8), moving.geometry))
    io.write_image(paths["bad_mask"], io.Image(np.ones((30, 25), np.uint8), fixed.geometry.__class__(
        (30, 25), fixed.geometry.spacing, fixed.geometry.origin, fixed.geometry.direction)))
    torch.save(randomize(official_network(2), seed=7, scale=0.02).eval().state_dict(), folder / "weights.trch")
    paths["weights"] = folder / "weights.trch"
    return paths


def cli(capsys, *args):
    from test_cli import InProcess

    return InProcess(capsys, "register", *args, "-q")


def test_the_command_line_writes_the_api_result_and_the_jacobian(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    proc = cli(capsys, "--fixed", files["fixed"], "--moving", files["moving"], "--model", files["weights"],
               "--model-shape", *NET_2D, "--fixed-modality", "ct", "--moving-modality", "mri", "--io-iterations", "0",
               "--transform-out", out / "t.nii.gz", "--inverse-transform-out", out / "inv.nii.gz",
               "--warped-out", out / "w.nii.gz", "--jacobian-out", out / "j.nii.gz")
    assert proc.returncode == 0, proc.stderr
    api = gf.register(files["fixed"], io.read_image(files["moving"]), files["weights"], model_shape=NET_2D,
                      fixed_modality="ct", moving_modality="mri", io_iterations=0)
    field = io.read_displacement_field(out / "t.nii.gz")
    np.testing.assert_allclose(field.vectors, api.forward.vectors, atol=1e-4)
    np.testing.assert_allclose(io.read_displacement_field(out / "inv.nii.gz").vectors, api.inverse.vectors, atol=1e-4)
    np.testing.assert_allclose(io.read_image(out / "w.nii.gz").array, api.warped.array, atol=1e-3)
    jacobian = io.read_image(out / "j.nii.gz")
    np.testing.assert_allclose(jacobian.array, field.jacobian_determinant().numpy(), atol=1e-4)
    np.testing.assert_allclose(jacobian.geometry.origin, field.geometry.index_to_physical(np.full(2, 0.5)), atol=1e-4)
    metrics = api.metrics
    assert metrics["jacobian_min"] <= metrics["jacobian_mean"] <= metrics["jacobian_max"]
    assert api.details["axes_reversed"] and np.abs(api.forward.vectors).max() > 1
    # the modalities are the published preprocessing: another one changes the result
    other = gf.register(files["fixed"], files["moving"], files["weights"], model_shape=NET_2D, fixed_modality="mri",
                        moving_modality="mri", io_iterations=0)
    assert np.abs(other.forward.vectors - api.forward.vectors).max() > 1e-3


def test_instance_optimisation_options_reach_the_loss(files):
    from gradicon_fast.nn import standard_network

    torch.manual_seed(1)
    model = standard_network(NET_2D, width=0.125)  # a small network: the options do not depend on it
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def forward(**options):
        torch.manual_seed(0)  # the penalty's random points
        settings = dict(fixed_modality="ct", moving_modality="ct", io_iterations=2, io_lr=1e-3,
                        fixed_mask=files["fixed_mask"], moving_mask=files["moving_mask"])
        return gf.register(files["fixed"], files["moving"], model, **{**settings, **options}).forward.vectors

    plain = forward()
    assert np.array_equal(plain, forward())  # the differences below are the options'
    for options in (dict(io_similarity="lncc2"), dict(mask_use="both"), dict(io_lr=3e-3), dict(io_iterations=0)):
        assert np.abs(forward(**options) - plain).max() > 1e-4, options
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is left unchanged


@pytest.mark.parametrize("case", ["modality without model", "similarity without model", "init with model",
                                  "mask on the wrong grid", "loss masking with one mask", "mind in 2D"])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, case):
    base = ["--fixed", files["fixed"], "--moving", files["moving"], "--transform-out", tmp_path / "t.nii.gz",
            "--jacobian-out", tmp_path / "j.nii.gz"]
    model = ["--model", files["weights"], "--model-shape", *NET_2D, "--io-iterations", "0"]
    args, status, phrase = {
        "modality without model": (["--fixed-modality", "ct"], 2, "--fixed-modality needs --model"),
        "similarity without model": (["--io-similarity", "mind"], 2, "--io-similarity needs --model"),
        "init with model": (model + ["--init", "affine"], 2, "--init is for model-free registration"),
        "mask on the wrong grid": (model + ["--fixed-mask", files["bad_mask"]], 1, "has shape (30, 25)"),
        "loss masking with one mask": (model + ["--fixed-mask", files["fixed_mask"], "--mask-use", "loss"], 1,
                                       "needs both a fixed and a moving mask"),
        "mind in 2D": (model + ["--io-similarity", "mind"], 1, "3D images only"),
    }[case]
    from test_cli import one_line_error

    one_line_error(cli(capsys, *base, *args), phrase, status=status)
    assert not any(tmp_path.iterdir())


def test_the_python_entry_point_runs_model_free_registration_too(files):
    from gradicon_fast.registration import Level, RegistrationSettings

    settings = RegistrationSettings(levels=(Level(2, 2, 3),), max_size=16)
    result = gf.register(io.read_image(files["fixed"]), files["moving"], settings=settings, intensity="ct", init="none")
    assert result.method == "model-free" and set(result.metrics) >= {"fold_percentage", "jacobian_min", "seconds"}
    assert result.forward.geometry.same_grid(io.read_image(files["fixed"]).geometry)
    with pytest.raises(io.InputError, match="needs a model"):
        gf.register(files["fixed"], files["moving"], settings=settings, fixed_modality="ct")
    with pytest.raises(TypeError, match="file path or a gradicon_fast.io.Image"):
        gf.register(np.zeros((4, 4)), files["moving"])
