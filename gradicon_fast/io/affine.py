"""Affine transforms as ITK transform files: ``AffineTransform_double_3_3`` (2D: ``_2_2``) with its centre.

``.mat`` is the binary format ANTs writes (``*0GenericAffine.mat``), ``.txt``/``.tfm`` ITK's text
format; ANTs, 3D Slicer and SimpleITK read all three. The transform maps a fixed-image point p
(LPS mm) to the moving point ``matrix @ p + offset``, stored the ITK way as
``T(p) = M (p - c) + c + t`` with the centre c given by the caller.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .errors import IncompleteOutput
from .image import _sitk, check_writable
from .output import atomic_output

__all__ = ["AFFINE_FILE_SUFFIXES", "sitk_affine", "write_affine"]

AFFINE_FILE_SUFFIXES = (".mat", ".txt", ".tfm")


def sitk_affine(matrix: np.ndarray, offset: Sequence[float], center: Sequence[float] | None = None):
    """``p ↦ matrix @ p + offset`` as a ``sitk.AffineTransform`` with centre ``center`` (default 0)."""
    sitk = _sitk()
    matrix = np.asarray(matrix, dtype=np.float64)
    d = matrix.shape[0]
    c = np.zeros(d) if center is None else np.asarray(center, dtype=np.float64)
    tx = sitk.AffineTransform(d)
    tx.SetMatrix(tuple(float(v) for v in matrix.ravel()))
    tx.SetCenter(tuple(float(v) for v in c))
    tx.SetTranslation(tuple(float(v) for v in matrix @ c + np.asarray(offset, dtype=np.float64) - c))
    return tx


def write_affine(path, matrix: np.ndarray, offset: Sequence[float], *, center: Sequence[float] | None = None,
                 what: str = "affine transform") -> None:
    """Write the affine (atomically; the file is read back and compared before it takes its name)."""
    sitk = _sitk()
    check_writable(path, what=what, suffixes=AFFINE_FILE_SUFFIXES)
    tx = sitk_affine(matrix, offset, center)
    expected = np.asarray(tx.GetParameters() + tx.GetFixedParameters())

    def verify(tmp: str) -> None:
        back = sitk.ReadTransform(tmp)
        found = np.asarray(back.GetParameters() + back.GetFixedParameters())
        if found.shape != expected.shape or not np.allclose(found, expected, rtol=1e-6, atol=1e-9):
            raise IncompleteOutput("the file does not read back as the transform written")

    with atomic_output(os.fspath(path), what=what, verify=verify) as tmp:
        sitk.WriteTransform(tx, tmp)
