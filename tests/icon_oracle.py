"""The official ``icon_registration`` package as the oracle: its standard networks with random weights.

Imported by the tests that compare with it; they skip when the package is not installed
(``make setup`` installs it as a test dependency).
"""

from __future__ import annotations

import pytest
import torch

icon = pytest.importorskip("icon_registration")
from icon_registration import losses as icon_losses  # noqa: E402
from icon_registration import networks as icon_networks  # noqa: E402

# The official tall U-Net pools every axis five times below the network's quarter resolution and
# cannot pool an axis of 1: 3D shapes need every size >= 65 (2D pooling tolerates smaller ones).
SHAPE_2D = (20, 28)
SHAPE_3D = (65, 72, 68)


def official_network(dimension: int, steps: int = 4) -> torch.nn.Module:
    """The published ``regis_net``: TwoStep(TwoStep(Down(TwoStep(Down(U1), U2)), U3), U4); 3 steps without U4."""
    def step():
        return icon.FunctionFromVectorField(icon_networks.tallUNet2(dimension=dimension))

    net = step()
    for _ in range(2):
        net = icon.TwoStepRegistration(icon.DownsampleRegistration(net, dimension=dimension), step())
    if steps == 4:
        net = icon.TwoStepRegistration(net, step())
    return net


def randomize(network: torch.nn.Module, seed: int, *, scale: float = 2e-3) -> torch.nn.Module:
    """Non-zero last layers (the official U-Net zero-initialises them) and BatchNorm statistics away from
    0 and 1, so that every step moves points and eval mode differs from train mode. ``scale`` keeps the
    maps smooth (displacements of a few thousandths): float32 maps then agree to rounding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in network.named_modules():
            if name.endswith("lastConv"):
                module.weight.copy_(scale * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(scale * torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(1 + 0.5 * torch.rand(module.running_var.shape, generator=gen))
    return network


def official_loss(network: torch.nn.Module, shape, *, sigma: int = 5, lmbda: float = 1.5):
    """``icon_registration.losses.GradientICONSparse`` around ``network`` with LNCC(σ), set up for ``shape``."""
    loss = icon_losses.GradientICONSparse(network, icon_losses.LNCC(sigma=sigma), lmbda=lmbda)
    loss.assign_identity_map((1, 1) + tuple(shape))
    return loss


def official_noise(shape, seed: int) -> torch.Tensor:
    """The standard-normal values the official sparse penalty draws after ``torch.manual_seed(seed)``,
    at the points it keeps: (1, d, *points)."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn((1, len(shape), *shape), generator=gen)
    return full[(slice(None), slice(None)) + (slice(None, None, 2),) * len(shape)].contiguous()


def image_pair(shape, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two smooth random images in [0, 1] (blurred noise), (batch, 1, *shape)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.nn.functional.avg_pool2d if len(shape) == 2 else torch.nn.functional.avg_pool3d
    images = []
    for _ in range(2):
        noise = torch.rand((batch, 1, *shape), generator=gen)
        images.append(pool(noise, 5, stride=1, padding=2, count_include_pad=False))
    return images[0], images[1]
