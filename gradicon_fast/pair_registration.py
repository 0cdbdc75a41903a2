"""``gradicon_fast.register``: register two image files (or :class:`~gradicon_fast.io.Image` s) from Python.

The engine of ``gradicon-fast register`` (:func:`gradicon_fast.registration.register_images`), with
the command line's defaults: model-free registration, or a network (a gradicon_fast checkpoint or an
official weight file) run as the published uniGradICON pipeline runs it.

    import gradicon_fast as gf
    result = gf.register("fixed.nii.gz", "moving.nii.gz", model="unigradicon.trch",
                         fixed_modality="ct", moving_modality="ct")
    result.forward, result.inverse, result.warped, result.metrics
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np


def _image(value, what: str):
    from . import io

    if isinstance(value, io.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        return io.read_image(value, what=what)
    raise TypeError(f"the {what} must be a file path or a gradicon_fast.io.Image, got {type(value).__name__}")


def _mask(value, image, what: str) -> np.ndarray | None:
    """A mask (voxels > 0) on ``image``'s grid from a path, an Image or an array; one-line errors otherwise."""
    from . import io

    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return io.read_mask(value, image, what=what)
    if isinstance(value, io.Image):
        if value.shape != image.shape or not value.geometry.same_grid(image.geometry, tol=1e-3):
            raise io.InputError(f"the {what} is not on its image's grid (shape, spacing, origin or direction differ)")
        value = value.array
    mask = np.asarray(value) > 0
    if mask.shape != tuple(image.shape):
        raise io.InputError(f"the {what} has shape {mask.shape} but its image has {tuple(image.shape)}")
    if not mask.any():
        raise io.InputError(f"the {what} is empty (no voxel > 0)")
    return mask


def _model(value, device: str, backend: str | None, preset: str | None, shape: Sequence[int] | None):
    if value is None or not isinstance(value, (str, os.PathLike)):
        return value
    from .nn import load_model

    return load_model(value, map_location=device, backend=backend, preset=preset, shape=shape).to(device)


def register(fixed, moving, model=None, *, fixed_mask=None, moving_mask=None, fixed_modality: str | None = None,
             moving_modality: str | None = None, mask_use: str = "input", io_iterations: int = 50,
             io_similarity: str | None = None, io_lr: float | None = None, model_preset: str | None = None,
             model_shape: Sequence[int] | None = None, intensity: str = "auto", init: str | None = None,
             settings=None, device: str = "cpu", backend: str | None = None, default_value: float = 0.0,
             progress: bool = False, log: Callable[[str], None] | None = None):
    """Register ``moving`` to ``fixed`` (file paths or :class:`~gradicon_fast.io.Image` s).

    ``model``: None (model-free registration, ``settings`` a
    :class:`~gradicon_fast.registration.RegistrationSettings`), a checkpoint or official weight file
    (``model_preset``/``model_shape`` give an official file's input shape) or a loaded
    :class:`gradicon_fast.nn.GradICON`. Masks are paths, Images or arrays on their image's grid. The
    other options are those of ``gradicon-fast register`` (docs/register.md); ``init`` defaults to
    "affine" without a model and must be "none" with one.

    Returns a :class:`~gradicon_fast.registration.ImageRegistration`: ``forward`` (the fixed→moving field
    on the fixed grid, ITK convention; :func:`gradicon_fast.io.write_displacement_field` writes it),
    ``inverse``, ``warped`` (the moving image on the fixed grid) and ``metrics`` (folds, Jacobian
    determinant range, time).
    """
    from .registration import register_images

    fixed_image = _image(fixed, "fixed image")
    moving_image = _image(moving, "moving image")
    fixed_mask = _mask(fixed_mask, fixed_image, "fixed mask")
    moving_mask = _mask(moving_mask, moving_image, "moving mask")
    model = _model(model, device, backend, model_preset, model_shape)
    return register_images(fixed_image, moving_image, fixed_mask=fixed_mask, moving_mask=moving_mask,
                           intensity=intensity, settings=settings, model=model, io_iterations=io_iterations,
                           backend=backend, device=device, progress=progress, log=log, default_value=default_value,
                           init=init, fixed_modality=fixed_modality, moving_modality=moving_modality,
                           mask_use=mask_use, io_similarity=io_similarity, io_lr=io_lr)
