"""The synthetic pair: a textured "body" with labelled ellipsoidal organs, under a known smooth deformation.

Built at run time from a seed, in 2D or 3D, at any size: the demo's ``--synthetic`` pair, and the
pair the registration tests and benchmarks recover.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import functional as gfn
from .. import reference
from ..io import Geometry
from .known_pair import SyntheticPair


def _smooth_noise(shape: Sequence[int], coarse: int, generator: torch.Generator) -> torch.Tensor:
    """Band-limited noise: a coarse random grid upsampled (trilinear), standardised."""
    d = len(shape)
    coarse_shape = [max(2, math.ceil(s / coarse)) for s in shape]
    n = torch.randn((1, 1, *coarse_shape), generator=generator)
    mode = "trilinear" if d == 3 else "bilinear"
    up = F.interpolate(n, size=tuple(shape), mode=mode, align_corners=True)
    up = up[0, 0]
    return (up - up.mean()) / up.std()


def _soft_ellipsoid(axes_mm: Sequence[torch.Tensor], centre, radii, edge_mm: float
                    ) -> tuple[tuple[slice, ...], torch.Tensor]:
    """Smooth indicator of an ellipsoid on its bounding box: (box slices, values ~1 inside, ~0 outside,
    with a transition ``edge_mm`` wide). ``axes_mm`` are the voxel positions along each axis."""
    box, coords = [], []
    for k, ax in enumerate(axes_mm):
        margin = radii[k] * 1.2 + 8 * edge_mm
        inside = torch.nonzero((ax >= centre[k] - margin) & (ax <= centre[k] + margin))[:, 0]
        lo, hi = (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)
        box.append(slice(lo, hi))
        coords.append(((ax[lo:hi] - centre[k]) / radii[k]) ** 2)
    r = coords[0]
    for c in coords[1:]:
        r = r[..., None] + c
    mean_radius = float(np.mean(radii))
    return tuple(box), torch.sigmoid((1 - r.sqrt()) * mean_radius / edge_mm)


def _gaussian_bump(axes_mm: Sequence[torch.Tensor], centre, width: float) -> torch.Tensor:
    """exp(-|x - c|² / 2w²) on the full grid, built from separable 1-D factors."""
    out = None
    for k, ax in enumerate(axes_mm):
        f = torch.exp(-((ax - float(centre[k])) ** 2) / (2 * width ** 2))
        out = f if out is None else out[..., None] * f
    return out


def make_synthetic_pair(shape: Sequence[int] = (96, 96, 96), spacing: float = 2.0, *, max_displacement_mm: float = 15.0,
                        num_labels: int = 5, num_landmarks: int = 300, noise: float = 0.0, seed: int = 0
                        ) -> SyntheticPair:
    """A synthetic pair of 2D or 3D images with a known smooth deformation (at most ``max_displacement_mm``).

    The moving image is a textured ellipsoidal "body" with ``num_labels`` ellipsoidal organs of distinct
    intensities and small bright blobs; the fixed image is the moving image pulled back through a
    smooth random displacement (a sum of Gaussian bumps, ~0.16 of the field of view wide), so the true
    transform is known exactly at every fixed voxel. ``noise`` adds independent Gaussian noise of that
    standard deviation to each image (intensities are in [0, 1]).
    """
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    if d not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 axes, got {shape}")
    g = torch.Generator().manual_seed(seed)
    rand = lambda *size: torch.rand(size, generator=g, dtype=torch.float64)  # noqa: E731
    extent = torch.tensor([(s - 1) * spacing for s in shape], dtype=torch.float64)
    axes = [torch.arange(s, dtype=torch.float32) * spacing for s in shape]
    centre = extent / 2

    # -- moving image and labels -----------------------------------------------------------------
    body_radii = (extent * 0.42).tolist()
    box, values = _soft_ellipsoid(axes, centre.tolist(), body_radii, edge_mm=2.0)
    body = torch.zeros(shape)
    body[box] = values
    texture = _smooth_noise(shape, 6, g)
    image = body * (0.30 + 0.06 * texture)
    labels = torch.zeros(shape, dtype=torch.float32)
    for label in range(1, num_labels + 1):
        for _ in range(100):
            radii = extent * (0.07 + 0.08 * rand(d))
            offset = (rand(d) - 0.5) * 2 * (torch.tensor(body_radii) - radii) * 0.6
            box, inside = _soft_ellipsoid(axes, (centre + offset).tolist(), radii.tolist(), edge_mm=1.5)
            if (labels[box][inside > 0.5] == 0).float().mean() > 0.8:  # mostly free space
                break
        level = 0.45 + 0.5 * (label - 1) / max(num_labels - 1, 1)
        inner = 0.04 * _smooth_noise(inside.shape, 3, g)
        image[box] = image[box] * (1 - inside) + inside * (level + inner)
        labels[box][inside > 0.5] = label
    # small bright blobs (vessel cross-sections, nodules): features for the similarity
    blobs = torch.zeros(shape)
    for _ in range(60 if d == 3 else 25):
        c = centre + (rand(d) - 0.5) * 2 * torch.tensor(body_radii) * 0.55
        box, values = _soft_ellipsoid(axes, c.tolist(), [3.0 * spacing] * d, edge_mm=1.0)
        blobs[box] = torch.maximum(blobs[box], values)
    image = torch.clamp(image + 0.25 * blobs * body, 0, 1).float()

    # -- the deformation: x (fixed) -> x + u(x) (moving), a sum of Gaussian bumps ----------------
    width = float(extent.mean()) * 0.16
    u_mm = torch.zeros((d, *shape), dtype=torch.float32)
    for _ in range(8):
        c = centre + (rand(d) - 0.5) * extent * 0.6
        a = rand(d) * 2 - 1
        bump = _gaussian_bump(axes, c, width)
        for k in range(d):
            u_mm[k] += float(a[k]) * bump
    magnitude = u_mm.norm(dim=0).max()
    u_mm *= max_displacement_mm / float(magnitude)
    disp = torch.stack([u_mm[k] / float(extent[k]) for k in range(d)])[None].contiguous()

    chain = [disp]
    fixed = gfn.warp(image[None, None], chain, backend="torch")
    fixed_labels = gfn.warp(labels[None, None], chain, mode="nearest", backend="torch")
    phi = reference.identity_map(shape) + disp
    min_jac = float(gfn.jacobian_determinant(phi).min())

    # -- landmarks: random voxels inside the fixed body --------------------------------------------
    body_fixed = gfn.warp(body[None, None], chain, backend="torch")[0, 0] > 0.9
    candidates = torch.nonzero(body_fixed)
    pick = torch.randperm(len(candidates), generator=g)[:num_landmarks]
    lm_fixed = candidates[pick].numpy().astype(np.float64)
    u_index = (disp[0] * torch.tensor([s - 1 for s in shape]).view(d, *([1] * d))).numpy()
    lm_moving = lm_fixed + np.stack([u_index[k][tuple(candidates[pick].T.numpy())] for k in range(d)], axis=1)

    moving = image[None, None]
    if noise > 0:
        fixed = fixed + noise * torch.randn(fixed.shape, generator=g)
        moving = moving + noise * torch.randn(moving.shape, generator=g)
    geometry = Geometry.isotropic(shape, spacing)
    return SyntheticPair(fixed.contiguous(), moving.contiguous(), fixed_labels.contiguous(),
                         labels[None, None].contiguous(), disp, lm_fixed, lm_moving, geometry, num_labels,
                         max_displacement_mm=float(u_mm.norm(dim=0).max()), min_jacobian=min_jac,
                         region=body_fixed, label_names=tuple(f"organ {label}" for label in range(1, num_labels + 1)))
