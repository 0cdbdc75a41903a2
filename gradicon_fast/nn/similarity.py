"""Image similarity losses (docs/conventions.md §3): LNCC(σ), squared LNCC, MSE, MIND-SSC (:mod:`.mind`).
Lower is better; all are scalars, means over the voxels (over those where a mask is non-zero, when given).

``G∗`` is a separable Gaussian blur: 1-D taps at ``x = -(k-1)/2 … (k-1)/2``, ``k = 4σ + 1``,
weights ``exp(-x²/2σ²)`` normalised to sum 1, convolved along every spatial axis with zero padding
and "same" output size. Computed in float32 whatever the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _checkpoint

Tensor = torch.Tensor

LNCC_EPS = 1e-5


def gaussian_taps(sigma: int, *, dtype=torch.float32, device=None) -> Tensor:
    """The normalised 1-D Gaussian taps of LNCC(σ): ``4σ + 1`` of them."""
    if int(sigma) != sigma or sigma < 1:
        raise ValueError(f"sigma must be a positive integer, got {sigma!r}")
    k = 4 * int(sigma) + 1
    x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-x ** 2 / (2 * float(sigma) ** 2))
    return (w / w.sum()).to(dtype=dtype, device=device)


def _blur_matrix(taps: Tensor, size: int) -> Tensor:
    """The (size, size) banded matrix of the zero-padded "same" 1-D convolution with ``taps``."""
    k = taps.numel()
    offsets = torch.arange(size, device=taps.device)[None, :] - torch.arange(size, device=taps.device)[:, None]
    index = (offsets + (k - 1) // 2).clamp(0, k - 1)
    return torch.where(offsets.abs() <= (k - 1) // 2, taps[index], taps.new_zeros(()))


def gaussian_blur(x: Tensor, sigma: int) -> Tensor:
    """``G∗x``: separable Gaussian convolution of (B, C, *S) along each spatial axis, same size, zero padding.

    Each axis is one matrix product with the banded (n, n) matrix of the 1-D convolution: the same
    sums as a depthwise convolution, but on the BLAS, several times faster on CPUs.
    """
    d = x.ndim - 2
    if d not in (2, 3):
        raise ValueError(f"gaussian_blur expects (B, C, *spatial) with 2 or 3 spatial axes, got {tuple(x.shape)}")
    taps = gaussian_taps(sigma, dtype=x.dtype, device=x.device)
    shape = x.shape
    x = x.contiguous()
    for axis in range(d):
        n = shape[2 + axis]
        matrix = _blur_matrix(taps, n)
        outer = shape[0] * shape[1] * math.prod(shape[2:2 + axis])
        inner = math.prod(shape[3 + axis:])
        if inner == 1:  # the last axis: one product from the right (not a batch of matrix-vector products)
            x = torch.matmul(x.reshape(outer, n), matrix.T).reshape(shape)
        else:
            x = torch.matmul(matrix, x.reshape(outer, n, inner)).reshape(shape)
    return x


def _lncc_map(I: Tensor, J: Tensor, sigma: int) -> Tensor:
    c = I.shape[1]
    blurred = gaussian_blur(torch.cat([I, J, I * I, J * J, I * J], dim=1), sigma)
    mu_I, mu_J, I2, J2, IJ = blurred.split(c, dim=1)
    var_I = torch.relu(I2 - mu_I * mu_I) + LNCC_EPS
    var_J = torch.relu(J2 - mu_J * mu_J) + LNCC_EPS
    return (IJ - mu_I * mu_J) / torch.sqrt(var_I * var_J)


def lncc(image_I: Tensor, image_J: Tensor, sigma: int = 5) -> Tensor:
    """The local normalised cross-correlation map (B, C, *S) of docs/conventions.md §3.

    With gradients, only the two images are kept for backward and the blurred products are
    recomputed there (activation checkpointing; the same values): they are five image-sized
    tensors and their intermediates, cheap to recompute next to their share of a step's memory.
    """
    if image_I.shape != image_J.shape:
        raise ValueError(f"similarity: images must have the same shape, got {tuple(image_I.shape)} and "
                         f"{tuple(image_J.shape)}")
    I = image_I.float()
    J = image_J.float()
    if torch.is_grad_enabled() and (I.requires_grad or J.requires_grad):
        return _checkpoint(_lncc_map, I, J, sigma, use_reentrant=False)
    return _lncc_map(I, J, sigma)


def lncc_loss(image_I: Tensor, image_J: Tensor, sigma: int = 5) -> Tensor:
    """``1 - mean(lncc)``."""
    return 1 - lncc(image_I, image_J, sigma).mean()


def squared_lncc_loss(image_I: Tensor, image_J: Tensor, sigma: int = 5) -> Tensor:
    """``1 - mean(lncc²)``."""
    return 1 - (lncc(image_I, image_J, sigma) ** 2).mean()


def mse_loss(image_I: Tensor, image_J: Tensor) -> Tensor:
    """``mean((I - J)²)``."""
    if image_I.shape != image_J.shape:
        raise ValueError(f"similarity: images must have the same shape, got {tuple(image_I.shape)} and "
                         f"{tuple(image_J.shape)}")
    return ((image_I.float() - image_J.float()) ** 2).mean()


class Similarity(nn.Module):
    """``Similarity("lncc" | "squared_lncc" | "mse" | "mind", sigma=5)``: ``forward(I, J, mask=None)`` → scalar
    loss; ``mask`` (broadcast like ``J``) restricts the mean to its non-zero voxels, as the published
    uniGradICON's loss-function masking does. ``"mind"``: MIND-SSC, radius 2, dilation 2 (3D)."""

    NAMES = ("lncc", "squared_lncc", "mse", "mind")

    def __init__(self, name: str = "lncc", sigma: int = 5):
        super().__init__()
        if name not in self.NAMES:
            raise ValueError(f"similarity must be one of {', '.join(map(repr, self.NAMES))}, got {name!r}")
        if name in ("lncc", "squared_lncc"):
            gaussian_taps(sigma)  # validates sigma
        self.name = name
        self.sigma = int(sigma)

    def forward(self, image_I: Tensor, image_J: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            if self.name == "lncc":
                return lncc_loss(image_I, image_J, self.sigma)
            if self.name == "squared_lncc":
                return squared_lncc_loss(image_I, image_J, self.sigma)
        from .mind import masked_mean, mind_loss

        if self.name == "mind":
            return mind_loss(image_I, image_J, mask)
        if self.name == "mse":
            mse_loss(image_I, image_J)  # checks the shapes
            return masked_mean((image_I.float() - image_J.float()) ** 2, mask)
        cc = lncc(image_I, image_J, self.sigma)
        return 1 - masked_mean(cc * cc if self.name == "squared_lncc" else cc, mask)

    def extra_repr(self) -> str:
        return f"{self.name!r}" + ("" if self.name in ("mse", "mind") else f", sigma={self.sigma}")
