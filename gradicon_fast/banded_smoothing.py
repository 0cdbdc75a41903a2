"""Separable smoothing by banded matrices: a "same"-size 1-D convolution with zero padding along
one axis is one product with a banded (size x size) matrix; exact, and on CPUs several times faster
than a depthwise convolution for the Gaussian widths of the similarity and the field smoothing.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Tensor = torch.Tensor


def band_matrix(size: int, taps: Tensor) -> Tensor:
    """``G`` with ``(x @ G.T)[i] = Σ_t taps[t] x[i + t - r]`` and zeros beyond the ends (zero padding)."""
    r = taps.numel() // 2
    i = torch.arange(size, device=taps.device)
    offset = i[None, :] - i[:, None] + r
    inside = (offset >= 0) & (offset < taps.numel())
    return torch.where(inside, taps[offset.clamp(0, taps.numel() - 1)], taps.new_zeros(()))


def smooth_axes(x: Tensor, matrices: Sequence[Tensor]) -> Tensor:
    """Apply ``matrices[k]`` along spatial axis k of ``(B, C, *S)``, without transposing copies: the
    axis is the middle one of a ``(before, S_k, after)`` view, multiplied from the left; the last
    axis, the last one of a ``(B·C·S_0, rows, S_last)`` view, multiplied from the right.

    Every product is a batched one: torch's single 2D product (MKL sgemm) rounds differently with
    the number of threads (measured: 1 against 3 threads), the batched ones were bit-identical for
    1-8 threads (tests/test_reproducibility.py checks it)."""
    shape = x.shape
    spatial = shape[2:]
    before = shape[0] * shape[1]
    for k, m in enumerate(matrices):
        after = math.prod(spatial[k + 1:])
        if after == 1 and k > 0:
            batch = shape[0] * shape[1] * spatial[0]
            x = torch.bmm(x.reshape(batch, before // batch, spatial[k]), m.T.expand(batch, *m.shape)).reshape(shape)
        else:
            x = torch.matmul(m, x.reshape(before, spatial[k], after)).reshape(shape)
        before *= spatial[k]
    return x
