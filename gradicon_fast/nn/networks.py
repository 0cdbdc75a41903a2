"""Registration networks that return chains of displacement fields (docs/conventions.md §1, §5).

Convention (the paper's): for a pair (A, B) = (moving, fixed), ``φ_AB`` maps the grid of B into A,
so that ``A ∘ φ_AB ≈ B``: the warped moving image lives on the fixed image's grid. A chain
``[D_1, …, D_K]`` (outermost first) stands for ``φ = Φ_1 ∘ … ∘ Φ_K`` with ``Φ_D(x) = x + D(x)``;
fields are in [0, 1] units and may have different resolutions (coarse fields are sampled at
full-resolution coordinates as they are).

Every module here has ``chain(moving, fixed) -> list[Tensor]`` (one direction) and
``forward(image_A, image_B) -> RegistrationResult`` (both directions: ``chain(A, B)`` and
``chain(B, A)``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import functional as gf

Tensor = torch.Tensor


@dataclass
class RegistrationResult:
    """Both directions of a registration of the pair (A, B).

    ``chain_AB`` is φ_AB (B's grid → A: ``A ∘ φ_AB ≈ B``), ``chain_BA`` is φ_BA (``B ∘ φ_BA ≈ A``).
    ``shape`` is the grid the network ran on. All coordinates are in [0, 1] units (docs/conventions.md §1), so a
    result computed at the network's resolution applies unchanged to images of any resolution
    covering the same field of view.
    """

    chain_AB: list
    chain_BA: list
    shape: tuple

    def chain(self, direction: str = "AB") -> list:
        if direction == "AB":
            return self.chain_AB
        if direction == "BA":
            return self.chain_BA
        raise ValueError(f"direction must be 'AB' or 'BA', got {direction!r}")

    def swapped(self) -> "RegistrationResult":
        """The same result with A and B exchanged."""
        return RegistrationResult(self.chain_BA, self.chain_AB, self.shape)

    def detach(self) -> "RegistrationResult":
        return RegistrationResult([f.detach() for f in self.chain_AB], [f.detach() for f in self.chain_BA],
                                  self.shape)

    def displacement(self, direction: str = "AB", shape: Sequence[int] | None = None) -> Tensor:
        """The chain materialised as one displacement field ``φ(id) - id`` on grid ``shape``
        (default: the network's grid), (B, d, *shape)."""
        return gf.compose(self.chain(direction), tuple(self.shape if shape is None else shape))

    def map(self, direction: str = "AB", shape: Sequence[int] | None = None) -> Tensor:
        """The map ``φ(id)`` (coordinates, [0, 1] units) on grid ``shape``, (B, d, *shape)."""
        shape = tuple(self.shape if shape is None else shape)
        chain = self.chain(direction)
        identity = gf.identity_map(shape, dtype=chain[0].dtype, device=chain[0].device)
        return gf.transform_points(chain, identity)

    def fold_percentage(self, direction: str = "AB", shape: Sequence[int] | None = None) -> Tensor:
        """Percentage of folded grid cells of the materialised map (the paper's %|J|)."""
        return gf.fold_percentage(self.map(direction, shape))

    def warp(self, image: Tensor, direction: str = "AB", shape: Sequence[int] | None = None) -> Tensor:
        """``image ∘ φ`` with (bi/tri)linear interpolation.

        With ``direction="AB"`` pass an image of A (any resolution); the result lies on B's grid,
        of spatial shape ``shape`` (default: the image's own).
        """
        chain = self.chain(direction)
        image = image.to(chain[0].dtype) if image.dtype != chain[0].dtype else image
        return gf.warp(image, chain, shape=shape, mode="bilinear")

    def warp_labels(self, labels: Tensor, direction: str = "AB", shape: Sequence[int] | None = None) -> Tensor:
        """A label map (B, 1, *S) (integer or float) warped by nearest-neighbour sampling; same dtype."""
        chain = self.chain(direction)
        warped = gf.warp(labels.to(chain[0].dtype), chain, shape=shape, mode="nearest")
        if labels.dtype.is_floating_point:
            return warped.to(labels.dtype)
        return torch.round(warped).to(labels.dtype)

    def transform_points(self, points: Tensor, direction: str = "AB") -> Tensor:
        """φ at ``points`` (B|1, d, *P) in [0, 1] coordinates of the fixed image's grid (B's for
        ``"AB"``); returns the corresponding [0, 1] coordinates in the moving image (A's)."""
        chain = self.chain(direction)
        return gf.transform_points(chain, points.to(chain[0].dtype))


class RegistrationModule(nn.Module):
    """Base class: ``chain(moving, fixed)`` is one direction; ``forward(A, B)`` gives both."""

    def chain(self, moving: Tensor, fixed: Tensor) -> list:
        raise NotImplementedError

    def forward(self, image_A: Tensor, image_B: Tensor) -> RegistrationResult:
        if image_A.shape != image_B.shape:
            raise ValueError(f"image_A and image_B must have the same shape, got {tuple(image_A.shape)} and "
                             f"{tuple(image_B.shape)}")
        return RegistrationResult(self.chain(image_A, image_B), self.chain(image_B, image_A),
                                  tuple(image_B.shape[2:]))


def _preserve_batchnorm_stats(module: nn.Module):
    """``context_fn`` for checkpointing: the recomputation in backward leaves BatchNorm running stats alone."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    @contextlib.contextmanager
    def recompute():
        saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        try:
            yield
        finally:
            with torch.no_grad():
                for m, mean, var, count in saved:
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)

    return contextlib.nullcontext(), recompute()


class DisplacementField(RegistrationModule):
    """One step: a U-Net fed ``cat[moving, fixed]`` whose output is a displacement field; a one-field chain.

    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the U-Net under autocast; the field is always
    returned in float32 (the fused ops keep float32 maps). ``checkpoint=True`` recomputes the
    U-Net's activations in backward (``torch.utils.checkpoint``) instead of storing them.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.amp_dtype: torch.dtype | None = None
        self.checkpoint = False

    def _run(self, x: Tensor) -> Tensor:
        if self.amp_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
                return self.net(x)
        return self.net(x)

    def chain(self, moving: Tensor, fixed: Tensor) -> list:
        x = torch.cat([moving, fixed], dim=1)
        if self.checkpoint and torch.is_grad_enabled() and torch.compiler.is_compiling():
            # Compiled, the recomputation is part of the compiled backward, which leaves the running
            # statistics alone by itself (and torch.compile takes no context_fn).
            field = _checkpoint(self._run, x, use_reentrant=False)
        elif self.checkpoint and torch.is_grad_enabled():
            field = _checkpoint(self._run, x, use_reentrant=False,
                                context_fn=lambda: _preserve_batchnorm_stats(self.net))
        else:
            field = self._run(x)
        return [field.float()]


class TwoStep(RegistrationModule):
    """``TwoStep(P, Q)``: P on (A, B) → c_P; A warped by c_P; Q on (A ∘ c_P, B) → c_Q; returns ``c_P + c_Q``."""

    def __init__(self, netPhi: RegistrationModule, netPsi: RegistrationModule):
        super().__init__()
        self.netPhi = netPhi
        self.netPsi = netPsi

    def chain(self, moving: Tensor, fixed: Tensor) -> list:
        chain_p = self.netPhi.chain(moving, fixed)
        warped = gf.warp(moving.to(chain_p[0].dtype), chain_p)
        chain_q = self.netPsi.chain(warped, fixed)
        return list(chain_p) + list(chain_q)


class Downsample(RegistrationModule):
    """Average-pools both images by 2 (ceil mode) and runs ``net`` there; its fields are used as they are."""

    def __init__(self, net: RegistrationModule):
        super().__init__()
        self.net = net

    @staticmethod
    def pool(image: Tensor) -> Tensor:
        pool = F.avg_pool2d if image.ndim == 4 else F.avg_pool3d
        return pool(image, 2, ceil_mode=True)

    def chain(self, moving: Tensor, fixed: Tensor) -> list:
        return self.net.chain(self.pool(moving), self.pool(fixed))


def displacement_fields(module: nn.Module) -> list:
    """All ``DisplacementField`` steps inside ``module`` (in module order)."""
    return [m for m in module.modules() if isinstance(m, DisplacementField)]


def configure(module: nn.Module, *, amp_dtype: torch.dtype | None | str = "keep",
              checkpoint: bool | None = None) -> nn.Module:
    """Set autocast dtype (``None`` for full precision) and/or activation checkpointing of every U-Net step."""
    for step in displacement_fields(module):
        if amp_dtype != "keep":
            step.amp_dtype = amp_dtype
        if checkpoint is not None:
            step.checkpoint = bool(checkpoint)
    return module
