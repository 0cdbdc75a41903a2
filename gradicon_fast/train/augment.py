"""On-the-fly augmentation of training pairs (the paper's): per pair, one random signed axis
permutation shared by both images, and an independent small random affine on each image,
applied with ``gf.warp`` (border clamped, linear).

In the centred coordinates ``u = 2x - 1`` (x in [0, 1]) an image is resampled at
``u' = (P + s·N₁) u + s·n₂`` where P is the signed permutation matrix, N₁ (d×d) and n₂ (d)
standard normal and ``s = affine_scale`` (0.05 in the published training scripts).
"""

from __future__ import annotations

import torch

from .. import functional as gf

Tensor = torch.Tensor


def random_signed_permutation(d: int, generator: torch.Generator | None = None) -> Tensor:
    """A random d×d signed permutation matrix (float64)."""
    perm = torch.randperm(d, generator=generator)
    signs = torch.randint(0, 2, (d,), generator=generator).double() * 2 - 1
    matrix = torch.zeros(d, d, dtype=torch.float64)
    matrix[torch.arange(d), perm] = signs
    return matrix


def affine_displacement(matrix: Tensor, translation: Tensor, shape, *, device=None) -> Tensor:
    """The displacement field (B, d, *shape) of ``x ↦ (M (2x-1) + t + 1) / 2`` in [0, 1] units.

    ``matrix`` (B, d, d), ``translation`` (B, d), both in the centred coordinates ``u = 2x - 1``.
    """
    d = len(shape)
    identity = gf.identity_map(tuple(shape), dtype=torch.float64, device=device)  # (1, d, *S)
    u = (2 * identity - 1).reshape(1, d, -1)
    mapped = matrix.to(device) @ u + translation.to(device).unsqueeze(-1)  # (B, d, N)
    x = (mapped + 1) / 2
    return (x.reshape(-1, d, *shape) - identity).float()


def augment_pair(image_A: Tensor, image_B: Tensor, *, generator: torch.Generator | None = None,
                 affine_scale: float = 0.05, permute: bool = True) -> tuple[Tensor, Tensor]:
    """Augment a batch of pairs (B, C, *S): a signed axis permutation per pair (the same for A and B),
    then a different small random affine for each image. Randomness is drawn (on the CPU) from
    ``generator``."""
    if image_A.shape != image_B.shape:
        raise ValueError(f"image_A and image_B must have the same shape, got {tuple(image_A.shape)} and "
                         f"{tuple(image_B.shape)}")
    batch, shape = image_A.shape[0], tuple(image_A.shape[2:])
    d = len(shape)
    eye = torch.eye(d, dtype=torch.float64)
    perms = torch.stack([random_signed_permutation(d, generator) if permute else eye for _ in range(batch)])
    out = []
    for image in (image_A, image_B):
        noise = torch.randn((batch, d, d + 1), generator=generator, dtype=torch.float64) * affine_scale
        matrix = perms + noise[:, :, :d]
        translation = noise[:, :, d]
        field = affine_displacement(matrix, translation, shape, device=image.device)
        out.append(gf.warp(image.float(), [field]))
    return out[0], out[1]
