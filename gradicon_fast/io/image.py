"""Images with their physical geometry: reading, writing, coordinates, intensity presets, masks.

Every format goes through SimpleITK (NIfTI, NRRD, MetaImage, ...). One reader for all of them means
one interpretation of the header geometry, and it is the one ITK, ANTs, 3D Slicer and ITK-SNAP use:
a transform we export is applied by those tools to exactly the voxels we registered (nibabel and
ITK can disagree on a NIfTI whose qform and sform differ). Physical coordinates are ITK's: LPS,
millimetres.

Axis order: an :class:`Image` array is indexed ``array[i, j, k]`` with ``i`` the ITK/NIfTI index
that varies fastest in the file (nibabel's ``get_fdata()`` order; the reverse of
``sitk.GetArrayFromImage``). Tensor spatial axis k of our maps is index axis k, so channel k of a
map in [0, 1] units is ``index_k / (shape_k - 1)``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import IncompleteOutput, InputError, OutputError
from .nifti_checks import check_nifti_complete, restore_nifti_nonfinite
from .output import atomic_output, check_output_path, suffix_of

__all__ = [
    "Geometry", "Image", "InputError", "OutputError", "atomic_output", "check_finite", "normalize_intensity",
    "read_image", "read_mask", "replace_nonfinite", "write_image", "WRITABLE_IMAGE_SUFFIXES",
]

# Single-file formats, so a write can go to a temporary file and be renamed into place.
WRITABLE_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


def _sitk():
    import SimpleITK as sitk

    return sitk


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """A voxel grid in physical space (ITK convention: LPS millimetres).

    ``physical = origin + direction @ diag(spacing) @ index``, index in ITK order (i, j[, k]).
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # d*d, row-major, columns are the index axes' directions

    def __post_init__(self):
        d = len(self.shape)
        if d not in (2, 3):
            raise InputError(f"expected a 2D or 3D grid, got shape {self.shape}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in np.asarray(self.direction).ravel()))
        if len(self.spacing) != d or len(self.origin) != d or len(self.direction) != d * d:
            raise InputError(f"inconsistent geometry for a {d}D grid: spacing {self.spacing}, origin "
                             f"{self.origin}, direction {self.direction}")

    @classmethod
    def from_sitk(cls, img) -> "Geometry":
        return cls(tuple(img.GetSize()), img.GetSpacing(), img.GetOrigin(), img.GetDirection())

    @classmethod
    def isotropic(cls, shape: Sequence[int], spacing: float | Sequence[float] = 1.0) -> "Geometry":
        d = len(shape)
        spacing = (spacing,) * d if np.isscalar(spacing) else tuple(spacing)
        return cls(tuple(shape), spacing, (0.0,) * d, tuple(np.eye(d).ravel()))

    def apply_to(self, img) -> None:
        """Set a SimpleITK image's spacing, origin and direction to this geometry."""
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """``direction @ diag(spacing)``: index steps to millimetres."""
        return self.direction_matrix * np.asarray(self.spacing)[None, :]

    @property
    def affine(self) -> np.ndarray:
        """Homogeneous ``(d+1, d+1)`` matrix from index (i, j[, k], 1) to LPS millimetres."""
        d = self.ndim
        a = np.eye(d + 1)
        a[:d, :d] = self.index_to_physical_matrix
        a[:d, d] = self.origin
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        """The same as a NIfTI/nibabel affine: index to RAS millimetres (3D: 4x4; 2D: padded to 4x4)."""
        a = np.eye(4)
        d = self.ndim
        a[:d, :d] = self.index_to_physical_matrix
        a[:d, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a

    @property
    def map_scale(self) -> np.ndarray:
        """``shape - 1`` per axis (1 for an axis of size 1): [0, 1] map units to index units."""
        return np.asarray([max(s - 1, 1) for s in self.shape], dtype=np.float64)

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """Continuous indices ``(..., d)`` to LPS millimetres ``(..., d)``."""
        index = np.asarray(index, dtype=np.float64)
        return index @ self.index_to_physical_matrix.T + np.asarray(self.origin)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """LPS millimetres ``(..., d)`` to continuous indices ``(..., d)``."""
        points = np.asarray(points, dtype=np.float64)
        inverse = np.linalg.inv(self.index_to_physical_matrix)
        return (points - np.asarray(self.origin)) @ inverse.T

    def map_to_physical(self, x: np.ndarray) -> np.ndarray:
        """Map coordinates in [0, 1] units ``(..., d)`` (channel k along axis k) to LPS millimetres."""
        return self.index_to_physical(np.asarray(x, dtype=np.float64) * self.map_scale)

    def physical_to_map(self, points: np.ndarray) -> np.ndarray:
        """LPS millimetres ``(..., d)`` to map coordinates in [0, 1] units of this grid."""
        return self.physical_to_index(points) / self.map_scale

    def grid_physical(self, dtype=np.float64) -> np.ndarray:
        """The physical position of every voxel centre, ``(*shape, d)``."""
        axes = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in self.shape], indexing="ij")
        return self.index_to_physical(np.stack(axes, axis=-1)).astype(dtype)

    def same_grid(self, other: "Geometry", *, tol: float = 1e-4) -> bool:
        """Same shape and (to ``tol`` relative to the voxel size) same spacing, origin and direction."""
        if self.shape != other.shape:
            return False
        scale = max(min(self.spacing), 1e-12)
        return (np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol * scale)
                and np.allclose(self.origin, other.origin, atol=tol * scale * 10)
                and np.allclose(self.direction, other.direction, atol=tol))

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.shape)
        spacing = "x".join(f"{s:g}" for s in self.spacing)
        return f"{shape} voxels of {spacing} mm"


# ------------------------------------------------------------------------------------------------
# Image
# ------------------------------------------------------------------------------------------------


@dataclass
class Image:
    """A scalar image: ``array`` indexed in ITK index order (i, j[, k]) and its :class:`Geometry`."""

    array: np.ndarray
    geometry: Geometry
    path: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if tuple(self.array.shape) != self.geometry.shape:
            raise InputError(f"array shape {tuple(self.array.shape)} does not match the geometry's "
                             f"{self.geometry.shape}")

    @property
    def ndim(self) -> int:
        return self.geometry.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return self.geometry.shape

    def tensor(self, *, dtype=torch.float32, device=None) -> torch.Tensor:
        """The image as a ``(1, 1, *shape)`` tensor for gradicon_fast's ops."""
        return torch.from_numpy(np.ascontiguousarray(self.array)).to(dtype=dtype, device=device)[None, None]

    @classmethod
    def from_tensor(cls, t: torch.Tensor, geometry: Geometry, *, dtype=None) -> "Image":
        """Wrap a ``(*shape)``, ``(1, *shape)`` or ``(1, 1, *shape)`` tensor on ``geometry``."""
        a = t.detach().cpu()
        while a.ndim > geometry.ndim:
            if a.shape[0] != 1:
                raise ValueError(f"expected a single image, got a tensor of shape {tuple(t.shape)}")
            a = a[0]
        a = a.numpy()
        return cls(a.astype(dtype) if dtype is not None else a, geometry)

    def to_sitk(self):
        sitk = _sitk()
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(self.array)))
        self.geometry.apply_to(img)
        return img


def _check_readable(path, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{what} {path!r} is a directory, not an image file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path!r} is not readable (permission denied)")
    return path


def read_sitk(path, what: str = "image"):
    """``sitk.ReadImage`` with a one-line :class:`InputError` for a missing or unreadable file."""
    sitk = _sitk()
    path = _check_readable(path, what)
    try:
        if suffix_of(path) == ".nii.gz" and os.path.exists(path[:-3]):
            # ITK's NIfTI reader, given a.nii.gz, opens a.nii when that exists: read through a link alone
            with tempfile.TemporaryDirectory() as folder:
                link = os.path.join(folder, "image.nii.gz")
                os.symlink(os.path.abspath(path), link)
                return sitk.ReadImage(link)
        return sitk.ReadImage(path)
    except RuntimeError:
        raise InputError(f"cannot read {what} {path!r}: not an image file in a format SimpleITK reads "
                         f"(NIfTI, NRRD, MetaImage, ...), or the file is damaged") from None


def read_image(path, *, what: str = "image", dtype=np.float32) -> Image:
    """Read a scalar 2D or 3D image with its geometry. ``what`` names the file in error messages."""
    sitk = _sitk()
    img = read_sitk(path, what)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} {os.fspath(path)!r} has {img.GetNumberOfComponentsPerPixel()} components per "
                         f"voxel; a scalar (grey-level) image is needed")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() not in (2, 3):
        raise InputError(f"{what} {os.fspath(path)!r} is {img.GetDimension()}D; a 2D or 3D image is needed")
    if min(img.GetSize()) < 2:
        raise InputError(f"{what} {os.fspath(path)!r} has a size of {img.GetSize()}: every axis needs at least "
                         f"2 voxels")
    array = np.transpose(sitk.GetArrayFromImage(img))
    if suffix_of(path) in (".nii", ".nii.gz"):
        restore_nifti_nonfinite(os.fspath(path), array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    try:
        geometry = Geometry.from_sitk(img)
    except InputError as e:
        raise InputError(f"{what} {os.fspath(path)!r}: {e}") from None
    if np.linalg.matrix_rank(geometry.direction_matrix) < geometry.ndim or min(geometry.spacing) <= 0:
        raise InputError(f"{what} {os.fspath(path)!r} has a degenerate geometry (spacing {geometry.spacing})")
    return Image(np.ascontiguousarray(array), geometry, path=os.fspath(path))


def check_writable(path, *, what: str = "output", suffixes: Sequence[str] = WRITABLE_IMAGE_SUFFIXES) -> None:
    """Fail early (before any long computation) if ``path`` cannot be written as one of ``suffixes``."""
    path = os.fspath(path)
    if suffix_of(path) not in suffixes:
        raise InputError(f"cannot write {what} {path!r}: unsupported file type {suffix_of(path) or '(none)'!r}; "
                         f"use one of {', '.join(suffixes)}")
    check_output_path(path, what)


def verify_image_file(path: str, img) -> None:
    """Check that ``path`` holds all of SimpleITK image ``img``: the header read back gives its size and
    components; a NIfTI file has all its voxel bytes, other formats (whose readers detect a short file)
    are read back whole."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    nifti = suffix_of(path) in (".nii", ".nii.gz")
    if nifti:
        check_nifti_complete(path)
    try:
        reader.ReadImageInformation()
        if not nifti:
            reader.Execute()
    except RuntimeError:
        raise IncompleteOutput("the file read back is incomplete or damaged") from None
    size, extra = reader.GetSize()[:img.GetDimension()], reader.GetSize()[img.GetDimension():]
    if size != img.GetSize() or any(n != 1 for n in extra) \
            or reader.GetNumberOfComponents() != img.GetNumberOfComponentsPerPixel():
        raise IncompleteOutput(f"the file read back has size {reader.GetSize()} with {reader.GetNumberOfComponents()} "
                               f"component(s), not {img.GetSize()} with {img.GetNumberOfComponentsPerPixel()}")


def write_sitk(img, path, *, what: str = "output", compress: bool = True,
               suffixes: Sequence[str] = WRITABLE_IMAGE_SUFFIXES) -> None:
    """Write a SimpleITK image crash-safely (temporary file in the same directory, checked, then renamed)."""
    sitk = _sitk()
    check_writable(path, what=what, suffixes=suffixes)
    with atomic_output(path, what=what, verify=lambda tmp: verify_image_file(tmp, img)) as tmp:
        sitk.WriteImage(img, tmp, compress and suffix_of(path) != ".nii")


def write_image(path, image: Image, *, what: str = "output", dtype=None) -> None:
    """Write ``image`` with its geometry (atomically). ``dtype`` casts the voxels first."""
    array = image.array if dtype is None else image.array.astype(dtype)
    write_sitk(Image(array, image.geometry).to_sitk(), path, what=what)


# ------------------------------------------------------------------------------------------------
# Intensity presets and masks
# ------------------------------------------------------------------------------------------------

INTENSITY_PRESETS = ("auto", "ct", "mri", "minmax", "none")


def guess_modality(array: np.ndarray) -> str:
    """'ct' if the image looks like Hounsfield units (air near -1000), else 'mri'."""
    low = float(np.percentile(array, 1)) if array.size else 0.0
    return "ct" if low < -500 else "mri"


def check_finite(image: Image, what: str = "image") -> None:
    """Fail with a message of its own when ``image`` holds NaN or infinite voxels: the intensity presets
    and the similarity cannot use them (a NaN image would otherwise look "constant")."""
    bad = int(np.count_nonzero(~np.isfinite(image.array))) if np.issubdtype(image.array.dtype, np.floating) else 0
    if bad:
        name = f"{what} {image.path!r}" if image.path else what
        raise InputError(f"{name} has {bad} NaN or infinite voxel(s) of {image.array.size}: fix the file or "
                         f"replace them with a value (gradicon-fast register --nan-value V)")


def replace_nonfinite(image: Image, value: float) -> tuple[Image, int]:
    """``image`` with its NaN and infinite voxels set to ``value``, and how many there were."""
    if not np.issubdtype(image.array.dtype, np.floating):
        return image, 0
    bad = ~np.isfinite(image.array)
    count = int(np.count_nonzero(bad))
    if not count:
        return image, 0
    array = image.array.copy()
    array[bad] = value
    return Image(array, image.geometry, path=image.path), count


def normalize_intensity(array: np.ndarray, preset: str = "auto", *, mask: np.ndarray | None = None) -> np.ndarray:
    """Scale intensities to about [0, 1] (float32).

    ``ct``: window [-1000, 0] HU mapped to [0, 1] and clipped (the lung protocol);
    ``mri``: the 0.5 and 99.5 percentiles (inside ``mask`` if given) mapped to 0 and 1, clipped;
    ``minmax``: min and max to 0 and 1; ``none``: unchanged; ``auto``: ``ct`` if the image looks like
    Hounsfield units, else ``mri``.
    """
    if preset not in INTENSITY_PRESETS:
        raise InputError(f"unknown intensity preset {preset!r}; choose from {', '.join(INTENSITY_PRESETS)}")
    a = np.asarray(array, dtype=np.float32)
    if preset == "auto":
        preset = guess_modality(a)
    if preset == "none":
        return a.copy()
    if preset == "ct":
        lo, hi = -1000.0, 0.0
    else:
        values = a[mask] if mask is not None and mask.any() else a
        if preset == "mri":
            lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
        else:
            lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def read_mask(path, like: Image, *, what: str = "mask") -> np.ndarray:
    """Read a binary mask (voxels > 0) that must lie on the same grid as ``like``; not empty."""
    mask = read_image(path, what=what, dtype=None)
    if mask.ndim != like.ndim:
        raise InputError(f"{what} {os.fspath(path)!r} is {mask.ndim}D but its image is {like.ndim}D")
    if mask.shape != like.shape:
        raise InputError(f"{what} {os.fspath(path)!r} has shape {mask.shape} but its image has {like.shape}")
    if not mask.geometry.same_grid(like.geometry, tol=1e-3):
        raise InputError(f"{what} {os.fspath(path)!r} is not on its image's grid (spacing, origin or direction "
                         f"differ)")
    m = np.asarray(mask.array) > 0
    if not m.any():
        raise InputError(f"{what} {os.fspath(path)!r} is empty (no voxel > 0)")
    return m
