"""MIND-SSC: the modality-independent self-similarity context descriptor, and the loss built on it.

The definition the published uniGradICON instance optimisation uses (``--io-similarity mind``;
Heinrich et al., MICCAI 2013), 3D images only. For a voxel p, its six face neighbours at
``dilation`` voxels give 12 pairs of perpendicular neighbours (a, b); for each pair the patch
distance is the mean over a ``(2·radius + 1)³`` box around p of ``(I(q + dilation·a) − I(q + dilation·b))²``,
every index clamped to the image (replicated borders). With ``ssd`` those 12 values,
``mind = exp(−(ssd − min ssd) / v)``, v the mean of ``ssd − min ssd`` over the 12 clamped to
[0.001, 1000] times its mean over the whole batch. The loss is the mean of the squared difference of
the two images' descriptors (over the voxels where a mask is non-zero, when one is given).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# The six face neighbours, as offsets along (axis 0, axis 1, axis 2), in the order the published
# descriptor lists them; its 12 channels are the perpendicular pairs (i, j), i > j, in this order ...
_NEIGHBOURS = ((-1, 0, 0), (0, 0, -1), (0, -1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0))
_PAIRS = tuple((i, j) for i, j in itertools.product(range(6), repeat=2)
               if i > j and sum((a - b) ** 2 for a, b in zip(_NEIGHBOURS[i], _NEIGHBOURS[j])) == 2)
# ... then permuted into the channel order of the original C++ implementation.
_CHANNEL_ORDER = (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)


def _shifted(padded: Tensor, offset, dilation: int, shape) -> Tensor:
    """``I(p + dilation·offset)`` for every p, from ``I`` replicate-padded by ``dilation``."""
    index = tuple(slice(dilation * (1 + o), dilation * (1 + o) + s) for o, s in zip(offset, shape))
    return padded[(Ellipsis,) + index]


def mind_ssc(image: Tensor, radius: int = 2, dilation: int = 2) -> Tensor:
    """The MIND-SSC descriptor ``(B, 12, X, Y, Z)`` of a single-channel 3D image ``(B, 1, X, Y, Z)``."""
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"MIND-SSC takes single-channel 3D images (B, 1, X, Y, Z), got {tuple(image.shape)}")
    image = image.float()
    shape = image.shape[2:]
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    distances = torch.cat([(_shifted(padded, _NEIGHBOURS[i], dilation, shape)
                            - _shifted(padded, _NEIGHBOURS[j], dilation, shape)) ** 2 for i, j in _PAIRS], dim=1)
    size = 2 * radius + 1
    ssd = F.avg_pool3d(F.pad(distances, (radius,) * 6, mode="replicate"), size, stride=1)
    mind = ssd - ssd.min(dim=1, keepdim=True).values
    variance = mind.mean(dim=1, keepdim=True)
    level = variance.mean()
    variance = torch.clamp(variance, min=(0.001 * level).item(), max=(1000 * level).item())
    return torch.exp(-mind / variance)[:, list(_CHANNEL_ORDER)]


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of ``values`` over the entries where ``mask`` (broadcast over channels) is non-zero, per
    batch item (at least one entry counted), then over the batch; the plain mean without a mask."""
    if mask is None:
        return values.mean()
    included = (mask != 0).expand_as(values)
    axes = tuple(range(1, values.ndim))
    counts = included.sum(axes).clamp_min(1)
    return ((values * included).sum(axes, dtype=torch.float32) / counts).mean().to(values.dtype)


def mind_loss(image_I: Tensor, image_J: Tensor, mask: Tensor | None = None, *, radius: int = 2,
              dilation: int = 2) -> Tensor:
    """``mean((MIND(I) − MIND(J))²)`` over the voxels where ``mask`` is non-zero (all without one)."""
    if image_I.shape != image_J.shape:
        raise ValueError(f"similarity: images must have the same shape, got {tuple(image_I.shape)} and "
                         f"{tuple(image_J.shape)}")
    difference = mind_ssc(image_I, radius, dilation) - mind_ssc(image_J, radius, dilation)
    return masked_mean(difference ** 2, mask)
