"""Which gradients are not finite: checked before an optimiser step, so that no NaN reaches the weights.
A safety net for low-precision backward passes that go wrong with a finite loss (as oneDNN's bfloat16
weight gradient did for strided convolutions over one-voxel-long inputs, which the U-Net now runs in
float32: gradicon_fast/nn/unet.py)."""

from __future__ import annotations

import torch


def non_finite_gradients(named_parameters) -> list[str]:
    """The names of the parameters whose gradient holds a NaN or an infinity (one device sync in all)."""
    graded = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if not graded:
        return []
    finite = torch.stack([g.isfinite().all() for _, g in graded]).tolist()
    return [name for (name, _), ok in zip(graded, finite) if not ok]
