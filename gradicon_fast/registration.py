"""Model-free registration: optimise the displacement fields of a pair directly, GradICON-regularised.

Classical-tool style (multi-resolution, coarse to fine, Adam), with the paper's objective:
``sim(A∘φ_AB, B) + sim(B∘φ_BA, A) + λ·GradICON(φ_AB, φ_BA)`` (docs/conventions.md §2-3, sparse penalty, stride 2), A
the moving and B the fixed image. φ_AB and φ_BA are one displacement field each (a chain of length
1), defined on a coarse grid and sampled trilinearly. Each level refines the previous level's fields
on a finer grid: field = the previous level's field (trilinearly upsampled, which represents
exactly the same transform) + a Gaussian-smoothed update, the update being what Adam optimises.
The field resolution and the update smoothing are the smoothness prior that a network's inductive
bias provides in the paper (GradICON alone does not penalise a pair of irregular but mutually
inverse maps). The images are first brought to a *loss grid* of at most ``max_size`` voxels per
axis; the final chain is evaluated at full resolution.

    result = register(fixed, moving)          # (1, 1, *S) tensors on the same grid, [0, 1] intensities
    warped = gf.warp(moving, result.chain_AB)

``register_images`` does the same for :class:`~gradicon_fast.io.Image` s on any grids (physical
space), and returns physical displacement fields ready to export.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import functional as gfn
from . import reference
from .reduction import fixed_order_mean
from .alignment import initial_alignment, overlap_fraction

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One resolution level: images at ``1/image_scale`` and fields at ``1/field_scale`` of the loss grid."""

    image_scale: float
    field_scale: float
    iterations: int


@dataclass
class RegistrationSettings:
    """Defaults tuned on synthetic ~150³ pairs at 2 mm with deformations up to 25 mm and image noise up to
    a third of the tissue intensity (see benchmarks/registration.py): λ = 0 folds (4 % of the cells),
    λ alone is not enough on noisy images (in regions without structure both fields follow the noise
    while staying inverse to each other, which GradICON does not penalise); smoothing the field
    updates (σ = 2 field voxels) with λ = 2 keeps every tested case fold-free."""

    max_size: int = 80                  # loss grid: near-isotropic in mm, no axis over this many voxels
    max_voxels: int = 128 ** 3          # memory cap on the loss grid's voxel count (coarser spacing beyond)
    physical_grid: bool = True          # False: the loss grid keeps the image's voxel aspect (no spacing used)
    levels: tuple[Level, ...] = (Level(4, 4, 100), Level(2, 4, 100), Level(1, 2, 50))
    lr: float = 0.1                     # Adam step, in voxels of the level's field grid
    lmbda: float = 2.0                  # weight of the GradICON penalty
    sigma: int = 3                      # LNCC Gaussian σ in voxels of the level's image grid (docs/conventions.md §3)
    similarity: str = "lncc"            # "lncc", "lncc2" (squared) or "mse"
    stride: int = 2                     # sparse GradICON (the paper's variant)
    smooth: float = 2.0                 # Gaussian σ (field voxels) smoothing each level's field update; 0: none
    diffusion: float = 0.0              # weight of a diffusion penalty on each field (0: GradICON only)
    seed: int = 0

    def describe(self) -> str:
        levels = ", ".join(f"1/{lv.image_scale:g} ({lv.iterations} it)" for lv in self.levels)
        extra = (f", field smoothing σ={self.smooth:g}" if self.smooth else "") + \
            (f", diffusion {self.diffusion:g}" if self.diffusion else "")
        return (f"levels {levels}; λ={self.lmbda:g}, {self.similarity} σ={self.sigma}, lr={self.lr:g}{extra}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RegistrationResult:
    chain_AB: list[Tensor]              # moving→fixed warp: fixed = moving ∘ φ_AB (fixed-grid [0, 1] units)
    chain_BA: list[Tensor]
    loss_history: list[tuple[int, float, float, float]] = field(default_factory=list)  # (level, total, sim, reg)
    seconds: float = 0.0
    loss_shape: tuple[int, ...] = ()


# ------------------------------------------------------------------------------------------------
# Similarity (docs/conventions.md §3), Gaussian smoothing by banded matrices
# ------------------------------------------------------------------------------------------------


def gaussian_taps(sigma: float, *, dtype=torch.float32) -> Tensor:
    """docs/conventions.md §3's taps: k = 4σ + 1 points at -(k-1)/2 … (k-1)/2, weights exp(-x²/2σ²), normalised."""
    k = int(round(4 * sigma)) + 1
    x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (w / w.sum()).to(dtype)


def _band_matrix(size: int, taps: Tensor) -> Tensor:
    """``G`` with ``(x @ G.T)[i] = Σ_t taps[t] x[i + t - r]`` and zeros beyond the ends (zero padding)."""
    r = taps.numel() // 2
    i = torch.arange(size)
    offset = i[None, :] - i[:, None] + r
    inside = (offset >= 0) & (offset < taps.numel())
    return torch.where(inside, taps[offset.clamp(0, taps.numel() - 1)], torch.zeros((), dtype=taps.dtype))


def _smooth_axes(x: Tensor, matrices: Sequence[Tensor]) -> Tensor:
    """Apply ``matrices[k]`` along spatial axis k of ``(B, C, *S)``, without transposing copies: the
    axis is the middle one of a ``(before, S_k, after)`` view, multiplied from the left; the last
    axis, the last one of a ``(B·C·S_0, rows, S_last)`` view, multiplied from the right.

    Every product is a batched one: torch's single 2D product (MKL sgemm) rounds differently with
    the number of threads (measured: 1 against 3 threads), the batched ones were bit-identical for
    1-8 threads (tests/test_reproducibility.py checks it)."""
    shape = x.shape
    spatial = shape[2:]
    before = shape[0] * shape[1]
    for k, m in enumerate(matrices):
        after = math.prod(spatial[k + 1:])
        if after == 1 and k > 0:
            batch = shape[0] * shape[1] * spatial[0]
            x = torch.bmm(x.reshape(batch, before // batch, spatial[k]), m.T.expand(batch, *m.shape)).reshape(shape)
        else:
            x = torch.matmul(m, x.reshape(before, spatial[k], after)).reshape(shape)
        before *= spatial[k]
    return x


class GaussianBlur:
    """Separable Gaussian smoothing with docs/conventions.md §3's taps and zero padding, "same" size.

    Each axis is one matrix product with a banded (size x size) matrix: exact, and on CPU several
    times faster than a depthwise 3D convolution for the σ and sizes used here.
    """

    def __init__(self, sigma: float, shape: Sequence[int], *, dtype=torch.float32, device=None):
        taps = gaussian_taps(sigma, dtype=dtype)
        self.matrices = [_band_matrix(s, taps).to(device) for s in shape]

    def __call__(self, x: Tensor) -> Tensor:
        return _smooth_axes(x, self.matrices)


def lncc_loss(a: Tensor, b: Tensor, blur: GaussianBlur, *, squared: bool = False) -> Tensor:
    """``1 - mean(lncc)`` (docs/conventions.md §3) of single-channel images ``(B, 1, *S)``."""
    stats = blur(torch.cat([a, b, a * a, b * b, a * b], dim=1))
    ma, mb, maa, mbb, mab = stats.unbind(1)
    cov = mab - ma * mb
    var_a = torch.relu(maa - ma * ma) + 1e-5
    var_b = torch.relu(mbb - mb * mb) + 1e-5
    cc = cov / torch.sqrt(var_a * var_b)
    return 1 - fixed_order_mean(cc * cc if squared else cc)  # the same bits for any thread count


# ------------------------------------------------------------------------------------------------
# Resampling helpers
# ------------------------------------------------------------------------------------------------


def _interp_mode(d: int) -> str:
    return "trilinear" if d == 3 else "bilinear"


def resize(x: Tensor, shape: Sequence[int], *, antialias: bool = True) -> Tensor:
    """Resample ``(B, C, *S)`` to ``shape`` in align-corners [0, 1] coordinates (the same continuous
    image), Gaussian-smoothed first when shrinking."""
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape[2:]) == shape:
        return x
    if antialias:
        # per axis: a grid can shrink along one axis and grow along another (a near-isotropic loss grid
        # of a thick-slice image), and only the shrinking axes are smoothed
        factors = [(s - 1) / max(t - 1, 1) for s, t in zip(x.shape[2:], shape)]
        if max(factors) > 1.25:
            mats = []
            for s, factor in zip(x.shape[2:], factors):
                taps = gaussian_taps(0.5 * factor, dtype=x.dtype) if factor > 1.25 else torch.ones(1, dtype=x.dtype)
                mats.append(_band_matrix(s, taps).to(x.device))
            # normalised smoothing (divide by the blurred ones) so the borders keep their level
            x = _smooth_axes(x, mats) / _smooth_axes(torch.ones_like(x[:1, :1]), mats)
    return F.interpolate(x, size=shape, mode=_interp_mode(x.ndim - 2), align_corners=True)


def scaled_shape(shape: Sequence[int], scale: float, *, minimum: int = 6) -> tuple[int, ...]:
    """The grid of ``shape`` shrunk by ``scale`` (voxel count per axis, at least ``minimum``)."""
    return tuple(max(min(minimum, int(s)), int(round((int(s) - 1) / scale)) + 1) for s in shape)


def loss_grid_spacing(shape: Sequence[int], spacing: Sequence[float], max_size: int,
                      max_voxels: int | None = None) -> float:
    """The loss grid's voxel size (mm): the finest spacing of the image, or coarser so that the longest
    physical extent fits in ``max_size`` voxels, and the whole grid in ``max_voxels``."""
    extent = [(int(s) - 1) * float(h) for s, h in zip(shape, spacing)]
    target = max(min(float(h) for h in spacing), max(extent) / max(max_size - 1, 1))
    if max_voxels is not None:
        while math.prod(max(2, int(round(e / target)) + 1) for e in extent) > max_voxels and target < max(extent):
            target *= 1.05
    return target


def loss_grid_shape(shape: Sequence[int], max_size: int, spacing: Sequence[float] | None = None,
                    max_voxels: int | None = None) -> tuple[int, ...]:
    """The loss grid: the image's physical box (corner voxel centres kept) sampled near-isotropically.

    Each axis gets ``extent / loss_grid_spacing`` intervals (at least ``min(6, size)`` voxels), so a
    0.6 x 0.6 x 5 mm image has as many loss voxels per millimetre along its slices as across them.
    Without ``spacing`` the voxels are taken as isotropic: the grid is the image's shrunk by one factor
    so that no axis exceeds ``max_size`` (unchanged if it fits).
    """
    spacing = (1.0,) * len(shape) if spacing is None else tuple(float(h) for h in spacing)
    target = loss_grid_spacing(shape, spacing, max_size, max_voxels)
    return tuple(max(min(6, int(s)), int(round((int(s) - 1) * h / target)) + 1) for s, h in zip(shape, spacing))


def anisotropy_warning(spacing: Sequence[float], what: str = "image") -> str | None:
    """A warning for voxels much longer along one axis than another (None when the ratio is at most 4)."""
    ratio = max(spacing) / min(spacing)
    if ratio <= 4:
        return None
    size = "x".join(f"{h:g}" for h in spacing)
    axis = int(np.argmax(spacing))
    if ratio > 20:
        return (f"the {what}'s voxels are {size} mm ({ratio:.0f} times longer along axis {axis} than across): this "
                f"is not a usable volume (a stack of distant slices, or a wrong spacing in the header); the "
                f"registration along axis {axis} only interpolates between slices {max(spacing):g} mm apart and "
                f"cannot be trusted")
    return (f"the {what}'s voxels are {size} mm ({ratio:.1f} times longer along axis {axis}): the registration "
            f"runs on a near-isotropic loss grid, but along axis {axis} it only sees slices {max(spacing):g} mm apart")


# ------------------------------------------------------------------------------------------------
# The optimisation
# ------------------------------------------------------------------------------------------------


def _similarity_fn(kind: str, sigma: int, shape: Sequence[int], device) -> Callable[[Tensor, Tensor], Tensor]:
    if kind in ("lncc", "lncc2"):
        blur = GaussianBlur(sigma, shape, device=device)
        squared = kind == "lncc2"
        return lambda a, b: lncc_loss(a, b, blur, squared=squared)
    if kind == "mse":
        return lambda a, b: fixed_order_mean((a - b) ** 2)
    raise ValueError(f"unknown similarity {kind!r}: use 'lncc', 'lncc2' or 'mse'")


def register(fixed: Tensor, moving: Tensor, *, settings: RegistrationSettings | None = None,
             spacing: Sequence[float] | None = None, backend: str | None = None, progress: bool = False,
             callback: Callable[[int, int, float], None] | None = None) -> RegistrationResult:
    """Register ``moving`` (A) to ``fixed`` (B): ``(1, 1, *S)`` tensors on the same grid, intensities ~[0, 1].

    Returns the chains φ_AB (``fixed ≈ moving ∘ φ_AB``) and φ_BA, each one displacement field in the
    [0, 1] units of the common grid (at the finest level's field resolution: compose or warp them at
    any resolution). ``spacing`` is the grid's voxel size in mm (default isotropic): the loss grid is
    near-isotropic in millimetres (:func:`loss_grid_shape`), so the LNCC window, the field smoothing
    and the levels are the same physical size along every axis. ``backend`` picks the implementation
    of the ops ("cpu" fused kernels, "torch" reference, default automatic).
    """
    settings = settings or RegistrationSettings()
    if fixed.shape != moving.shape or fixed.ndim not in (4, 5) or fixed.shape[:2] != (1, 1):
        raise ValueError(f"fixed and moving must both be (1, 1, *S) on the same grid, got {tuple(fixed.shape)} "
                         f"and {tuple(moving.shape)}")
    if not settings.levels:
        raise ValueError("settings.levels is empty")
    start = time.perf_counter()
    d = fixed.ndim - 2
    device = fixed.device
    fixed = fixed.float()
    moving = moving.float()
    loss_shape = loss_grid_shape(fixed.shape[2:], settings.max_size, spacing if settings.physical_grid else None,
                                 settings.max_voxels)
    fixed_l0, moving_l0 = resize(fixed, loss_shape), resize(moving, loss_shape)
    generator = torch.Generator(device=device).manual_seed(settings.seed)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(lv.iterations for lv in settings.levels), desc="registering", unit="it",
                   leave=False, dynamic_ncols=True)
    fields: list[Tensor] | None = None
    history: list[tuple[int, float, float, float]] = []
    try:
        for index, level in enumerate(settings.levels):
            image_shape = scaled_shape(loss_shape, level.image_scale)
            field_shape = scaled_shape(loss_shape, level.field_scale)
            a = resize(moving_l0, image_shape)
            b = resize(fixed_l0, image_shape)
            sim = _similarity_fn(settings.similarity, settings.sigma, image_shape, device)
            if fields is None:
                base = [torch.zeros((1, d, *field_shape), device=device) for _ in range(2)]
            else:
                base = [F.interpolate(f.detach(), size=field_shape, mode=_interp_mode(d), align_corners=True)
                        for f in fields]
            # each level's fields: the previous level's (upsampled: the same transform) plus a trainable update,
            # optionally Gaussian-smoothed (normalised at the borders)
            updates = [torch.zeros_like(b_).requires_grad_(True) for b_ in base]
            smoother = None
            if settings.smooth > 0:
                blur_f = GaussianBlur(settings.smooth, field_shape, device=device)
                norm = blur_f(torch.ones((1, 1, *field_shape), device=device))
                smoother = lambda u: blur_f(u) / norm  # noqa: E731

            def current_fields():
                if smoother is None:
                    return [b_ + u for b_, u in zip(base, updates)]
                return [b_ + smoother(u) for b_, u in zip(base, updates)]

            # lr in field-grid voxels: Adam's steps are ~lr per parameter early on
            lr = settings.lr / max(max(field_shape) - 1, 1)
            optimiser = torch.optim.Adam(updates, lr=lr)
            for it in range(level.iterations):
                optimiser.zero_grad(set_to_none=True)
                fields = current_fields()
                ab, ba = [fields[0]], [fields[1]]
                warped_a = gfn.warp(a, ab, backend=backend)
                warped_b = gfn.warp(b, ba, backend=backend)
                similarity = sim(warped_a, b) + sim(warped_b, a)
                if settings.lmbda > 0:
                    reg = gfn.gradicon_loss(ab, ba, shape=image_shape, stride=settings.stride,
                                            generator=generator, backend=backend)
                else:
                    reg = similarity.new_zeros(())
                loss = similarity + settings.lmbda * reg
                if settings.diffusion > 0:
                    ident = reference.identity_map(field_shape, device=device)
                    loss = loss + settings.diffusion * (reference.diffusion_energy(ident + fields[0])
                                                        + reference.diffusion_energy(ident + fields[1]))
                loss.backward()
                optimiser.step()
                if it % 10 == 0 or it == level.iterations - 1:
                    history.append((index, loss.item(), similarity.item(), reg.item()))
                if bar is not None:
                    bar.update(1)
                    if it % 10 == 0:
                        bar.set_postfix(level=f"{index + 1}/{len(settings.levels)}", loss=f"{loss.item():.4f}")
                if callback is not None:
                    callback(index, it, loss.item())
            with torch.no_grad():
                fields = [f.detach() for f in current_fields()]
    finally:
        if bar is not None:
            bar.close()
    chain_ab, chain_ba = [fields[0].detach()], [fields[1].detach()]
    return RegistrationResult(chain_ab, chain_ba, history, time.perf_counter() - start, loss_shape)


# ------------------------------------------------------------------------------------------------
# Images in physical space
# ------------------------------------------------------------------------------------------------


@dataclass
class ImageRegistration:
    """The outcome of :func:`register_images`.

    ``forward`` is the fixed→moving field on the fixed grid (ITK convention: fixed point p ↦ p + u(p) in
    the moving image; what resamples the moving image onto the fixed one); ``inverse`` the
    moving→fixed field on the moving image's grid; ``warped`` the moving image (original intensities)
    resampled on the fixed grid. ``chain_AB``/``chain_BA`` are the raw chains in the [0, 1]
    coordinates of the fixed grid (with a model: the network's, in its grid's coordinates).
    """

    forward: object             # io.DisplacementField
    inverse: object             # io.DisplacementField
    warped: object              # io.Image
    chain_AB: list[Tensor]
    chain_BA: list[Tensor]
    fold_percentage: float
    seconds: float
    method: str
    details: dict = field(default_factory=dict)
    affine: object = None       # alignment.Affine: the initial alignment (fixed→moving, mm), included in forward

    @property
    def metrics(self) -> dict:
        """Folds, the Jacobian determinant of ``forward`` (min, mean, max over the fixed grid's cells), time."""
        det = self.forward.jacobian_determinant()
        return dict(fold_percentage=self.fold_percentage, jacobian_min=float(det.min()),
                    jacobian_mean=float(det.mean()), jacobian_max=float(det.max()), seconds=self.seconds,
                    method=self.method)


def _prepare(image, preset: str, mask: np.ndarray | None) -> np.ndarray:
    from .io import normalize_intensity

    array = normalize_intensity(image.array, preset, mask=mask)
    if mask is not None:
        array = array * mask
    return array


def register_images(fixed, moving, *, fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
                    intensity: str = "auto", settings: RegistrationSettings | None = None,
                    model=None, io_iterations: int = 50, backend: str | None = None, device: str | None = None,
                    progress: bool = False, log: Callable[[str], None] | None = None,
                    default_value: float = 0.0, init: str | None = None, affine_settings=None,
                    warn: Callable[[str], None] | None = None, fixed_modality: str | None = None,
                    moving_modality: str | None = None, mask_use: str = "input", io_similarity: str | None = None,
                    io_lr: float | None = None) -> ImageRegistration:
    """Register ``moving`` to ``fixed`` (:class:`~gradicon_fast.io.Image` s on any grids, physical space).

    Intensities are normalised (``intensity`` preset per image, see :func:`gradicon_fast.io.normalize_intensity`),
    masks multiply their images, and the moving image is resampled on the fixed grid through an initial
    alignment (``init``, see :func:`gradicon_fast.alignment.initial_alignment`: ``"none"`` trusts the
    headers' world coordinates, ``"affine"``, the default without a model, also registers scans that lie
    far apart), which
    the exported fields include (``affine`` holds it alone). Without
    ``model``, the fields are optimised directly (:func:`register`), chains in the fixed grid's [0, 1]
    coordinates evaluated here at full resolution. With a :class:`gradicon_fast.nn.GradICON` ``model``,
    the pair is registered as the published uniGradICON pipeline does (:mod:`gradicon_fast.published_protocol`):
    ``fixed_modality``/``moving_modality`` ("ct" or "mri", else the ``intensity`` preset) normalise the
    images, each image's voxel box is stretched onto the network grid (no initial alignment: ``init``
    is "none"), ``io_iterations`` steps of instance optimisation (``io_similarity`` "lncc", "lncc2"
    or "mind", default the model's; step ``io_lr``, default 2e-5) precede the network's maps, which are
    mapped back through both images' headers; the chains are then the network's, in its grid's
    coordinates. ``mask_use`` says what the masks do: "input" multiplies the images (the default),
    "loss" restricts the instance optimisation's similarity to them (both masks needed), "both" does
    both. ``warped`` is the moving image resampled
    as ITK/ANTs resample it with ``forward``: ``default_value`` where a point falls outside the moving
    image (docs/conventions.md §7).
    """
    from . import io

    log = log or (lambda message: None)
    cpu_backend = backend if backend in ("cpu", "torch") else None  # for the full-resolution steps on the CPU
    if fixed.ndim != moving.ndim:
        raise io.InputError(f"the fixed image is {fixed.ndim}D but the moving image is {moving.ndim}D")
    io.check_finite(fixed, "fixed image")
    io.check_finite(moving, "moving image")
    device = torch.device(device or "cpu")
    start = time.perf_counter()
    if model is not None:
        _warn_anisotropy(fixed, moving, warn)
        return _register_with_model(model, fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask,
                                    intensity=intensity, fixed_modality=fixed_modality,
                                    moving_modality=moving_modality, mask_use=mask_use, init=init or "none",
                                    io_iterations=io_iterations, io_similarity=io_similarity, io_lr=io_lr,
                                    backend=backend, cpu_backend=cpu_backend, log=log, default_value=default_value,
                                    start=start)
    if fixed_modality is not None or moving_modality is not None:
        raise io.InputError("an image modality (ct or mri) selects the preprocessing of a network: it needs a model "
                            "(model-free registration normalises with the intensity preset)")
    if mask_use != "input":
        raise io.InputError(f"mask use {mask_use!r} needs a model: model-free registration multiplies the images "
                            f"by their masks")
    init = init or "affine"
    fixed_array = _prepare(fixed, intensity, fixed_mask)
    moving_array = _prepare(moving, intensity, moving_mask)
    _warn_anisotropy(fixed, moving, warn)
    affine, alignment = initial_alignment(io.Image(fixed_array, fixed.geometry), io.Image(moving_array, moving.geometry),
                                          init, settings=affine_settings, log=log)
    overlap = overlap_fraction(fixed.geometry, moving.geometry, affine)
    if overlap < 0.01:
        hint = ("check the images' origin and direction, or align them first (init 'moments' or 'affine')"
                if init == "none" else "the initial alignment failed; check the images")
        raise io.InputError(f"the moving image does not overlap the fixed image in physical space ({overlap:.1%} of "
                            f"the fixed grid lies inside the moving image after the '{init}' alignment): {hint}")
    aligned = io.DisplacementField.from_target_points(affine(fixed.geometry.grid_physical()), fixed.geometry)
    # border-clamped, as the loss samples its images (docs/conventions.md §7)
    moving_on_fixed = io.warp_image(io.Image(moving_array, moving.geometry), aligned, default_value=None,
                                    backend=cpu_backend).array
    b = torch.from_numpy(np.ascontiguousarray(fixed_array))[None, None].float().to(device)
    a = torch.from_numpy(np.ascontiguousarray(moving_on_fixed))[None, None].float().to(device)
    for name, t in (("fixed", b), ("moving", a)):
        if not float(t.max() - t.min()) > 0:
            raise io.InputError(f"the {name} image is constant after intensity normalisation and masking: nothing "
                                f"to register")
    details: dict = {"overlap": overlap, "alignment": alignment}
    settings = settings or RegistrationSettings()
    spacing = fixed.geometry.spacing if settings.physical_grid else None
    loss_shape = loss_grid_shape(fixed.shape, settings.max_size, spacing, settings.max_voxels)
    loss_spacing = [(n - 1) * h / max(m - 1, 1) for n, h, m in zip(fixed.shape, fixed.geometry.spacing, loss_shape)]
    log(f"model-free registration on a {'x'.join(map(str, loss_shape))} loss grid of "
        f"{'x'.join(f'{h:.2f}' for h in loss_spacing)} mm: {settings.describe()}")
    result = register(b, a, settings=settings, spacing=fixed.geometry.spacing, backend=backend, progress=progress)
    chain_ab, chain_ba = result.chain_AB, result.chain_BA
    method = "model-free"
    details.update(loss_shape=list(result.loss_shape), settings=settings.as_dict(),
                   final_loss=result.loss_history[-1][1] if result.loss_history else None)
    chain_ab = [c.detach().float().cpu() for c in chain_ab]
    chain_ba = [c.detach().float().cpu() for c in chain_ba]

    # Full-resolution outputs (CPU).
    forward_disp = gfn.compose(chain_ab, fixed.shape, backend=cpu_backend)
    forward = io.DisplacementField.from_map_displacement(forward_disp, fixed.geometry)
    # the affine has a positive determinant (alignment.py), so the folds are the deformable part's
    folds = float(gfn.fold_percentage(reference.identity_map(fixed.shape) + forward_disp))
    del forward_disp
    if not affine.is_identity():  # fixed p ↦ A(p + u(p)): the deformable part, then the alignment
        forward = io.DisplacementField.from_target_points(affine(forward.target_points()), fixed.geometry)
    moving_points = affine.inverse()(moving.geometry.grid_physical())
    points = torch.as_tensor(fixed.geometry.physical_to_map(moving_points), dtype=torch.float32)
    targets = gfn.transform_points(chain_ba, points.movedim(-1, 0)[None].contiguous(),
                                   backend=cpu_backend)[0].movedim(0, -1)
    inverse = io.DisplacementField.from_target_points(fixed.geometry.map_to_physical(targets.double().numpy()),
                                                      moving.geometry)
    warped = io.warp_image(moving, forward, default_value=default_value, backend=cpu_backend)
    seconds = time.perf_counter() - start
    return ImageRegistration(forward, inverse, warped, chain_ab, chain_ba, folds, seconds, method, details, affine)


def _warn_anisotropy(fixed, moving, warn: Callable[[str], None] | None) -> None:
    """Tell the user (``warn``, default :func:`warnings.warn`) about voxels much longer along one axis."""
    if warn is None:
        import warnings

        warn = lambda message: warnings.warn(message, stacklevel=3)  # noqa: E731
    for what, image in (("fixed image", fixed), ("moving image", moving)):
        message = anisotropy_warning(image.geometry.spacing, what)
        if message is not None:
            warn(message)


def _register_with_model(model, fixed, moving, *, fixed_mask, moving_mask, intensity: str, fixed_modality,
                         moving_modality, mask_use: str, init: str, io_iterations: int, io_similarity, io_lr,
                         backend, cpu_backend, log, default_value: float, start: float) -> ImageRegistration:
    """:func:`register_images` with a network: the published pipeline (gradicon_fast.published_protocol)."""
    from . import io
    from . import published_protocol as protocol

    if init != "none":
        raise io.InputError(f"initial alignment {init!r} is for model-free registration: with a model each image's "
                            f"voxel box is mapped onto the network grid, as the published pipeline does (use 'none')")
    if mask_use not in ("input", "loss", "both"):
        raise ValueError(f"mask_use must be 'input', 'loss' or 'both', got {mask_use!r}")
    if io_iterations < 0:
        raise ValueError(f"io_iterations must be >= 0, got {io_iterations}")
    if mask_use != "input" and (fixed_mask is None or moving_mask is None):
        raise io.InputError(f"mask use {mask_use!r} (loss-function masking) needs both a fixed and a moving mask")
    multiply = mask_use in ("input", "both")
    arrays = []
    for what, image, modality, mask in (("fixed image", fixed, fixed_modality, fixed_mask),
                                        ("moving image", moving, moving_modality, moving_mask)):
        mask = mask if multiply else None
        if modality is None:
            array = _prepare(image, intensity, mask)
        elif modality in protocol.MODALITIES:
            array = protocol.preprocess(image.array, modality, mask, what=what)
        else:
            raise ValueError(f"unknown modality {modality!r}: use 'ct' or 'mri'")
        if not float(array.max() - array.min()) > 0:
            raise io.InputError(f"the {what} is constant after intensity normalisation and masking: nothing to "
                                f"register")
        arrays.append(array)
    loss_masks = (fixed_mask, moving_mask) if mask_use in ("loss", "both") else (None, None)
    forward, inverse, result = protocol.register_with_network(
        model, fixed, moving, arrays[0], arrays[1], fixed_loss_mask=loss_masks[0], moving_loss_mask=loss_masks[1],
        io_iterations=io_iterations, io_similarity=io_similarity,
        io_lr=protocol.IO_LEARNING_RATE if io_lr is None else io_lr, backend=backend, log=log)
    warped = io.warp_image(moving, forward, default_value=default_value, backend=cpu_backend)
    details = dict(input_shape=list(model.input_shape), io_iterations=io_iterations, mask_use=mask_use,
                   io_similarity=io_similarity, fixed_modality=fixed_modality, moving_modality=moving_modality,
                   axes_reversed=protocol.uses_reversed_axes(model))
    chain_ab = [c.detach().float().cpu() for c in result.chain_AB]
    chain_ba = [c.detach().float().cpu() for c in result.chain_BA]
    method = f"network + {io_iterations} instance-optimisation steps"
    return ImageRegistration(forward, inverse, warped, chain_ab, chain_ba, forward.fold_percentage(),
                             time.perf_counter() - start, method, details, None)
