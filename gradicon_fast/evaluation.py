"""Evaluation of registrations (docs/conventions.md §4): Dice, fold percentage, landmark mTRE.

Conventions. For a pair (A, B) = (moving, fixed), φ_AB maps B's grid into A (``A ∘ φ_AB ≈ B``).

- **Dice**: the moving label map is warped onto the fixed grid with nearest-neighbour sampling
  and compared with the fixed label map, per label 1…L: ``2|A∩B| / (|A| + |B|)``; the mean is
  over the labels present in either map (a label absent from both gives NaN and is skipped).
- **Folds**: ``gf.fold_percentage`` of the map φ_AB materialised on a grid (default the
  network's input grid), the paper's %|J|.
- **Landmarks / mTRE**: landmarks are given as (N, d) **0-based voxel indices**: ``fixed`` in the
  fixed image B, ``moving`` in the moving image A (convert 1-based files such as DirLab's before).
  A fixed landmark ``i`` becomes the [0, 1] coordinate ``x_k = i_k / (S^B_k - 1)`` (docs/conventions.md §1:
  voxel centres, align-corners; ``S^B`` the fixed image's *original* shape, whatever size the
  network ran at, since [0, 1] coordinates do not depend on resolution as long as the resizing
  keeps the field of view, i.e. resampling with align-corners as ``gradicon_fast.data`` does).
  φ_AB maps it to ``y`` in A's [0, 1] coordinates, i.e. to the voxel ``y_k (S^A_k - 1)`` of A.
  The error is the difference to the moving landmark in A's voxel space, converted to mm with
  **the moving image's spacing**: both points then live in the moving image, so its voxel
  spacing is the one that measures their distance (for DirLab the two phases share one geometry
  anyway). Origins and direction cosines cancel in a difference of two points of the same image;
  an oblique direction matrix is a rotation and leaves lengths unchanged.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import functional as gf

Tensor = torch.Tensor


def dice_per_label(warped_labels: Tensor, fixed_labels: Tensor, labels: Sequence[int] | int | None = None) -> Tensor:
    """Dice of each label: (B, L) float64, NaN where a label is absent from both maps.

    ``labels``: the label values (default 1…max of both maps), or an int L meaning 1…L.
    """
    if warped_labels.shape != fixed_labels.shape:
        raise ValueError(f"label maps must have the same shape, got {tuple(warped_labels.shape)} and "
                         f"{tuple(fixed_labels.shape)}")
    a = torch.round(warped_labels).long() if warped_labels.is_floating_point() else warped_labels.long()
    b = torch.round(fixed_labels).long() if fixed_labels.is_floating_point() else fixed_labels.long()
    if labels is None:
        labels = range(1, int(max(a.max(), b.max())) + 1)
    elif isinstance(labels, int):
        labels = range(1, labels + 1)
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    out = []
    for label in labels:
        in_a, in_b = a == label, b == label
        inter = (in_a & in_b).sum(1).double()
        size = (in_a.sum(1) + in_b.sum(1)).double()
        out.append(torch.where(size > 0, 2 * inter / size.clamp_min(1), torch.full_like(size, math.nan)))
    if not out:
        return torch.zeros((a.shape[0], 0), dtype=torch.float64)
    return torch.stack(out, dim=1)


def dice(warped_labels: Tensor, fixed_labels: Tensor, labels: Sequence[int] | int | None = None) -> Tensor:
    """Mean Dice over labels, per batch element (B,) (labels absent from both maps skipped)."""
    return torch.nanmean(dice_per_label(warped_labels, fixed_labels, labels), dim=1)


def evaluate_labels(result, moving_labels: Tensor, fixed_labels: Tensor, *, labels=None,
                    direction: str = "AB", fold_shape: Sequence[int] | None = None) -> dict:
    """Dice and folds of a :class:`gradicon_fast.nn.RegistrationResult`.

    With ``direction="AB"``, ``moving_labels`` are A's (B, 1, *S_A) and ``fixed_labels`` B's
    (B, 1, *S_B), at any resolution (the warped map is computed on B's grid). Returns
    ``{"dice": (B,), "dice_per_label": (B, L), "dice_initial": (B,), "fold_percentage": float}``.
    """
    warped = result.warp_labels(moving_labels, direction, shape=tuple(fixed_labels.shape[2:]))
    per_label = dice_per_label(warped, fixed_labels, labels)
    initial = None
    if moving_labels.shape == fixed_labels.shape:
        initial = dice(moving_labels, fixed_labels, labels)
    return {
        "dice": torch.nanmean(per_label, dim=1),
        "dice_per_label": per_label,
        "dice_initial": initial,
        "fold_percentage": float(result.fold_percentage(direction, fold_shape)),
    }


def voxel_to_unit(points: Tensor, shape: Sequence[int]) -> Tensor:
    """(N, d) 0-based voxel indices → [0, 1] coordinates of a grid of ``shape``: ``i / (S - 1)``."""
    scale = torch.tensor([max(int(s) - 1, 1) for s in shape], dtype=torch.float64)
    return points.double() / scale


def unit_to_voxel(points: Tensor, shape: Sequence[int]) -> Tensor:
    """(N, d) [0, 1] coordinates → voxel indices of a grid of ``shape``."""
    scale = torch.tensor([max(int(s) - 1, 1) for s in shape], dtype=torch.float64)
    return points.double() * scale


def map_landmarks(result, fixed_landmarks: Tensor, *, fixed_shape: Sequence[int], moving_shape: Sequence[int],
                  direction: str = "AB", batch_index: int = 0) -> Tensor:
    """Fixed-image landmarks (N, d) (voxels) mapped by φ into the moving image's voxels (N, d)."""
    chain = [f[batch_index:batch_index + 1] for f in result.chain(direction)]
    unit = voxel_to_unit(torch.as_tensor(fixed_landmarks), fixed_shape)
    points = unit.T.unsqueeze(0).to(dtype=chain[0].dtype, device=chain[0].device)  # (1, d, N)
    mapped = gf.transform_points(chain, points)[0].T.double().cpu()
    return unit_to_voxel(mapped, moving_shape)


def landmark_errors(result, fixed_landmarks: Tensor, moving_landmarks: Tensor, *, fixed_shape: Sequence[int],
                    moving_shape: Sequence[int], moving_spacing: Sequence[float], direction: str = "AB",
                    batch_index: int = 0) -> Tensor:
    """Per-landmark registration errors in mm, (N,) float64 (see the module docstring)."""
    mapped = map_landmarks(result, fixed_landmarks, fixed_shape=fixed_shape, moving_shape=moving_shape,
                           direction=direction, batch_index=batch_index)
    spacing = torch.as_tensor(moving_spacing, dtype=torch.float64)
    diff = (mapped - torch.as_tensor(moving_landmarks, dtype=torch.float64)) * spacing
    return diff.norm(dim=1)


def mtre(result, fixed_landmarks: Tensor, moving_landmarks: Tensor, **kwargs) -> float:
    """Mean target registration error in mm (arguments as :func:`landmark_errors`)."""
    return float(landmark_errors(result, fixed_landmarks, moving_landmarks, **kwargs).mean())


def initial_mtre(fixed_landmarks: Tensor, moving_landmarks: Tensor, *, fixed_shape: Sequence[int],
                 moving_shape: Sequence[int], moving_spacing: Sequence[float]) -> float:
    """mTRE of the identity transform (the "initial" column of the paper's tables)."""
    mapped = unit_to_voxel(voxel_to_unit(torch.as_tensor(fixed_landmarks), fixed_shape), moving_shape)
    spacing = torch.as_tensor(moving_spacing, dtype=torch.float64)
    return float(((mapped - torch.as_tensor(moving_landmarks, dtype=torch.float64)) * spacing).norm(dim=1).mean())
