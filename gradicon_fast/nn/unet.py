"""The "tall U-Net" of the GradICON paper (docs/conventions.md §5), 2D or 3D, any input size.

Encoder (level i, channels C_i → C_{i+1}, one skip kept before each step)::

    x ← Conv(k3, s2, p1)(leaky_relu(x)) + channel_pad(avg_pool2_ceil(x))

Decoder (deepest first, output channels D_i)::

    x ← ConvT(k4, s2, p1)(leaky_relu(x)) + upsample2(x[:, :D_i])
    x ← BatchNorm(x);  x ← crop(x, skip_i);  x ← cat[x, skip_i]

then ``Conv(k3, p1)`` to ``output_channels``, zero-initialised, divided by 10. Leaky-ReLU slope 0.01.
The module and parameter names (``downConvs``, ``upConvs``, ``batchNorms``, ``lastConv``) follow
the published ``tallUNet2`` so that its state dicts load.

Channel padding puts the zeros *before* the existing channels (as the published ``pad_or_crop``
does); ``upsample2`` is (bi/tri)linear with ``align_corners=False``.

Under autocast the whole network runs in the autocast dtype: the input is cast once, and pooling
and upsampling (which CPU autocast would run in float32) keep their input's dtype. Otherwise the
float32 input would turn every residual sum, BatchNorm and concatenation into float32, and only
the convolutions would run in the low precision (twice the activation memory, and casts around
every convolution).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

ENCODER_CHANNELS = (16, 32, 64, 256, 512)
DECODER_CHANNELS = (256, 128, 64, 32, 16)
LEAKY_SLOPE = 0.01


def _pad_or_crop_channels(x: Tensor, channels: int) -> Tensor:
    """``x[:, :channels]``, zero-padded in front to ``channels`` when ``x`` has fewer."""
    y = x[:, :channels]
    missing = channels - y.shape[1]
    if missing > 0:
        pad = y.new_zeros((y.shape[0], missing, *y.shape[2:]))
        y = torch.cat([pad, y], dim=1)
    return y


def _autocast_off(x: Tensor):
    """Autocast disabled for ``x``'s device: the op runs in ``x``'s own dtype."""
    return torch.autocast(x.device.type, enabled=False)


# Low-precision dtypes average-pooled through float32 on the CPU (no avg_pool3d CPU kernel for them).
_POOLED_IN_FLOAT32 = frozenset({torch.bfloat16, torch.float16})


def scaled_channels(channels: Sequence[int], width: float) -> tuple[int, ...]:
    """Channel counts multiplied by ``width`` (rounded, at least 1)."""
    return tuple(max(1, int(round(c * width))) for c in channels)


class TallUNet(nn.Module):
    """The tall U-Net: ``forward(x)`` with ``x`` (B, input_channels, *S) → (B, output_channels, *S).

    ``encoder_channels`` / ``decoder_channels`` default to the paper's (16, 32, 64, 256, 512) /
    (256, 128, 64, 32, 16), listed top-down for the encoder and bottom-up for the decoder; they
    must have the same length (the number of levels).
    """

    def __init__(self, dimension: int, input_channels: int = 2, output_channels: int | None = None, *,
                 encoder_channels: Sequence[int] = ENCODER_CHANNELS,
                 decoder_channels: Sequence[int] = DECODER_CHANNELS):
        super().__init__()
        if dimension not in (2, 3):
            raise ValueError(f"dimension must be 2 or 3, got {dimension}")
        if len(encoder_channels) != len(decoder_channels) or not encoder_channels:
            raise ValueError("encoder_channels and decoder_channels must be non-empty and of equal length, got "
                             f"{tuple(encoder_channels)} and {tuple(decoder_channels)}")
        self.dimension = dimension
        self.num_layers = len(encoder_channels)
        self.input_channels = input_channels
        self.output_channels = dimension if output_channels is None else output_channels
        self.encoder_channels = tuple(int(c) for c in encoder_channels)
        self.decoder_channels = tuple(int(c) for c in decoder_channels)
        Conv = nn.Conv2d if dimension == 2 else nn.Conv3d
        ConvT = nn.ConvTranspose2d if dimension == 2 else nn.ConvTranspose3d
        BatchNorm = nn.BatchNorm2d if dimension == 2 else nn.BatchNorm3d
        self._interpolate_mode = "bilinear" if dimension == 2 else "trilinear"

        down = (input_channels,) + self.encoder_channels  # channels at each encoder level
        # Indexed by depth (0 = full resolution): decoder output channels and input channels.
        up_out = tuple(reversed(self.decoder_channels))
        up_in = tuple(down[i + 1] + (up_out[i + 1] if i + 1 < self.num_layers else 0)
                      for i in range(self.num_layers))
        self.downConvs = nn.ModuleList(
            [Conv(down[i], down[i + 1], kernel_size=3, stride=2, padding=1) for i in range(self.num_layers)])
        self.upConvs = nn.ModuleList(
            [ConvT(up_in[i], up_out[i], kernel_size=4, stride=2, padding=1) for i in range(self.num_layers)])
        self.batchNorms = nn.ModuleList([BatchNorm(up_out[i]) for i in range(self.num_layers)])
        self.lastConv = Conv(up_out[0] + input_channels, self.output_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    def _avg_pool(self, x: Tensor) -> Tensor:
        # An axis of size 1 pools with a window of 1 (the published code needs every axis >= 2).
        pool = F.avg_pool2d if self.dimension == 2 else F.avg_pool3d
        kernel = tuple(min(2, s) for s in x.shape[2:])
        with _autocast_off(x):
            if x.device.type == "cpu" and x.dtype in _POOLED_IN_FLOAT32:
                # no CPU kernel for these dtypes; the mean of 2^d values is rounded once
                return pool(x.float(), kernel, stride=2, ceil_mode=True).to(x.dtype)
            return pool(x, kernel, stride=2, ceil_mode=True)

    @staticmethod
    def _down_convolution(conv: nn.Module, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.shape[-1] == 1 and torch.is_autocast_enabled("cpu"):
            # oneDNN's low-precision weight gradient of a strided convolution over an input one voxel
            # long on its last axis holds garbage (NaN, or finite values up to 1e37, changing from pass
            # to pass) in the taps that see only padding; such inputs are tiny: float32.
            with _autocast_off(x):
                return conv(x.float()).to(x.dtype)
        return conv(x)

    def _upsample2(self, x: Tensor) -> Tensor:
        with _autocast_off(x):
            return self._upsample2_in_dtype(x)

    def _upsample2_in_dtype(self, x: Tensor) -> Tensor:
        if all(s == 1 for s in x.shape[2:]):
            # One voxel: (bi/tri)linear upsampling (align_corners=False) copies it (interpolate
            # computes 0.75·v + 0.25·v: equal up to one rounding). Written as a copy because
            # Inductor's CPU code for the interpolation's backward (a scatter-add into channels-last
            # 1-voxel tensors) fails to generate (torch 2.13).
            return x.expand(*x.shape[:2], *([2] * (x.ndim - 2))).contiguous()
        return F.interpolate(x, scale_factor=2, mode=self._interpolate_mode, align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != self.dimension + 2 or x.shape[1] != self.input_channels:
            raise ValueError(f"TallUNet expects (B, {self.input_channels}, *spatial) with {self.dimension} spatial "
                             f"axes, got shape {tuple(x.shape)}")
        if torch.compiler.is_compiling():
            # Compile for the spatial sizes at hand, never symbolic ones: Inductor's CPU lowering of
            # strided 3-D convolutions fails on symbolic sizes (torch 2.13: "ValueRangeError: Invalid
            # ranges"), which dynamic=True, or one U-Net compiled for several sizes, would produce.
            for axis in range(2, x.ndim):
                torch._dynamo.mark_static(x, axis)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        skips = []
        for depth in range(self.num_layers):
            skips.append(x)
            y = self._down_convolution(self.downConvs[depth], F.leaky_relu(x, LEAKY_SLOPE))
            x = y + _pad_or_crop_channels(self._avg_pool(x), y.shape[1])
        for depth in reversed(range(self.num_layers)):
            y = self.upConvs[depth](F.leaky_relu(x, LEAKY_SLOPE))
            x = y + self._upsample2(_pad_or_crop_channels(x, y.shape[1]))
            x = self.batchNorms[depth](x)
            skip = skips[depth]
            x = x[(slice(None), slice(None)) + tuple(slice(0, s) for s in skip.shape[2:])]
            x = torch.cat([x, skip], dim=1)
        return self.lastConv(x) / 10
