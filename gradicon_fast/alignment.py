"""Initial alignment of two images in physical space, before the deformable registration.

Scans of different patients, or from scanners with different origins, need not overlap in world
coordinates; the deformable stage only corrects what it can see. An :class:`Affine` is found first,
in LPS millimetres and in the ITK direction (a fixed point ``p`` corresponds to the moving point
``matrix @ p + offset``), by one of

* ``none``    the identity: the headers' world coordinates are trusted;
* ``center``  the translation between the centres of the two images' boxes;
* ``moments`` the translation between the centres of mass of the (normalised, masked) intensities;
* ``affine``  a 12-parameter (2D: 6) affine optimised under LNCC, coarse to fine, started from the best
  of the three above. It is symmetric: the moving image is compared through the affine and the fixed
  image through its exact inverse, so the two directions are inverse to each other by construction.

    affine, details = initial_alignment(fixed, moving, "affine")   # io.Image s (normalised intensities)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import reference

Tensor = torch.Tensor

INIT_MODES = ("none", "center", "moments", "affine")


@dataclass(frozen=True)
class Affine:
    """``p ↦ matrix @ p + offset`` on LPS millimetres: a fixed point to its moving point."""

    matrix: np.ndarray
    offset: np.ndarray

    @classmethod
    def identity(cls, d: int) -> "Affine":
        return cls(np.eye(d), np.zeros(d))

    @classmethod
    def translation(cls, t: Sequence[float]) -> "Affine":
        return cls(np.eye(len(t)), np.asarray(t, dtype=np.float64))

    @property
    def ndim(self) -> int:
        return len(self.offset)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Points ``(..., d)`` in mm."""
        return np.asarray(points, dtype=np.float64) @ np.asarray(self.matrix).T + self.offset

    def inverse(self) -> "Affine":
        inv = np.linalg.inv(self.matrix)
        return Affine(inv, -inv @ self.offset)

    def is_identity(self, tol: float = 1e-9) -> bool:
        return bool(np.allclose(self.matrix, np.eye(self.ndim), atol=tol) and np.allclose(self.offset, 0, atol=tol))

    def to_sitk(self, center: Sequence[float] | None = None):
        """A ``sitk.AffineTransform`` (ITK: ``T(p) = M (p - c) + c + t``) with centre ``c`` (default origin)."""
        from .io.affine import sitk_affine

        return sitk_affine(self.matrix, self.offset, center)

    def describe(self) -> str:
        """Translation, scales (singular values) and rotation angle, for the log."""
        u, s, vt = np.linalg.svd(self.matrix)
        rotation = u @ vt
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - (self.ndim - 2)) / 2, -1, 1)))
        return (f"translation {np.linalg.norm(self.offset):.1f} mm, rotation {angle:.1f}°, scales "
                f"{'/'.join(f'{v:.3f}' for v in s)}")


@dataclass
class AffineSettings:
    """The affine stage: (grid size in voxels along the longest axis, Adam steps) per level, coarse to fine."""

    levels: tuple[tuple[int, int], ...] = ((16, 100), (32, 60))
    lr: float = 0.01            # Adam step on the normalised parameters (matrix entries; translation / half extent)
    sigma: int = 2              # LNCC Gaussian σ in voxels of each level's grid


# ------------------------------------------------------------------------------------------------
# Centres
# ------------------------------------------------------------------------------------------------


def geometric_center(geometry) -> np.ndarray:
    """The physical centre of the image's box (the middle of its corner voxel centres)."""
    return geometry.index_to_physical((np.asarray(geometry.shape, dtype=np.float64) - 1) / 2)


def center_of_mass(image) -> np.ndarray:
    """The intensity-weighted centre (negative intensities count as 0), or the box centre of an empty image."""
    weights = np.clip(np.asarray(image.array, dtype=np.float64), 0, None)
    total = weights.sum()
    if not total > 0:
        return geometric_center(image.geometry)
    index = [np.tensordot(weights.sum(axis=tuple(a for a in range(weights.ndim) if a != k)),
                          np.arange(weights.shape[k]), axes=1) / total for k in range(weights.ndim)]
    return image.geometry.index_to_physical(np.asarray(index))


def overlap_fraction(fixed_geometry, moving_geometry, affine: Affine) -> float:
    """The fraction of the fixed grid's voxels whose moving points (through ``affine``) lie in the moving box."""
    inside = moving_geometry.physical_to_map(affine(fixed_geometry.grid_physical()))
    return float(np.all((inside > -1e-6) & (inside < 1 + 1e-6), axis=-1).mean())


# ------------------------------------------------------------------------------------------------
# The affine stage
# ------------------------------------------------------------------------------------------------


class _Sampler:
    """One image at a level's near-isotropic grid, sampled at physical points (differentiably)."""

    def __init__(self, image, max_size: int):
        from .registration import loss_grid_shape, resize

        g = image.geometry
        self.shape = loss_grid_shape(g.shape, max_size, g.spacing)
        self.tensor = resize(image.tensor(), self.shape)
        f64 = torch.float64
        self.to_map = torch.as_tensor(np.linalg.inv(g.index_to_physical_matrix) / g.map_scale[:, None], dtype=f64)
        self.origin = torch.as_tensor(g.origin, dtype=f64)
        # physical positions of the level grid's points (the same box as the image's, other voxel counts)
        identity = reference.identity_map(self.shape, dtype=f64)[0].movedim(0, -1)
        self.points = torch.as_tensor(g.map_to_physical(identity.numpy()), dtype=f64)  # (*shape, d)

    def sample(self, points: Tensor, shape: Sequence[int]) -> Tensor:
        """The image at ``points`` (*shape, d) mm: a ``(1, 1, *shape)`` tensor (border-clamped)."""
        # grid_sample's [-1, 1] with align_corners=True is our [0, 1] (docs/conventions.md §1), its
        # coordinates in reverse axis order; border padding is our border clamping. Only the points
        # need a gradient here, which torch's backward computes alone.
        coords = ((points - self.origin) @ self.to_map.T).float() * 2 - 1
        grid = coords.flip(-1)[None]
        return F.grid_sample(self.tensor, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _similarity(sigma: int, shape: Sequence[int]) -> Callable[[Tensor, Tensor], Tensor]:
    from .registration import GaussianBlur, lncc_loss

    blur = GaussianBlur(min(sigma, max(1, (min(shape) - 1) // 4)), shape)
    return lambda a, b: lncc_loss(a, b, blur)


def _symmetric_loss(fixed: _Sampler, moving: _Sampler, matrix: Tensor, offset: Tensor, sim_f, sim_m) -> Tensor:
    """LNCC of moving∘A against fixed (fixed grid) plus fixed∘A⁻¹ against moving (moving grid)."""
    forward = moving.sample(fixed.points @ matrix.T + offset, fixed.shape)
    inverse = torch.linalg.inv(matrix)
    backward = fixed.sample((moving.points - offset) @ inverse.T, moving.shape)
    return sim_f(forward, fixed.tensor) + sim_m(backward, moving.tensor)


def optimise_affine(fixed, moving, starts: Sequence[Affine], *, settings: AffineSettings | None = None,
                    callback: Callable[[int, int, float], None] | None = None) -> tuple[Affine, dict]:
    """The affine minimising the symmetric LNCC of :class:`~gradicon_fast.io.Image` s ``fixed`` and
    ``moving`` (normalised intensities), from the best of ``starts`` (lowest loss at the coarsest level).

    Parameters are normalised so that Adam's step means the same on every axis and for every image
    size: the matrix acts about the fixed box's centre, the translation is in units of half its longest
    extent. Runs in float64 for the parameters, float32 for the images.
    """
    settings = settings or AffineSettings()
    d = fixed.ndim
    centre = torch.as_tensor(geometric_center(fixed.geometry), dtype=torch.float64)
    extent = (np.asarray(fixed.geometry.shape) - 1) * np.asarray(fixed.geometry.spacing)
    half = float(max(extent.max() / 2, 1e-6))

    def to_params(a: Affine) -> tuple[Tensor, Tensor]:
        m = torch.as_tensor(np.asarray(a.matrix), dtype=torch.float64)
        t = (m @ centre + torch.as_tensor(a.offset, dtype=torch.float64) - centre) / half
        return m.clone(), t

    def to_affine(m: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return m, centre + half * t - m @ centre  # p ↦ m (p - c) + c + half·t

    history: list[tuple[int, float]] = []
    best = None
    for index, (size, iterations) in enumerate(settings.levels):
        f, m_ = _Sampler(fixed, size), _Sampler(moving, size)
        sim_f, sim_m = _similarity(settings.sigma, f.shape), _similarity(settings.sigma, m_.shape)
        if best is None:  # pick the start
            with torch.no_grad():
                losses = [float(_symmetric_loss(f, m_, *to_affine(*to_params(a)), sim_f, sim_m)) for a in starts]
            chosen = int(np.argmin(losses))
            best = to_params(starts[chosen])
            start_losses = losses
        matrix, shift = (p.clone().requires_grad_(True) for p in best)
        optimiser = torch.optim.Adam([matrix, shift], lr=settings.lr)
        for it in range(iterations):
            optimiser.zero_grad(set_to_none=True)
            loss = _symmetric_loss(f, m_, *to_affine(matrix, shift), sim_f, sim_m)
            loss.backward()
            optimiser.step()
            if it % 10 == 0 or it == iterations - 1:
                history.append((index, loss.item()))
            if callback is not None:
                callback(index, it, loss.item())
        best = (matrix.detach(), shift.detach())
    m, t = to_affine(*best)
    result = Affine(m.numpy().copy(), t.numpy().copy())
    return result, {"start": chosen, "start_losses": start_losses, "history": history}


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def initial_alignment(fixed, moving, mode: str = "affine", *, settings: AffineSettings | None = None,
                      log: Callable[[str], None] | None = None) -> tuple[Affine, dict]:
    """The initial fixed→moving :class:`Affine` of ``mode`` (one of :data:`INIT_MODES`) and what was done.

    ``fixed`` and ``moving`` are :class:`~gradicon_fast.io.Image` s with intensities normalised to
    about [0, 1] (and masked, if masks are used); they may lie anywhere in physical space.
    """
    from .io import InputError

    log = log or (lambda message: None)
    if mode not in INIT_MODES:
        raise InputError(f"unknown initial alignment {mode!r}: use one of {', '.join(INIT_MODES)}")
    d = fixed.ndim
    identity = Affine.identity(d)
    center = Affine.translation(geometric_center(moving.geometry) - geometric_center(fixed.geometry))
    moments = Affine.translation(center_of_mass(moving) - center_of_mass(fixed))
    details: dict = {"init": mode}
    if mode == "none":
        affine = identity
    elif mode == "center":
        affine = center
    elif mode == "moments":
        affine = moments
    else:
        names = ["none", "center", "moments"]
        affine, info = optimise_affine(fixed, moving, [identity, center, moments], settings=settings)
        details.update(start=names[info["start"]], start_losses=info["start_losses"],
                       final_loss=info["history"][-1][1] if info["history"] else None)
        det = float(np.linalg.det(affine.matrix))
        if not (np.all(np.isfinite(affine.matrix)) and 0.2 < det < 5):
            fallback = [identity, center, moments][info["start"]]
            log(f"warning: the affine stage diverged (determinant {det:.3g}); using the {names[info['start']]} "
                f"alignment instead")
            affine = fallback
            details["fallback"] = names[info["start"]]
        else:
            log(f"affine alignment (from the {names[info['start']]} start): {affine.describe()}")
    if mode in ("center", "moments"):
        log(f"{mode} alignment: {affine.describe()}")
    details["matrix"] = np.asarray(affine.matrix).tolist()
    details["offset"] = np.asarray(affine.offset).tolist()
    return affine, details
