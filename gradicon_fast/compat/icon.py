"""``icon_registration``'s ``GradientICONSparse`` on gradicon_fast's fused ops: a one-line switch.

Training code written against the official package keeps its networks, similarities, optimiser
and loop; only the loss module's import changes::

    # from icon_registration.losses import GradientICONSparse
    from gradicon_fast.compat.icon import GradientICONSparse

    net = GradientICONSparse(inner_net, icon.LNCC(sigma=5), lmbda=1.5)
    net.assign_identity_map(input_shape)
    loss = net(image_A, image_B)          # ICONLoss(all_loss, inverse_consistency_loss, similarity_loss, ...)

The network is the user's own module (``net.regis_net is inner_net``: same parameters, nothing
copied), built from the official ``FunctionFromVectorField`` / ``TwoStepRegistration`` /
``DownsampleRegistration`` around any module ``net(moving, fixed)`` that returns a displacement
field. Instead of composing Python closures, the network is read as a chain of displacement fields
(docs/conventions.md §1, §5): the official maps are in the same [0, 1] align-corners coordinates
with the same channel order, ``TwoStepRegistration(P, Q)`` is P's chain followed by Q's (P
outermost), and the fields of a ``DownsampleRegistration`` child are sampled at full-resolution
coordinates as they are. The penalty is :func:`gradicon_fast.gradicon_loss` on those chains, the
warps :func:`gradicon_fast.warp`; the noise is drawn exactly as the official module draws it
(``torch.randn`` of the identity map's shape on the default generator), so seeding torch gives
both the same points.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import functional as gf

Tensor = torch.Tensor

ICONLoss = namedtuple("ICONLoss", "all_loss inverse_consistency_loss similarity_loss transform_magnitude flips")

DELTA = 1e-3  # the official finite-difference step


def _official_wrappers():
    try:
        from icon_registration import network_wrappers
    except ImportError:
        raise ImportError("gradicon_fast.compat.icon takes networks built with icon_registration; install it "
                          "(pip install icon_registration)") from None
    return network_wrappers


def network_chain(network: nn.Module, moving: Tensor, fixed: Tensor) -> list:
    """The chain of displacement fields (outermost first) an official network computes for (moving, fixed).

    The official ``network(moving, fixed)`` returns a function whose value at the identity map is
    ``transform_points(chain, identity)``; the inner modules run in the same order, so BatchNorm
    statistics and hooks see the same calls.
    """
    wrappers = _official_wrappers()
    if isinstance(network, wrappers.FunctionFromVectorField):
        field = network.net(moving, fixed)
        if field.dtype in (torch.float16, torch.bfloat16):  # autocast: the fused ops keep float32 maps
            field = field.float()
        return [field]
    if isinstance(network, wrappers.TwoStepRegistration):
        first = network_chain(network.netPhi, moving, fixed)
        warped = gf.warp(moving.to(first[0].dtype), first)
        return first + network_chain(network.netPsi, warped, fixed)
    if isinstance(network, wrappers.DownsampleRegistration):
        return network_chain(network.net, network.avg_pool(moving, 2, ceil_mode=True),
                             network.avg_pool(fixed, 2, ceil_mode=True))
    raise TypeError(f"gradicon_fast.compat.icon reads networks of FunctionFromVectorField, TwoStepRegistration and "
                    f"DownsampleRegistration; got {type(network).__module__}.{type(network).__name__}")


class ChainTransform:
    """A map as the official modules hand it out (``phi(coordinates)``), backed by a chain of fields."""

    def __init__(self, chain: Sequence[Tensor]):
        self.chain = list(chain)

    def __call__(self, coordinates: Tensor) -> Tensor:
        return gf.transform_points(self.chain, coordinates.to(self.chain[0].dtype))


def flips(phi: Tensor) -> Tensor:
    """Folded grid cells of the map ``phi`` per batch element (the official ``flips``: a count, no gradient)."""
    with torch.no_grad():
        return (gf.jacobian_determinant(phi) < 0).sum() / phi.shape[0]


class GradientICONSparse(nn.Module):
    """The sparse GradICON objective with the interface of ``icon_registration.losses.GradientICONSparse``.

    ``GradientICONSparse(network, similarity, lmbda)``; call :meth:`assign_identity_map` with the
    input shape ``(B, C, *S)`` before use. ``forward(image_A, image_B)`` returns :data:`ICONLoss`
    (``flips`` counts the folds of φ_BA, as the official module does) and leaves ``phi_AB``,
    ``phi_BA`` (callables), ``phi_AB_vectorfield``, ``phi_BA_vectorfield``, ``warped_image_A`` and
    ``warped_image_B`` on the module like the official one. ``noise``, when given, replaces the
    penalty's random draw: standard normal values at the kept points, ``(1, d, *points)``.
    """

    def __init__(self, network: nn.Module, similarity, lmbda: float):
        super().__init__()
        self.regis_net = network
        self.lmbda = lmbda
        self.similarity = similarity

    def assign_identity_map(self, input_shape, parents_identity_map=None) -> None:
        """Set the input shape ``(B, C, *S)`` (the batch size is not used) and give the network its own."""
        shape = np.array(input_shape)
        if shape.ndim != 1 or len(shape) not in (4, 5) or np.any(shape[2:] < 2):
            raise ValueError(f"input_shape must be (B, C, *S) with 2 or 3 spatial sizes >= 2, got "
                             f"{tuple(np.atleast_1d(shape).tolist())}")
        shape[0] = 1
        self.input_shape = shape
        self.spacing = 1.0 / (shape[2:] - 1)
        self.register_buffer("identity_map", gf.identity_map(tuple(int(s) for s in shape[2:])), persistent=False)
        if hasattr(self.regis_net, "assign_identity_map"):  # so that the network also works on its own
            self.regis_net.assign_identity_map(input_shape)

    def _check(self, image_A: Tensor, image_B: Tensor) -> tuple:
        if not hasattr(self, "identity_map"):
            raise RuntimeError("call assign_identity_map(input_shape) before using the loss")
        shape = tuple(self.identity_map.shape[2:])
        for name, image in (("image_A", image_A), ("image_B", image_B)):
            if tuple(image.shape[2:]) != shape:
                raise ValueError(f"{name} must have the spatial shape {shape} given to assign_identity_map, got "
                                 f"{tuple(image.shape)}")
        return shape

    def _inbounds_tag(self, image: Tensor) -> Tensor:
        # Interpolating similarities (``isInterpolated``) get a channel that is 1 inside the border, 0 on it.
        tag = torch.zeros((image.shape[0], 1, *image.shape[2:]), dtype=image.dtype, device=image.device)
        tag[(slice(None), slice(None)) + (slice(1, -1),) * (image.ndim - 2)] = 1.0
        return torch.cat([image, tag], dim=1)

    def penalty_noise(self) -> Tensor:
        """The official draw: ``torch.randn`` of the identity map's full shape on the CPU default generator,
        kept at every second grid point."""
        noise = torch.randn(*self.identity_map.shape)
        kept = (slice(None), slice(None)) + (slice(None, None, 2),) * (self.identity_map.ndim - 2)
        return noise[kept].to(self.identity_map.device).contiguous()

    def forward(self, image_A: Tensor, image_B: Tensor, *, noise: Tensor | None = None) -> ICONLoss:
        shape = self._check(image_A, image_B)
        chain_AB = network_chain(self.regis_net, image_A, image_B)
        chain_BA = network_chain(self.regis_net, image_B, image_A)
        self.phi_AB, self.phi_BA = ChainTransform(chain_AB), ChainTransform(chain_BA)
        identity = self.identity_map.to(chain_AB[0].dtype)
        self.phi_AB_vectorfield = gf.transform_points(chain_AB, identity)
        self.phi_BA_vectorfield = gf.transform_points(chain_BA, identity)

        interpolated = getattr(self.similarity, "isInterpolated", False)
        moving_A = self._inbounds_tag(image_A) if interpolated else image_A
        moving_B = self._inbounds_tag(image_B) if interpolated else image_B
        self.warped_image_A = gf.warp(moving_A.to(chain_AB[0].dtype), chain_AB)
        self.warped_image_B = gf.warp(moving_B.to(chain_BA[0].dtype), chain_BA)
        similarity_loss = self.similarity(self.warped_image_A, image_B) + self.similarity(self.warped_image_B, image_A)

        if noise is None:
            noise = self.penalty_noise()
        # Official points: (id + 2·n / W)[::2, ...], W the last spatial size.
        inverse_consistency_loss = gf.gradicon_loss(chain_AB, chain_BA, shape=shape, stride=2,
                                                    noise=noise.to(chain_AB[0].dtype), delta=DELTA,
                                                    noise_scale=2 / shape[-1])
        all_loss = self.lmbda * inverse_consistency_loss + similarity_loss
        transform_magnitude = torch.mean((identity - self.phi_AB_vectorfield) ** 2)
        return ICONLoss(all_loss, inverse_consistency_loss, similarity_loss, transform_magnitude,
                        flips(self.phi_BA_vectorfield))


__all__ = ["ChainTransform", "GradientICONSparse", "ICONLoss", "flips", "network_chain"]
