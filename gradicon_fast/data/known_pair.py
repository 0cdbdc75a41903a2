"""An image pair with the exact transform between them, and how a registration of it is scored.

Both the demo's pairs (:mod:`gradicon_fast.data.blob_pair`, synthetic organs; and
:mod:`gradicon_fast.data.mni_pair`, the MNI brain template) are :class:`SyntheticPair` s: the moving
image, the fixed one, their label maps and the true φ_AB on the fixed grid. A registration's φ_AB is
scored against it by Dice (per label), the landmark error and the dense error in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .. import functional as gfn
from ..evaluation import dice_per_label
from ..io import Geometry, Image


@dataclass
class SyntheticPair:
    """A fixed/moving pair with the exact transform between them.

    ``displacement`` is the true φ_AB (A = moving, B = fixed) as a displacement field in [0, 1] units
    on the fixed grid: the fixed point x corresponds to the moving point ``x + displacement(x)``, and
    ``fixed = moving ∘ φ_AB``. Landmarks are voxel positions (index units, (N, d)) in the fixed image
    and their exact images in the moving one. Both images share ``geometry``. ``region`` (fixed grid,
    bool) is where the dense error is measured (the body, the brain); ``label_names[l - 1]`` names
    label l.
    """

    fixed: torch.Tensor           # (1, 1, *S), intensities in [0, 1]
    moving: torch.Tensor
    fixed_labels: torch.Tensor    # (1, 1, *S) float tensors holding label ids 0..L
    moving_labels: torch.Tensor
    displacement: torch.Tensor    # (1, d, *S), [0, 1] units
    landmarks_fixed: np.ndarray   # (N, d) index units
    landmarks_moving: np.ndarray
    geometry: Geometry
    num_labels: int
    max_displacement_mm: float = 0.0
    min_jacobian: float = 1.0
    info: dict = field(default_factory=dict)
    region: torch.Tensor | None = None    # (*S) bool
    label_names: tuple[str, ...] = ()
    outline_labels: tuple[int, ...] = ()

    def image(self, which: str) -> Image:
        """``fixed``, ``moving``, ``fixed_labels`` or ``moving_labels`` as an :class:`Image`."""
        t = getattr(self, which)
        dtype = np.int16 if which.endswith("labels") else np.float32
        return Image.from_tensor(t, self.geometry, dtype=dtype)

    def names(self) -> list[str]:
        """The labels' names (``label l`` where none was given)."""
        given = list(self.label_names)
        return [given[i] if i < len(given) else f"label {i + 1}" for i in range(self.num_labels)]


def dice(a: torch.Tensor, b: torch.Tensor, num_labels: int) -> float:
    """Mean Dice over labels 1..num_labels of two label maps of any (equal) shape (docs/conventions.md §4),
    labels absent from both skipped."""
    scores = dice_per_label(a.reshape(1, -1), b.reshape(1, -1), num_labels)[0]
    present = scores[~torch.isnan(scores)]
    return float(present.mean()) if len(present) else float("nan")


def landmark_error_mm(chain: Sequence[torch.Tensor] | None, pair: SyntheticPair) -> np.ndarray:
    """Per-landmark distance (mm) between φ(fixed landmark) and the true moving landmark; φ = identity
    if ``chain`` is None."""
    scale = pair.geometry.map_scale
    if chain is None:
        mapped = pair.landmarks_fixed
    else:
        x = torch.as_tensor(pair.landmarks_fixed / scale, dtype=torch.float32).T[None]  # (1, d, N)
        y = gfn.transform_points([c.detach() for c in chain], x)[0].T.double().numpy()
        mapped = y * scale
    diff_mm = (mapped - pair.landmarks_moving) * np.asarray(pair.geometry.spacing)
    return np.linalg.norm(diff_mm, axis=1)


def dense_error_mm(displacement: torch.Tensor | None, pair: SyntheticPair) -> np.ndarray:
    """Distance (mm) between the recovered and the true φ_AB at every voxel of ``pair.region`` (every
    voxel if it has none). ``displacement`` is the recovered φ_AB - id on the fixed grid, [0, 1] units
    ((1, d, *S), :func:`gradicon_fast.functional.compose`); None is the identity (the error before
    registration)."""
    d = pair.geometry.ndim
    difference = pair.displacement[0].double()
    if displacement is not None:
        difference = displacement[0].detach().double() - difference
    # [0, 1] units -> index units -> mm (the direction matrix is orthonormal: it keeps lengths)
    mm_per_unit = torch.as_tensor(pair.geometry.map_scale * np.asarray(pair.geometry.spacing)).view(d, *[1] * d)
    distance = (difference * mm_per_unit).norm(dim=0)
    region = pair.region if pair.region is not None else torch.ones_like(distance, dtype=torch.bool)
    return distance[region].numpy()
