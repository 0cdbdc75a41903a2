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

from .unet_execution import CHECKPOINT_MODES, autocast_dtype, checkpoint_contexts, memory_format

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


class DisplacementField(RegistrationModule):
    """One step: a U-Net fed ``cat[moving, fixed]`` whose output is a displacement field; a one-field chain.

    How the U-Net runs (set with :func:`configure`; the defaults are plain float32):

    - ``amp_dtype``: autocast dtype of the U-Net (``torch.bfloat16``, ``torch.float16``), ``None``
      for float32, or ``"auto"``: bfloat16 where the device computes it natively (a CPU with
      AVX512-BF16 or AMX, a CUDA GPU with bf16 support), float32 elsewhere. The field is always
      returned in float32 (the fused ops keep float32 maps).
    - ``checkpoint``: ``False`` keeps every activation for backward; ``True`` (or ``"full"``)
      keeps none and reruns the whole U-Net in backward; ``"selective"`` keeps only the
      convolution outputs and recomputes the cheap rest (activations, pooling, upsampling,
      BatchNorm, concatenations) in backward: most of the memory saving at a fraction of the cost.
    - ``channels_last``: the U-Net runs in the channels-last layout (``torch.channels_last_3d``
      in 3D), for which oneDNN has faster convolutions on CPUs.

    Recomputation and layout change no value beyond rounding; autocast rounds the U-Net's
    arithmetic to its dtype (docs/performance.md gives the measured effect on registrations).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.amp_dtype: torch.dtype | str | None = None
        self.checkpoint: bool | str = False
        self.channels_last = False

    def _run(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=memory_format(x.ndim))
        dtype = autocast_dtype(self.amp_dtype, x.device)
        if dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=dtype):
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
                                context_fn=lambda: checkpoint_contexts(self.net, self.checkpoint))
        else:
            field = self._run(x)
        return [field.float().contiguous()]


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
              checkpoint: bool | str | None = None, channels_last: bool | None = None) -> nn.Module:
    """Set how every U-Net step of ``module`` runs (see :class:`DisplacementField`); ``"keep"`` /
    ``None`` leave a setting as it is.

    ``amp_dtype``: an autocast dtype, ``None`` (float32) or ``"auto"``; ``checkpoint``: ``False``,
    ``True``/``"full"`` or ``"selective"``; ``channels_last``: a bool.
    """
    if not (amp_dtype in ("keep", "auto", None) or isinstance(amp_dtype, torch.dtype)):
        raise ValueError(f"amp_dtype must be a torch dtype, None, 'auto' or 'keep', got {amp_dtype!r}")
    if checkpoint is not None and checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
    for step in displacement_fields(module):
        if amp_dtype != "keep":
            step.amp_dtype = amp_dtype
        if checkpoint is not None:
            step.checkpoint = "full" if checkpoint is True else checkpoint
        if channels_last is not None:
            step.channels_last = bool(channels_last)
            # the weights in the layout of the activations, so that no convolution converts them
            step.net.to(memory_format=memory_format(step.net.dimension + 2) if channels_last
                        else torch.contiguous_format)
    return module


def fast_defaults(module: nn.Module) -> nn.Module:
    """The settings the command line and :func:`gradicon_fast.train.instance_optimize` callers get by
    default: ``amp_dtype="auto"``, ``checkpoint="selective"``, ``channels_last=True``
    (docs/performance.md: speed, memory and measured accuracy)."""
    return configure(module, amp_dtype="auto", checkpoint="selective", channels_last=True)


@contextlib.contextmanager
def full_precision(module: nn.Module):
    """Within the block, every U-Net step of ``module`` runs in float32 in the usual layout
    (checkpointing unchanged); each step's own settings are restored afterwards."""
    steps = displacement_fields(module)
    saved = [(s.amp_dtype, s.channels_last) for s in steps]
    configure(module, amp_dtype=None, channels_last=False)
    try:
        yield module
    finally:
        for step, (amp_dtype, channels_last) in zip(steps, saved):
            configure(step, amp_dtype=amp_dtype, channels_last=channels_last)


@contextlib.contextmanager
def fast_defaults_while_plain(module: nn.Module):
    """Within the block, :func:`fast_defaults` for a ``module`` whose U-Nets are at the plain settings
    (float32, no checkpointing, usual layout); a module configured otherwise is left as it is.
    The plain settings are restored afterwards."""
    steps = displacement_fields(module)
    plain = all(s.amp_dtype is None and not s.checkpoint and not s.channels_last for s in steps)
    if not plain:
        yield module
        return
    fast_defaults(module)
    try:
        yield module
    finally:
        configure(module, amp_dtype=None, checkpoint=False, channels_last=False)
