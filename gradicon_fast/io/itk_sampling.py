"""How ITK's resampling (``sitk.Resample``, ``antsApplyTransforms``) samples an image at continuous indices.

The exported warped images follow these rules, so that they equal what ITK and ANTs produce when
they apply the exported transform (docs/conventions.md §7). Measured with SimpleITK 2.5 and read
in ITK's ``ImageFunction::IsInsideBuffer`` and ``LinearInterpolateImageFunction``:

- a point is *inside* the image when, on every axis, its continuous index c satisfies
  ``-0.5 <= c < size - 0.5`` (the voxels' extent, half a voxel beyond the first and last centres;
  the upper bound is excluded); any other point, NaN included, gets the default pixel value;
- linear interpolation inside takes the nearest edge value where c lies in the outer half voxel
  (c < 0 or c > size - 1): border clamping, which is what ``sample`` does (docs/conventions.md §1);
- nearest-neighbour interpolation rounds half up: ``floor(c + 0.5)``.
"""

from __future__ import annotations

import numpy as np

from .image import InputError


def inside_image(index: np.ndarray, shape) -> np.ndarray:
    """Which continuous indices ``(..., d)`` ITK samples (True) instead of giving the default value."""
    upper = np.asarray(shape, dtype=np.float64) - 0.5
    return np.all((index >= -0.5) & (index < upper), axis=-1)


def nearest_voxels(index: np.ndarray, shape) -> tuple[np.ndarray, ...]:
    """Integer voxel indices, one array per axis, of ITK's nearest neighbour at ``index`` ``(..., d)``
    (rounded half up, clamped into the image; non-finite indices give voxel 0)."""
    rounded = np.floor(np.nan_to_num(index, nan=0.0, posinf=0.0, neginf=0.0) + 0.5)
    upper = np.asarray(shape) - 1
    clamped = np.clip(rounded, 0, upper).astype(np.int64)
    return tuple(clamped[..., k] for k in range(clamped.shape[-1]))


def default_value_of_type(value: float, dtype: np.dtype, *, what: str = "--default-value") -> np.generic:
    """``value`` as a voxel of ``dtype``; an error if that type cannot hold it exactly."""
    dtype = np.dtype(dtype)
    if not np.isfinite(value) and not np.issubdtype(dtype, np.floating):
        raise InputError(f"{what} {value} cannot be stored in an image of type {dtype}")
    if np.issubdtype(dtype, np.floating):
        return dtype.type(value)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if value != int(value) or not info.min <= value <= info.max:
            raise InputError(f"{what} {value:g} cannot be stored in an image of type {dtype} "
                             f"(integers {info.min} .. {info.max})")
        return dtype.type(int(value))
    if dtype == np.bool_ and value in (0, 1):
        return np.bool_(value)
    raise InputError(f"{what} {value:g} cannot be stored in an image of type {dtype}")
