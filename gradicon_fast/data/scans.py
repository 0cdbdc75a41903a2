"""Synthetic pairs re-acquired as real scans are: on other grids, with thick slices, far apart in space.

Each builder starts from a :class:`~gradicon_fast.demo.SyntheticPair` (isotropic, known deformation)
and returns a :class:`ScanPair`: the fixed and moving :class:`~gradicon_fast.io.Image` s and the exact
physical correspondence of landmarks (a fixed landmark in mm and where it truly lies in the moving
image, in mm), so a registration of the scans can be scored in millimetres.

    scans = thick_slice_pair(pair, (0.6, 0.6, 5.0))           # CT-like: 5 mm slices along axis 2
    scans = displaced_pair(pair, shift_mm=(600, 0, 0), angle_deg=12, scale=1.1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..alignment import Affine, geometric_center
from ..io import Geometry, Image


@dataclass
class ScanPair:
    fixed: Image
    moving: Image
    landmarks_fixed: np.ndarray    # (N, d) mm in the fixed image's physical space
    landmarks_moving: np.ndarray   # (N, d) mm: where each fixed landmark truly lies in the moving image
    true_affine: Affine | None = None   # the affine part of the true fixed→moving transform, when there is one

    def errors(self, mapped: np.ndarray) -> np.ndarray:
        """Per-landmark error vectors (mm, (N, d)) of the fixed landmarks mapped to ``mapped``."""
        return np.asarray(mapped) - self.landmarks_moving


def _resample(image: Image, geometry: Geometry, transform: Affine | None = None, *,
              thickness: Sequence[float] | None = None) -> Image:
    """``image`` sampled (linear, 0 outside) on ``geometry``; the output point q reads the input at
    ``transform(q)``. ``thickness`` (mm per axis) first blurs the input with a Gaussian of that FWHM:
    the slice profile of an acquisition with those slices."""
    import SimpleITK as sitk

    source = image.to_sitk()
    if thickness is not None:
        sigmas = [max(t, 1e-3) / 2.3548 for t in thickness]
        source = sitk.SmoothingRecursiveGaussian(source, sigmas)
    reference = sitk.Image([int(s) for s in geometry.shape], sitk.sitkFloat32)
    geometry.apply_to(reference)
    tx = sitk.Transform(geometry.ndim, sitk.sitkIdentity) if transform is None else transform.to_sitk()
    out = sitk.Resample(source, reference, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return Image(np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(out))), geometry)


def _landmarks_mm(pair) -> tuple[np.ndarray, np.ndarray]:
    g = pair.geometry
    return g.index_to_physical(pair.landmarks_fixed), g.index_to_physical(pair.landmarks_moving)


def thick_slice_pair(pair, spacing: Sequence[float]) -> ScanPair:
    """Both images re-acquired on a grid of ``spacing`` mm over the same physical box: each axis's
    voxel is also its slice thickness (an axis of 5 mm averages 5 mm of tissue)."""
    g = pair.geometry
    extent = (np.asarray(g.shape) - 1) * np.asarray(g.spacing)
    shape = tuple(int(np.floor(e / h + 1e-9)) + 1 for e, h in zip(extent, spacing))
    grid = Geometry(shape, tuple(spacing), g.origin, g.direction)
    # the source's own resolution is already a slice profile: only the excess is added
    thickness = [np.sqrt(max(h ** 2 - s ** 2, 0.0)) for h, s in zip(spacing, g.spacing)]
    fixed = _resample(pair.image("fixed"), grid, thickness=thickness)
    moving = _resample(pair.image("moving"), grid, thickness=thickness)
    return ScanPair(fixed, moving, *_landmarks_mm(pair))


def displaced_pair(pair, shift_mm: Sequence[float], *, angle_deg: float = 0.0, scale: float = 1.0) -> ScanPair:
    """The moving image re-gridded ``shift_mm`` away (its origin moved: the two boxes can be disjoint),
    its content rotated by ``angle_deg`` (about the last axis, in the plane of the first two) and
    scaled by ``scale`` about its centre. The true fixed→moving transform is that affine after the
    pair's deformation."""
    g = pair.geometry
    d = g.ndim
    shift = np.asarray(shift_mm, dtype=np.float64)
    moved = Geometry(g.shape, g.spacing, tuple(np.asarray(g.origin) + shift), g.direction)
    a = np.radians(angle_deg)
    rotation = np.eye(d)
    rotation[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    c_old, c_new = geometric_center(g), geometric_center(moved)
    # B: a point of the new moving image -> the same tissue in the original moving image
    linear = rotation * scale
    b = Affine(linear, c_old - linear @ c_new)
    moving = _resample(pair.image("moving"), moved, b)
    fixed_mm, moving_mm = _landmarks_mm(pair)
    true = b.inverse()
    return ScanPair(pair.image("fixed"), moving, fixed_mm, true(moving_mm), true_affine=true)
