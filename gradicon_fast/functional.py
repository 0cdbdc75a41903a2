"""The public functions of gradicon_fast: checked arguments, then the chosen backend.

Conventions (docs/conventions.md §1): maps and displacement fields are ``(B, d, *S)``, channel k the coordinate
along spatial axis k, in [0, 1] (align-corners); a chain is a list of displacement fields,
outermost first, standing for φ = Φ_1∘…∘Φ_K with Φ_D(x) = x + sample(D, x).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _validation as V
from . import backend_registry as _backends
from . import penalty_noise as _noise
from . import reference as _ref

Tensor = torch.Tensor


def _impl(backend: str, dtype: torch.dtype | None = None):
    """Module with transform_points/warp/gradicon_loss/icon_loss for a concrete fused backend."""
    if backend == "cpu" and dtype not in (None, torch.float32, torch.float64):
        raise TypeError(f"backend 'cpu' computes in float32 or float64, but the fields are {dtype}; "
                        "convert them (e.g. .float()) or use backend='torch'")
    return _backends.fused_ops(backend)


def identity_map(shape: Sequence[int], *, dtype=torch.float32, device=None) -> Tensor:
    """The identity map ``(1, d, *shape)``: ``id[k][i] = i_k / (shape[k] - 1)``."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) not in (2, 3):
        raise ValueError(f"shape must be a tuple of 2 or 3 ints, got {shape!r}")
    shape = V.check_shape("shape", shape, len(shape))
    return _ref.identity_map(shape, dtype=dtype, device=device)


def transform_points(chain: Sequence[Tensor], points: Tensor, *, backend: str | None = None) -> Tensor:
    """φ = Φ_1∘…∘Φ_K evaluated at ``points`` (B|1, d, *P); returns (B, d, *P)."""
    d, batch = V.check_chain("chain", chain)
    V.check_points(points, d, "chain", chain[0])
    V.merge_batch(batch, points.shape[0], "points")
    name = _backends.resolve(backend, points.device)
    if name == "torch":
        return _ref.transform_points(list(chain), points)
    return _impl(name, chain[0].dtype).transform_points(chain, points)


def compose(chain: Sequence[Tensor], shape: Sequence[int], *, backend: str | None = None) -> Tensor:
    """The chain materialised as one displacement field on grid ``shape``: ``φ(id) - id``, (B, d, *shape)."""
    d, _ = V.check_chain("chain", chain)
    shape = V.check_shape("shape", shape, d)
    identity = _ref.identity_map(shape, dtype=chain[0].dtype, device=chain[0].device)
    return transform_points(chain, identity, backend=backend) - identity


def warp(image: Tensor, chain: Sequence[Tensor], *, shape: Sequence[int] | None = None, mode: str = "bilinear",
         backend: str | None = None) -> Tensor:
    """``image ∘ φ``: the image sampled at φ(x) for every x of grid ``shape`` (default: the image's own).

    ``mode="bilinear"`` is (tri)linear and differentiable; ``mode="nearest"`` is for label maps.
    """
    d, batch = V.check_chain("chain", chain)
    V.check_float_tensor("image", image)
    if image.ndim != d + 2:
        missing = " (the batch dimension is missing: add it with image[None])" if image.ndim == d + 1 else ""
        raise ValueError(f"image must be (B, C, *spatial) with {d} spatial axes like the chain, got shape "
                         f"{tuple(image.shape)}{missing}")
    V.check_same_device_dtype("image", image, "chain[0]", chain[0])
    V.merge_batch(batch, image.shape[0], "image")
    shape = tuple(image.shape[2:]) if shape is None else V.check_shape("shape", shape, d)
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    name = _backends.resolve(backend, image.device)
    if mode == "nearest":
        identity = _ref.identity_map(shape, dtype=chain[0].dtype, device=image.device)
        coords = transform_points(chain, identity, backend=name)
        return _ref._poison_non_finite(_ref.sample(image, coords, mode="nearest"), coords)
    if name == "torch":
        return _ref.warp(image, list(chain), shape)
    return _impl(name, chain[0].dtype).warp(image, chain, shape)


def _penalty_noise(noise, generator, d, points_shape, ref: Tensor, backend: str):
    """(noise, seed): the reference draws torch.randn noise; fused kernels draw their own from a seed.

    Under torch.compile the same noise is drawn by an op of the graph, and passed explicitly.
    """
    if noise is not None:
        return noise, 0
    if torch.compiler.is_compiling():
        return _noise.compiled_noise(generator, backend, d, points_shape, ref), 0
    if backend == "torch":
        return _noise.randn_noise(generator, (1, d, *points_shape), ref.dtype, ref.device), 0
    return None, _noise.draw_seed(generator)


def gradicon_loss(chain_AB: Sequence[Tensor], chain_BA: Sequence[Tensor], *, shape: Sequence[int], stride: int = 1,
                  noise: Tensor | None = None, generator: torch.Generator | None = None, delta: float = 1e-3,
                  noise_scale: float | None = None, symmetric: bool = False, mode: str = "fd",
                  backend: str | None = None) -> Tensor:
    """The GradICON penalty of the pair (docs/conventions.md §2), a scalar.

    ``shape`` is the grid the loss is taken on; ``stride=2`` is the paper's sparse variant.
    ``noise`` (1, d, *points_shape), when given, is the standard-normal perturbation (scaled by
    ``noise_scale``, default ``stride / shape[-1]``); otherwise it is drawn from ``generator``.
    ``symmetric`` adds the φ_BA∘φ_AB term. ``mode="fd"`` is the published finite-difference
    penalty (step ``delta``); ``mode="analytic"`` uses the exact chain-rule Jacobian J of the
    piecewise (tri)linear maps instead, ``Σ ‖J - I‖_F² / (B·d·N)`` (``delta`` is not used).
    """
    d, batch = V.check_pair(chain_AB, chain_BA)
    shape = V.check_shape("shape", shape, d)
    stride = V.check_stride(stride)
    delta = V.check_positive("delta", delta)
    if mode not in ("fd", "analytic"):
        raise ValueError(f"mode must be 'fd' or 'analytic', got {mode!r}")
    points_shape = _ref.loss_points_shape(shape, stride)
    V.check_noise(noise, d, points_shape, chain_AB[0])
    noise_scale = stride / shape[-1] if noise_scale is None else float(noise_scale)
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    name = _backends.resolve(backend, chain_AB[0].device)
    noise, seed = _penalty_noise(noise, generator, d, points_shape, chain_AB[0], name)
    if mode == "analytic":
        if name == "torch":
            return _ref.gradicon_loss_analytic(list(chain_AB), list(chain_BA), shape=shape, stride=stride,
                                               noise=noise, noise_scale=noise_scale, symmetric=symmetric)
        impl = _impl(name, chain_AB[0].dtype)
        loss = impl.gradicon_analytic_loss(chain_AB, chain_BA, shape, stride, noise, seed, noise_scale)
        if symmetric:
            loss = loss + impl.gradicon_analytic_loss(chain_BA, chain_AB, shape, stride, noise, seed, noise_scale)
        return loss
    if name == "torch":
        return _ref.gradicon_loss(list(chain_AB), list(chain_BA), shape=shape, stride=stride, noise=noise,
                                  delta=delta, noise_scale=noise_scale, symmetric=symmetric)
    impl = _impl(name, chain_AB[0].dtype)
    loss = impl.gradicon_loss(chain_AB, chain_BA, shape, stride, noise, seed, delta, noise_scale)
    if symmetric:
        loss = loss + impl.gradicon_loss(chain_BA, chain_AB, shape, stride, noise, seed, delta, noise_scale)
    return loss


def icon_loss(chain_AB: Sequence[Tensor], chain_BA: Sequence[Tensor], *, shape: Sequence[int],
              noise: Tensor | None = None, generator: torch.Generator | None = None,
              noise_scale: float | None = None, backend: str | None = None) -> Tensor:
    """The ICON penalty of the pair, both directions (docs/conventions.md §2), a scalar."""
    d, batch = V.check_pair(chain_AB, chain_BA)
    shape = V.check_shape("shape", shape, d)
    V.check_noise(noise, d, shape, chain_AB[0])
    noise_scale = 1 / shape[-1] if noise_scale is None else float(noise_scale)
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    name = _backends.resolve(backend, chain_AB[0].device)
    noise, seed = _penalty_noise(noise, generator, d, shape, chain_AB[0], name)
    if name == "torch":
        return _ref.icon_loss(list(chain_AB), list(chain_BA), shape=shape, noise=noise, noise_scale=noise_scale)
    return _impl(name, chain_AB[0].dtype).icon_loss(chain_AB, chain_BA, shape, noise, seed, noise_scale)


def _map_measure(measure, doc: str):
    """The public form of the reference's measure of a map: ``phi`` checked first."""

    def checked(phi: Tensor) -> Tensor:
        V.check_map("phi", phi)
        return measure(phi)

    checked.__name__ = checked.__qualname__ = measure.__name__
    checked.__doc__ = doc
    return checked


jacobian_determinant = _map_measure(
    _ref.jacobian_determinant,
    "Jacobian determinant of map ``phi`` per grid cell (forward differences), (B, *(S - 1)); 1 for the identity.")
fold_percentage = _map_measure(
    _ref.fold_percentage, "Percentage of grid cells the map ``phi`` folds (negative signed volume): the paper's %|J|.")
diffusion_energy = _map_measure(
    _ref.diffusion_energy, "Diffusion regulariser ``mean ‖∇(φ - id)‖²`` of map ``phi`` (central differences).")
bending_energy = _map_measure(
    _ref.bending_energy, "Bending energy ``mean Σ ‖∇²(φ - id)_i‖²`` of map ``phi`` (central differences).")
