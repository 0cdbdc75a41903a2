"""Seeded synthetic 2D/3D registration pairs with label maps, for tests and demos.

A random "subject" (ellipses/ellipsoids with labels 1…L, each with its own intensity, on a
zero background, with a mild smooth intensity texture) is deformed twice by independent random
smooth displacement fields: ``image_A = subject ∘ Φ_A``, ``image_B = subject ∘ Φ_B``; the label
maps are warped the same way with nearest-neighbour sampling. Everything is drawn from a
``torch.Generator``, so a seed fixes a pair.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import functional as gf

Tensor = torch.Tensor


def _generator(seed_or_generator) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(int(seed_or_generator))


def _uniform(generator, low, high, size=()) -> Tensor:
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)


def random_smooth_displacement(shape: Sequence[int], *, amplitude: float = 0.04, control_points: int = 4,
                               generator: torch.Generator | int = 0) -> Tensor:
    """A smooth random displacement field (1, d, *shape) in [0, 1] units.

    Gaussian values (std ``amplitude``) on a ``control_points``^d grid, interpolated (bicubic in 2D,
    trilinear in 3D, align-corners) to ``shape``; zero-mean per channel is not enforced.
    """
    g = _generator(generator)
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    coarse = torch.randn((1, d) + (control_points,) * d, generator=g) * amplitude
    mode = "bicubic" if d == 2 else "trilinear"
    return F.interpolate(coarse, size=shape, mode=mode, align_corners=True).float()


def random_subject(shape: Sequence[int], *, num_labels: int = 4, generator: torch.Generator | int = 0,
                   texture: float = 0.1) -> tuple[Tensor, Tensor]:
    """A random image (1, 1, *shape) in [0, 1] and its label map (1, 1, *shape) int64 (0 = background).

    Label l is an ellipse (ellipsoid) with random centre, radii and orientation, painted in order
    (later labels cover earlier ones), with intensity drawn in [0.3, 1].
    """
    g = _generator(generator)
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    coords = gf.identity_map(shape).double()[0]  # (d, *shape) in [0, 1]
    labels = torch.zeros(shape, dtype=torch.int64)
    image = torch.zeros(shape, dtype=torch.float64)
    for label in range(1, num_labels + 1):
        centre = _uniform(g, 0.3, 0.7, (d,))
        radii = _uniform(g, 0.1, 0.25, (d,))
        rotation, _ = torch.linalg.qr(torch.randn((d, d), generator=g, dtype=torch.float64))
        offset = (coords - centre.view(d, *([1] * d))).reshape(d, -1)
        local = rotation.T @ offset
        inside = ((local / radii.view(d, 1)) ** 2).sum(0).reshape(shape) <= 1
        labels[inside] = label
        image[inside] = float(_uniform(g, 0.3, 1.0))
    if texture:
        smooth = random_smooth_displacement(shape, amplitude=1.0, control_points=6, generator=g)[0, 0].double()
        image = image * (1 + texture * torch.tanh(smooth))
    image = image.clamp(0, 1)
    return image.float().view(1, 1, *shape), labels.view(1, 1, *shape)


def synthetic_pair(shape: Sequence[int], *, seed: int | torch.Generator = 0, num_labels: int = 4,
                   amplitude: float = 0.04, control_points: int = 4, noise: float = 0.01) -> dict:
    """One synthetic pair: ``{"image_A", "image_B"}`` (1, *shape) float32 and ``{"labels_A", "labels_B"}``
    (1, *shape) int64, A and B being two random smooth deformations of one random subject."""
    g = _generator(seed)
    image, labels = random_subject(shape, num_labels=num_labels, generator=g)
    out = {}
    for key in ("A", "B"):
        field = random_smooth_displacement(shape, amplitude=amplitude, control_points=control_points, generator=g)
        warped = gf.warp(image, [field])
        warped_labels = gf.warp(labels.float(), [field], mode="nearest")
        if noise:
            warped = warped + noise * torch.randn(warped.shape, generator=g)
        out[f"image_{key}"] = warped[0].float()
        out[f"labels_{key}"] = torch.round(warped_labels[0]).long()
    return out


class SyntheticPairDataset(Dataset):
    """``length`` synthetic pairs of spatial ``shape``; item ``i`` is ``synthetic_pair(shape, seed=f(seed, i))``,
    identical on every call and in every process."""

    def __init__(self, length: int, shape: Sequence[int], *, seed: int = 0, num_labels: int = 4,
                 amplitude: float = 0.04, control_points: int = 4, noise: float = 0.01, cache: bool = True):
        self.length = int(length)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) not in (2, 3):
            raise ValueError(f"shape must have 2 or 3 entries, got {shape}")
        self.seed = int(seed)
        self.kwargs = dict(num_labels=num_labels, amplitude=amplitude, control_points=control_points, noise=noise)
        self._cache: dict | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def item_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + index * 7919 + 17) % (2 ** 62)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        item = synthetic_pair(self.shape, seed=self.item_seed(index), **self.kwargs)
        if self._cache is not None:
            self._cache[index] = item
        return item

    def batch(self, indices: Sequence[int]) -> dict:
        """Items stacked into a batch (B, 1, *shape)."""
        items = [self[i] for i in indices]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
