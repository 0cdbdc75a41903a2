"""Displacement fields in physical units, and their exchange with ITK, ANTs and 3D Slicer.

Convention of the exported files (ITK/ANTs): a displacement field ``u`` lives on the fixed image's
grid; the vector at voxel p is in LPS millimetres, and the transform maps a fixed-image point p to
``p + u(p)`` in the moving image (a "pull-back" field: ``warped(p) = moving(p + u(p))``). This is the
transform ``antsApplyTransforms -r fixed -i moving -t field`` and ``sitk.Resample(moving, fixed,
DisplacementFieldTransform(field))`` apply, and the direction ANTs' ``*Warp.nii.gz`` files have.

Files:
  ``.nii`` / ``.nii.gz``  vector NIfTI as ANTs writes it: shape (X, Y, Z, 1, 3), intent code 1007
                          (vector), float32 LPS components (the NIfTI affine is the usual RAS one);
  ``.nrrd`` / ``.mha``    the same field as an ITK vector image;
  ``.h5`` / ``.hdf5``     an ITK transform file holding a DisplacementFieldTransform (float64).
Reading also accepts any transform file SimpleITK reads (``.tfm``, ``.txt``, ``.mat``, ``.h5``:
affine, composite, ...), sampled on a reference grid.

Our own maps are in [0, 1] units of a grid (channel k along index axis k, see ``image.py``); the
conversions here are exact: [0, 1] units times (shape - 1) are index units, times
``direction @ diag(spacing)`` are millimetres.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import IncompleteOutput, OutputError
from .image import (Geometry, InputError, _check_readable, _sitk, atomic_output, check_writable, suffix_of,
                    write_sitk)
from .output import require_free_space

__all__ = [
    "DisplacementField", "FIELD_IMAGE_SUFFIXES", "TRANSFORM_FILE_SUFFIXES", "read_displacement_field",
    "read_transform", "write_displacement_field", "displacement_to_physical", "physical_to_displacement",
]

FIELD_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
TRANSFORM_FILE_SUFFIXES = (".h5", ".hdf5")
READABLE_TRANSFORM_SUFFIXES = TRANSFORM_FILE_SUFFIXES + (".tfm", ".txt", ".mat", ".xfm")


def _geometry_tensor(geometry: Geometry, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, scale): M = direction @ diag(spacing) (d x d), scale = shape - 1, as float64 tensors."""
    return (torch.as_tensor(geometry.index_to_physical_matrix, dtype=dtype),
            torch.as_tensor(geometry.map_scale, dtype=dtype))


def displacement_to_physical(disp: torch.Tensor, geometry: Geometry) -> np.ndarray:
    """A displacement field in [0, 1] units of ``geometry``'s grid, ``(1, d, *S)`` or ``(d, *S)``, to
    LPS millimetres ``(*S, d)`` (float64)."""
    u = disp.detach().cpu().to(torch.float64)
    if u.ndim == geometry.ndim + 2:
        u = u[0]
    if tuple(u.shape) != (geometry.ndim, *geometry.shape):
        raise ValueError(f"displacement of shape {tuple(disp.shape)} does not lie on grid {geometry.shape}")
    m, scale = _geometry_tensor(geometry)
    index_units = u.movedim(0, -1) * scale  # (*S, d)
    return (index_units @ m.T).numpy()


def physical_to_displacement(u_mm: np.ndarray, geometry: Geometry, *, dtype=torch.float32) -> torch.Tensor:
    """LPS millimetres ``(*S, d)`` on ``geometry``'s grid to a ``(1, d, *S)`` field in [0, 1] units."""
    u = torch.as_tensor(np.asarray(u_mm), dtype=torch.float64)
    m, scale = _geometry_tensor(geometry)
    index_units = u @ torch.linalg.inv(m).T
    return (index_units / scale).movedim(-1, 0)[None].to(dtype).contiguous()


@dataclass
class DisplacementField:
    """A dense displacement field: ``vectors`` (*shape, d) in LPS mm on ``geometry`` (ITK convention)."""

    vectors: np.ndarray
    geometry: Geometry

    def __post_init__(self):
        g = self.geometry
        if tuple(self.vectors.shape) != (*g.shape, g.ndim):
            raise InputError(f"displacement field of shape {tuple(self.vectors.shape)} does not match its grid "
                             f"{g.shape} with {g.ndim} components")

    @classmethod
    def from_map_displacement(cls, disp: torch.Tensor, geometry: Geometry) -> "DisplacementField":
        """From a displacement in [0, 1] units whose source and target coordinates are both ``geometry``'s."""
        return cls(displacement_to_physical(disp, geometry), geometry)

    @classmethod
    def from_target_points(cls, targets_mm: np.ndarray, geometry: Geometry) -> "DisplacementField":
        """From the physical image ``targets_mm`` (*S, d) of every voxel centre of ``geometry``."""
        return cls(np.asarray(targets_mm, dtype=np.float64) - geometry.grid_physical(), geometry)

    def map_displacement(self, *, dtype=torch.float32, moving: Geometry | None = None) -> torch.Tensor:
        """The field in [0, 1] units, ``(1, d, *S)``: a one-field chain for gradicon_fast.

        The source coordinates are the field's own grid's; the targets are ``moving``'s grid's (the
        image the field resamples), by default the field's own grid too.
        """
        if moving is None:
            return physical_to_displacement(self.vectors, self.geometry, dtype=dtype)
        if moving.ndim != self.geometry.ndim:
            raise InputError(f"the moving grid is {moving.ndim}D but the displacement field is {self.geometry.ndim}D")
        targets = torch.as_tensor(moving.physical_to_map(self.target_points()), dtype=torch.float64).movedim(-1, 0)
        from .. import reference

        identity = reference.identity_map(self.geometry.shape, dtype=torch.float64)
        return (targets[None] - identity).to(dtype).contiguous()

    def map(self, *, dtype=torch.float32) -> torch.Tensor:
        """The transform as a map ``(1, d, *S)`` in [0, 1] units of its own grid (identity + displacement)."""
        from .. import reference

        return reference.identity_map(self.geometry.shape, dtype=dtype) + self.map_displacement(dtype=dtype)

    def target_points(self) -> np.ndarray:
        """``p + u(p)`` for every voxel centre p, LPS mm ``(*S, d)``."""
        return self.geometry.grid_physical() + self.vectors

    def transform_points(self, points_mm: np.ndarray) -> np.ndarray:
        """``p + u(p)`` at arbitrary physical points ``(N, d)``, u interpolated (linear, border-clamped)."""
        from .. import functional as gfn

        points_mm = np.asarray(points_mm, dtype=np.float64)
        x = torch.as_tensor(self.geometry.physical_to_map(points_mm), dtype=torch.float64).T[None]  # (1, d, N)
        chain = [self.map_displacement(dtype=torch.float64)]
        y = gfn.transform_points(chain, x, backend="torch")[0].T.numpy()
        return self.geometry.map_to_physical(y)

    def jacobian_determinant(self) -> torch.Tensor:
        """Jacobian determinant per grid cell (forward differences, docs/conventions.md §4), ``(*(S - 1))``.

        The determinant is invariant under the grid's affine change of coordinates, so it is the same in
        millimetres as in [0, 1] units.
        """
        from .. import functional as gfn

        return gfn.jacobian_determinant(self.map(dtype=torch.float64))[0]

    def fold_percentage(self) -> float:
        from .. import functional as gfn

        return float(gfn.fold_percentage(self.map(dtype=torch.float64)))

    def to_sitk_image(self, *, dtype=np.float32):
        sitk = _sitk()
        d = self.geometry.ndim
        array = np.transpose(self.vectors, tuple(reversed(range(d))) + (d,)).astype(dtype)
        img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=True)
        self.geometry.apply_to(img)
        return img

    def to_sitk_transform(self):
        """A ``sitk.DisplacementFieldTransform`` (float64 field; it owns a copy of the vectors)."""
        sitk = _sitk()
        return sitk.DisplacementFieldTransform(self.to_sitk_image(dtype=np.float64))

    @classmethod
    def from_sitk_image(cls, img) -> "DisplacementField":
        sitk = _sitk()
        d = img.GetDimension()
        if img.GetNumberOfComponentsPerPixel() != d:
            raise InputError(f"a {d}D displacement field needs {d} components per voxel, this image has "
                             f"{img.GetNumberOfComponentsPerPixel()}")
        array = sitk.GetArrayFromImage(img).astype(np.float64)
        vectors = np.transpose(array, tuple(reversed(range(d))) + (d,))
        return cls(np.ascontiguousarray(vectors), Geometry.from_sitk(img))

    def resampled(self, reference: Geometry) -> "DisplacementField":
        """The same transform sampled on another grid (linear interpolation of the field)."""
        if reference.same_grid(self.geometry):
            return self
        return field_of_transform(self.to_sitk_transform(), reference)


def field_of_transform(transform, reference: Geometry) -> DisplacementField:
    """Any SimpleITK transform sampled as a displacement field on ``reference``'s grid."""
    sitk = _sitk()
    if transform.GetDimension() != reference.ndim:
        raise InputError(f"the transform is {transform.GetDimension()}D but the reference image is "
                         f"{reference.ndim}D")
    img = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, list(reference.shape),
                                            list(reference.origin), list(reference.spacing),
                                            list(reference.direction))
    return DisplacementField.from_sitk_image(img)


def write_displacement_field(path, field: DisplacementField, *, what: str = "transform") -> None:
    """Write ``field`` (atomically) as a vector image or an ITK ``.h5`` transform, by the file's suffix."""
    sitk = _sitk()
    suffix = suffix_of(path)
    allowed = FIELD_IMAGE_SUFFIXES + TRANSFORM_FILE_SUFFIXES
    check_writable(path, what=what, suffixes=allowed)
    if suffix not in TRANSFORM_FILE_SUFFIXES:
        write_sitk(field.to_sitk_image(dtype=np.float32), path, what=what, suffixes=FIELD_IMAGE_SUFFIXES)
        return
    # the HDF5 file holds the float64 vectors uncompressed: at least this many bytes
    write_transform_file(path, field.to_sitk_transform(), what=what, min_bytes=field.vectors.size * 8)


def write_transform_file(path, transform, *, what: str = "transform", min_bytes: int = 0) -> None:
    """Write a SimpleITK transform crash-safely (temporary file, read back, renamed); the format is
    the suffix's (``.h5``: HDF5; ``.txt``/``.tfm``/``.mat``: ITK's text and MATLAB formats).

    HDF5 does not fail cleanly on a full disk (a page of diagnostics, and its file left open until a
    failed close at process exit), so a write that cannot fit (``min_bytes``, a lower bound of the
    file size) fails before HDF5 is called.
    """
    sitk = _sitk()
    hdf5 = suffix_of(path) in TRANSFORM_FILE_SUFFIXES
    if min_bytes:
        require_free_space(path, min_bytes, what=what)

    def read_back(tmp):
        try:
            parameters = sitk.ReadTransform(tmp).GetNumberOfParameters()
        except RuntimeError:
            raise IncompleteOutput("the file read back is incomplete or damaged") from None
        if parameters != transform.GetNumberOfParameters():
            raise IncompleteOutput("the transform read back has the wrong number of parameters")

    try:
        with atomic_output(path, what=what, verify=read_back) as tmp:
            sitk.WriteTransform(transform, tmp)
    except OutputError:
        if hdf5:
            _hdf5_failures.append(path)
        raise


# HDF5 keeps a file it failed to write open; at process exit it then fails to close it again, with a
# page of diagnostics on stderr or a crash. A command line that reported the failure can end with
# os._exit and skip that (see hdf5_write_failed).
_hdf5_failures: list = []


def hdf5_write_failed() -> bool:
    """Whether an HDF5 transform file failed to write in this process (see ``_hdf5_failures``)."""
    return bool(_hdf5_failures)


def _is_transform_file(path: str) -> bool:
    return suffix_of(path) in READABLE_TRANSFORM_SUFFIXES


def read_transform(path, *, what: str = "transform"):
    """Read a transform file or a displacement-field image as a SimpleITK transform."""
    sitk = _sitk()
    path = _check_readable(path, what)
    if _is_transform_file(path):
        try:
            tx = sitk.ReadTransform(path)
        except RuntimeError:
            raise InputError(f"cannot read {what} {path!r}: not a transform file SimpleITK reads") from None
        return tx.Downcast() if hasattr(tx, "Downcast") else tx
    return read_displacement_field(path, what=what).to_sitk_transform()


def read_displacement_field(path, reference: Geometry | None = None, *, what: str = "transform") -> DisplacementField:
    """A transform file or displacement-field image as a :class:`DisplacementField`.

    Without ``reference`` the field keeps its own grid (a transform file must then hold a
    DisplacementFieldTransform); with it, the transform is sampled on ``reference``'s grid.
    """
    from .image import read_sitk

    path = os.fspath(path)
    if _is_transform_file(path):
        tx = read_transform(path, what=what)
        sitk = _sitk()
        if reference is None:
            if isinstance(tx, sitk.DisplacementFieldTransform):
                return DisplacementField.from_sitk_image(tx.GetDisplacementField())
            raise InputError(f"{what} {path!r} is a {tx.GetName()}, not a displacement field: give a reference "
                             f"image to sample it on")
        return field_of_transform(tx, reference)
    img = read_sitk(path, what)
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() not in (2, 3) or img.GetNumberOfComponentsPerPixel() != img.GetDimension():
        raise InputError(f"{what} {path!r} is not a displacement field: a {img.GetDimension()}D image with "
                         f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel (a field has one vector "
                         f"component per axis)")
    field = DisplacementField.from_sitk_image(img)
    return field if reference is None else field.resampled(reference)


def chain_to_field(chain: Sequence[torch.Tensor], geometry: Geometry, *, moving: Geometry | None = None,
                   backend: str | None = None) -> DisplacementField:
    """A chain evaluated on ``geometry``'s grid and exported in millimetres.

    The chain's source coordinates are ``geometry``'s [0, 1] units, its targets ``moving``'s (the
    grid of the image it resamples), by default ``geometry``'s too.
    """
    from .. import functional as gfn
    from .. import reference

    disp = gfn.compose([c.detach() for c in chain], geometry.shape, backend=backend)
    if moving is None:
        return DisplacementField.from_map_displacement(disp, geometry)
    if moving.ndim != geometry.ndim:
        raise InputError(f"the moving grid is {moving.ndim}D but the fixed grid is {geometry.ndim}D")
    targets = (reference.identity_map(geometry.shape, dtype=torch.float64) + disp.to(torch.float64).cpu())[0]
    return DisplacementField.from_target_points(moving.map_to_physical(targets.movedim(0, -1).numpy()), geometry)


def warp_image(moving, field: DisplacementField, *, mode: str = "bilinear", default_value: float | None = 0.0,
               backend: str | None = None):
    """``moving`` resampled on ``field``'s grid: ``warped(p) = moving(p + u(p))``, as ITK/ANTs apply ``field``.

    ``moving`` is an :class:`~gradicon_fast.io.image.Image` on any grid; the field's targets are
    converted to the moving grid's continuous indices, so nothing is interpolated twice. A target
    outside the moving image (beyond half a voxel past its first or last voxel centre on some axis)
    gets ``default_value``, as in ``sitk.Resample`` and ``antsApplyTransforms`` with their default
    pixel value 0; ``default_value=None`` clamps to the border instead, as the training-time
    ``sample`` does (docs/conventions.md §7). ``mode="nearest"`` is for label maps (the output keeps
    the input's dtype; rounding half up, as ITK); linear interpolation gives float32.
    """
    from .. import functional as gfn
    from .image import Image
    from .itk_sampling import default_value_of_type, inside_image, nearest_voxels

    if moving.ndim != field.geometry.ndim:
        raise InputError(f"the moving image is {moving.ndim}D but the transform is {field.geometry.ndim}D")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    out_dtype = moving.array.dtype if mode == "nearest" else np.dtype(np.float32)
    fill = None if default_value is None else default_value_of_type(float(default_value), out_dtype,
                                                                     what="default value")
    index = moving.geometry.physical_to_index(field.target_points())  # (*S, d) continuous indices, float64
    finite = np.all(np.isfinite(index), axis=-1)
    if mode == "nearest":
        out = moving.array[nearest_voxels(index, moving.shape)]
        if not finite.all():
            if not np.issubdtype(out_dtype, np.floating):
                raise InputError(f"the transform maps {int((~finite).sum())} voxel(s) to non-finite points")
            out[~finite] = np.nan
    else:
        shape = field.geometry.shape
        disp = field.map_displacement(moving=moving.geometry)
        warped = gfn.warp(moving.tensor(dtype=torch.float32), [disp], shape=shape, backend=backend)
        out = warped[0, 0].numpy()  # non-finite targets give NaN there
    if fill is not None:
        out[finite & ~inside_image(index, moving.shape)] = fill
    return Image(out, field.geometry)
