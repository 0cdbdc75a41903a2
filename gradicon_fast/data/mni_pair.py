"""The demo's anatomy: the MNI ICBM152 2009a brain template and the same brain under a known deformation.

The template files (a brain-extracted T1 and grey/white-matter probability maps, 1 mm, 197x233x189)
come inside the ``nilearn`` wheel. They are read by path from the installed package, without
importing nilearn, so ``pip install --no-deps nilearn`` (what ``make setup`` does) is all the demo
needs: nilearn's own dependencies (scikit-learn, pandas, ...) are not used.

The pair imitates two MRI scans of one brain: the fixed image is the template on a coarser grid
(``size`` voxels along the longest axis), the moving image is the template under a smooth
deformation of a few millimetres (a sum of Gaussian bumps, known in closed form), with a smooth
multiplicative bias field; both get Rician noise. The true φ_AB is the deformation's inverse, found
by fixed-point iteration on the closed form. Tissue labels (CSF, grey matter, white matter) are the
argmax of the probability maps, resampled the same way as the images.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import functional as gfn
from .. import reference
from ..io import Geometry, Image, InputError, read_image
from ..registration import GaussianBlur
from .known_pair import SyntheticPair

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TISSUES = ("CSF", "grey matter", "white matter")  # labels 1, 2, 3
INSTALL_HINT = "pip install --no-deps nilearn"
ATTRIBUTION = (
    "Anatomy: MNI ICBM152 2009a nonlinear template (T1, grey/white-matter probability maps) as bundled in the "
    "nilearn package. Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University. VS Fonov et al., NeuroImage 47 (2009) S102 and NeuroImage 54 (2011) 313-327.")
LICENCE = (
    "Permission to use, copy, modify, and distribute this software and its documentation for any purpose and "
    "without fee is hereby granted, provided that the above copyright notice appear in all copies. The authors "
    "and McGill University make no representations about the suitability of this software for any purpose. It is "
    "provided \"as is\" without express or implied warranty. The authors are not responsible for any data loss, "
    "equipment damage, property loss, or injury to subjects or patients resulting from the use or misuse of the "
    "software package.")
BRAIN_THRESHOLD = 0.2   # of the T1 maximum: nilearn's own brain mask of this template
MARGIN_MM = 8.0         # background kept around the brain


class DemoDataMissing(InputError):
    """The template files are not installed (the message says what to install)."""


def template_folder() -> Path:
    """The folder of the installed nilearn package that holds the template files."""
    spec = importlib.util.find_spec("nilearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataMissing(f"the demo's anatomy (the MNI ICBM152 brain template) comes with the nilearn package, "
                              f"which is not installed: run `make setup` or `{INSTALL_HINT}` (or run the demo "
                              f"with --synthetic for a built-in synthetic pair)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DemoDataMissing(f"the installed nilearn package lacks the demo's template file(s) {', '.join(missing)} "
                              f"in {folder}: install a version that bundles them (`{INSTALL_HINT}==0.14.1`), or "
                              f"run the demo with --synthetic")
    return folder


def load_template() -> dict[str, Image]:
    """The T1 (scaled to [0, 1]) and the grey/white-matter probabilities ([0, 1]), on the template's grid."""
    folder = template_folder()
    images = {key: read_image(folder / name, what="template file") for key, name in TEMPLATE_FILES.items()}
    for image in images.values():
        image.array /= max(float(image.array.max()), 1e-12)
    return images


@dataclass
class BumpField:
    """A smooth displacement in closed form: ``w(p) = Σ_b vectors[b] · exp(-|p - centres[b]|² / 2 width²)``,
    points and vectors in millimetres."""

    centres: torch.Tensor   # (B, d) float64
    vectors: torch.Tensor   # (B, d) float64
    width: float

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """w at ``points`` (N, d) float64."""
        out = torch.zeros_like(points)
        for centre, vector in zip(self.centres, self.vectors):
            weight = torch.exp(((points - centre) ** 2).sum(1) * (-0.5 / self.width ** 2))
            out += weight[:, None] * vector
        return out

    def inverse_displacement(self, points: torch.Tensor, *, tolerance_mm: float = 1e-5,
                             max_iterations: int = 200) -> torch.Tensor:
        """v with ``p + v + w(p + v) = p`` at every point: x ↦ x + w(x) undone. Fixed-point iteration
        ``v ← -w(p + v)``, a contraction while |∇w| < 1."""
        v = -self(points)
        for _ in range(max_iterations):
            updated = -self(points + v)
            change = float((updated - v).abs().max())
            v = updated
            if change < tolerance_mm:
                return v
        raise RuntimeError(f"the deformation's inverse did not converge (last change {change:.2e} mm)")


def _crop(images: dict[str, Image], low: np.ndarray, high: np.ndarray) -> dict[str, Image]:
    """The index box [low, high] (clamped to the grid) of every image, with its geometry."""
    geometry = next(iter(images.values())).geometry
    low = np.maximum(np.floor(low), 0).astype(int)
    high = np.minimum(np.ceil(high), np.asarray(geometry.shape) - 1).astype(int)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(low, high))
    cropped = Geometry(tuple(high - low + 1), geometry.spacing, tuple(geometry.index_to_physical(low)),
                       geometry.direction)
    return {key: Image(np.ascontiguousarray(image.array[box]), cropped) for key, image in images.items()}


def _sample(volumes: torch.Tensor, geometry: Geometry, points_mm: torch.Tensor) -> torch.Tensor:
    """(C, N): trilinear samples of ``volumes`` (1, C, *S) on ``geometry`` at physical ``points_mm``
    (N, 3); 0 outside."""
    to_index = torch.as_tensor(np.linalg.inv(geometry.index_to_physical_matrix))
    index = (points_mm - torch.as_tensor(geometry.origin)) @ to_index.T
    size = torch.tensor(geometry.shape, dtype=torch.float64)
    normalised = (2 * index / (size - 1) - 1).flip(-1).float()  # grid_sample: last axis first
    out = F.grid_sample(volumes, normalised.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out.view(volumes.shape[1], -1)


def _random_bumps(generator: torch.Generator, low: torch.Tensor, high: torch.Tensor, count: int,
                  width: float) -> BumpField:
    """Bumps centred uniformly in the box [low, high] (mm) with random directions and unit-scale sizes."""
    d = len(low)
    centres = low + (high - low) * torch.rand((count, d), generator=generator, dtype=torch.float64)
    vectors = torch.randn((count, d), generator=generator, dtype=torch.float64)
    return BumpField(centres, vectors, width)


def _rician(image: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Magnitude of a complex signal with Gaussian noise σ on both channels (MRI magnitude images)."""
    real = image + sigma * torch.randn(image.shape, generator=generator, dtype=image.dtype)
    imaginary = sigma * torch.randn(image.shape, generator=generator, dtype=image.dtype)
    return torch.sqrt(real ** 2 + imaginary ** 2)


def demo_geometry(template: Geometry, brain: np.ndarray, size: int) -> Geometry:
    """The demo's grid: the brain's bounding box plus a margin, ``size`` voxels along its longest axis,
    isotropic voxels, the template's axes."""
    low, high = _bounding_box(brain)
    spacing_t = np.asarray(template.spacing)
    extent = (high - low) * spacing_t + 2 * MARGIN_MM
    spacing = float(extent.max()) / (size - 1)
    shape = tuple(int(round(e / spacing)) + 1 for e in extent)
    origin = template.index_to_physical(low - MARGIN_MM / spacing_t)
    return Geometry(shape, (spacing,) * 3, tuple(origin), template.direction)


def _bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inside = np.nonzero(mask)
    low = np.array([i.min() for i in inside], dtype=np.float64)
    return low, np.array([i.max() for i in inside], dtype=np.float64)


def make_mni_pair(size: int = 96, *, seed: int = 0, max_displacement_mm: float = 8.0, bump_width_mm: float = 25.0,
                  bumps: int = 10, bias: float = 0.2, noise: float = 0.03) -> SyntheticPair:
    """The template pair (see the module's docstring) on a grid of ``size`` voxels along the brain's
    longest axis. ``max_displacement_mm``: the largest displacement inside the brain; ``bias``: the
    moving image's multiplicative bias field spans exp(±bias); ``noise``: the Rician noise σ of both
    images (the T1 is in [0, 1], white matter ≈ 0.85)."""
    if size < 16:
        raise InputError(f"the demo's size must be at least 16 voxels, got {size}")
    images = load_template()
    images["brain"] = Image((images["t1"].array > BRAIN_THRESHOLD).astype(np.float32), images["t1"].geometry)
    geometry = demo_geometry(images["t1"].geometry, images["brain"].array > 0, size)
    # Anti-aliasing for the coarser grid: a Gaussian of FWHM ≈ the new voxel size (σ in 1 mm voxels, a
    # multiple of 0.5 so that the taps are centred), on the part of the 1 mm volumes the samples can reach.
    sigma = round(2 * 0.42 * geometry.spacing[0] / min(images["t1"].geometry.spacing)) / 2
    reach = (MARGIN_MM + max_displacement_mm + 2 * sigma + 2) / np.asarray(images["t1"].geometry.spacing)
    low, high = _bounding_box(images["brain"].array > 0)
    images = _crop(images, low - reach, high + reach)
    template = images["t1"].geometry
    stack = torch.from_numpy(np.stack([images[key].array for key in ("t1", "gm", "wm", "brain")]))[None]
    if sigma >= 0.5:
        stack = GaussianBlur(sigma, template.shape)(stack)
    g = torch.Generator().manual_seed(seed)

    points = torch.from_numpy(geometry.grid_physical().reshape(-1, 3))
    fixed_stack = _sample(stack, template, points)
    region = fixed_stack[3] >= 0.5
    # the deformation, scaled to max_displacement_mm inside the brain
    box = points[region]
    field = _random_bumps(g, box.min(0).values, box.max(0).values, bumps, bump_width_mm)
    field.vectors *= max_displacement_mm / float(field(box).norm(dim=1).max())
    moving_stack = _sample(stack, template, points + field(points))
    true_mm = field.inverse_displacement(points)      # fixed point p <-> moving point p + true_mm

    shape = geometry.shape
    to_index = np.linalg.inv(geometry.index_to_physical_matrix)
    true_index = true_mm.numpy() @ to_index.T
    displacement = torch.from_numpy(true_index / geometry.map_scale).float().T.reshape(1, 3, *shape)

    def labels(s: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([1 - s[3], (s[3] - s[1] - s[2]).clamp_min(0), s[1], s[2]])
        return probabilities.argmax(0).float().reshape(1, 1, *shape)

    # the moving scan's receive-coil shading: a smooth field, exp(±bias) over the brain
    shading = _random_bumps(g, box.min(0).values, box.max(0).values, 3, 60.0)
    log_bias = shading(points)[:, 0]
    log_bias *= bias / float(log_bias[region].abs().max())
    fixed = _rician(fixed_stack[0].double(), noise, g).float().reshape(1, 1, *shape)
    moving = _rician(moving_stack[0].double() * torch.exp(log_bias), noise, g).float().reshape(1, 1, *shape)

    region = region.reshape(shape)
    candidates = torch.nonzero(region)
    pick = candidates[torch.randperm(len(candidates), generator=g)[:300]]
    landmarks_fixed = pick.numpy().astype(np.float64)
    landmarks_moving = landmarks_fixed + true_index[np.ravel_multi_index(tuple(pick.T.numpy()), shape)]
    phi = reference.identity_map(shape) + displacement
    info = {"source": ATTRIBUTION, "bias_range": [float(np.exp(-bias)), float(np.exp(bias))], "rician_sigma": noise,
            "bumps": bumps, "bump_width_mm": bump_width_mm}
    return SyntheticPair(fixed.contiguous(), moving.contiguous(), labels(fixed_stack), labels(moving_stack),
                         displacement.contiguous(), landmarks_fixed, landmarks_moving, geometry, len(TISSUES),
                         max_displacement_mm=float(true_mm.norm(dim=1).reshape(shape)[region].max()),
                         min_jacobian=float(gfn.jacobian_determinant(phi).min()), info=info, region=region,
                         label_names=TISSUES, outline_labels=(TISSUES.index("white matter") + 1,))
