"""The GradICON training objective (docs/conventions.md §3): ``λ·L_reg + sim(A∘φ_AB, B) + sim(B∘φ_BA, A)``.

All warping, chain evaluation and penalties go through the ``gradicon_fast`` ops (``gf.*``), on
the backend given to the module (``None``: the current one, ``"auto"`` by default).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from .. import functional as gf
from ..backend_registry import use_backend
from .. import reference as _ref
from .networks import RegistrationModule, RegistrationResult, configure
from .similarity import Similarity

Tensor = torch.Tensor

REGULARIZERS = ("gradicon", "gradicon_dense", "gradicon_analytic", "icon", "diffusion", "bending")


class LossTerms(NamedTuple):
    """``total = λ·regularization + similarity``; ``similarity`` is the sum over both directions;
    ``fold_percentage`` (no gradient) is the paper's %|J| of φ_AB on the input grid."""

    total: Tensor
    similarity: Tensor
    regularization: Tensor
    fold_percentage: Tensor


class GradICON(nn.Module):
    """A registration network with its training objective.

    ``GradICON(network, input_shape, lmbda=1.5, similarity="lncc", sigma=5, regularizer="gradicon")``

    - ``network``: a :class:`RegistrationModule` (``network(A, B)`` gives both directions).
    - ``input_shape``: the spatial shape the network takes; it is also the penalty grid.
    - ``regularizer``: ``"gradicon"`` (sparse, stride 2: the paper's), ``"gradicon_dense"``
      (stride 1), ``"gradicon_analytic"`` (exact Jacobian, stride ``stride`` default 2),
      ``"icon"``, ``"diffusion"`` or ``"bending"`` (the latter two summed over both directions,
      on the maps materialised on the input grid).
    - ``backend``: the gradicon_fast backend for every op (``None``: the current one).

    ``forward(image_A, image_B, *, noise=None, generator=None)`` returns :class:`LossTerms`;
    ``noise`` (shape :meth:`noise_shape`) or ``generator`` fix the penalty's random points; ``mask_A`` /
    ``mask_B`` (on the input grid) restrict the similarity of the direction onto A / B to their non-zero voxels.
    ``register(image_A, image_B)`` returns the :class:`RegistrationResult`.
    """

    def __init__(self, network: RegistrationModule, input_shape: Sequence[int], *, lmbda: float = 1.5,
                 similarity: str = "lncc", sigma: int = 5, regularizer: str = "gradicon", stride: int | None = None,
                 symmetric: bool = False, backend: str | None = None):
        super().__init__()
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) not in (2, 3) or any(s < 2 for s in input_shape):
            raise ValueError(f"input_shape must be 2 or 3 sizes >= 2, got {input_shape}")
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {', '.join(map(repr, REGULARIZERS))}, got {regularizer!r}")
        if regularizer == "gradicon_dense":
            stride = 1 if stride is None else stride
        elif stride is None:
            stride = 2
        self.regis_net = network
        self.input_shape = input_shape
        self.lmbda = float(lmbda)
        self.similarity = Similarity(similarity, sigma)
        self.regularizer = regularizer
        self.stride = int(stride)
        self.symmetric = bool(symmetric)
        self.backend = backend
        # How to rebuild this module (set by standard_network; saved in checkpoints).
        self.config: dict = {}

    @property
    def dimension(self) -> int:
        return len(self.input_shape)

    def noise_shape(self) -> tuple:
        """Shape of the ``noise`` argument: (1, d, *points) of the penalty's grid."""
        d = self.dimension
        if self.regularizer in ("gradicon", "gradicon_dense", "gradicon_analytic"):
            return (1, d, *_ref.loss_points_shape(self.input_shape, self.stride))
        return (1, d, *self.input_shape)

    def _backend_context(self):
        return use_backend(self.backend) if self.backend is not None else contextlib.nullcontext()

    def _check_images(self, image_A: Tensor, image_B: Tensor) -> None:
        for name, image in (("image_A", image_A), ("image_B", image_B)):
            if not isinstance(image, torch.Tensor) or image.ndim != self.dimension + 2 \
                    or tuple(image.shape[2:]) != self.input_shape:
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"{name} must be (B, C, *{self.input_shape}) (the network's input shape), got {shape}")
        if image_A.shape != image_B.shape:
            raise ValueError(f"image_A and image_B must have the same shape, got {tuple(image_A.shape)} and "
                             f"{tuple(image_B.shape)}")

    def register(self, image_A: Tensor, image_B: Tensor) -> RegistrationResult:
        """Run the network both ways: φ_AB (``A ∘ φ_AB ≈ B``) and φ_BA."""
        self._check_images(image_A, image_B)
        with self._backend_context():
            return self.regis_net(image_A.float(), image_B.float())

    def regularization(self, result: RegistrationResult, *, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        chain_AB, chain_BA = result.chain_AB, result.chain_BA
        shape = self.input_shape
        if self.regularizer in ("gradicon", "gradicon_dense", "gradicon_analytic"):
            mode = "analytic" if self.regularizer == "gradicon_analytic" else "fd"
            return gf.gradicon_loss(chain_AB, chain_BA, shape=shape, stride=self.stride, noise=noise,
                                    generator=generator, symmetric=self.symmetric, mode=mode)
        if self.regularizer == "icon":
            return gf.icon_loss(chain_AB, chain_BA, shape=shape, noise=noise, generator=generator)
        energy = gf.diffusion_energy if self.regularizer == "diffusion" else gf.bending_energy
        return energy(result.map("AB", shape)) + energy(result.map("BA", shape))

    def forward(self, image_A: Tensor, image_B: Tensor, *, noise: Tensor | None = None,
                generator: torch.Generator | None = None, mask_A: Tensor | None = None,
                mask_B: Tensor | None = None) -> LossTerms:
        self._check_images(image_A, image_B)
        image_A = image_A.float()
        image_B = image_B.float()
        with self._backend_context():
            result = self.regis_net(image_A, image_B)
            # The loss is float32 whatever autocast the caller runs (the networks cast their fields).
            with torch.autocast(device_type=image_A.device.type, enabled=False):
                chain_AB = [f.float() for f in result.chain_AB]
                chain_BA = [f.float() for f in result.chain_BA]
                result = RegistrationResult(chain_AB, chain_BA, self.input_shape)
                warped_A = gf.warp(image_A, chain_AB)
                warped_B = gf.warp(image_B, chain_BA)
                # loss-function masking: each direction's similarity over its target image's mask
                similarity = self.similarity(warped_A, image_B, mask_B) + self.similarity(warped_B, image_A, mask_A)
                regularization = self.regularization(result, noise=noise, generator=generator)
                total = self.lmbda * regularization + similarity
                with torch.no_grad():
                    folds = result.fold_percentage("AB").to(total.dtype)
        return LossTerms(total, similarity, regularization, folds)

    def configure(self, *, amp_dtype="keep", checkpoint: bool | str | None = None,
                  channels_last: bool | None = None) -> "GradICON":
        """Autocast dtype, activation checkpointing and layout of the U-Nets
        (:func:`gradicon_fast.nn.configure`); returns self."""
        configure(self.regis_net, amp_dtype=amp_dtype, checkpoint=checkpoint, channels_last=channels_last)
        return self

    def extra_repr(self) -> str:
        return (f"input_shape={self.input_shape}, lmbda={self.lmbda}, regularizer={self.regularizer!r}, "
                f"stride={self.stride}, backend={self.backend!r}")
