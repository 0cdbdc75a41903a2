"""Pure-PyTorch reference of SPEC.md: the oracle for every kernel, and the fallback backend.

Written from the spec on top of ``torch.nn.functional.grid_sample`` and independent of the
kernels. Nothing here validates its inputs: the public functions in ``functional.py`` do that
before they get here. Shapes: maps and displacement fields are ``(B, d, *S)`` with channel k the
coordinate along spatial axis k, in [0, 1] per axis (align-corners); chains are lists of
displacement fields, outermost first (the last field is applied first).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# Coordinates and sampling (SPEC §1)
# --------------------------------------------------------------------------------------------


def axis_coordinates(size: int, *, dtype=torch.float32, device=None) -> Tensor:
    """``i / (size - 1)`` for i in [0, size), computed in float64 and rounded once; [0] if size is 1."""
    if size == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return (torch.arange(size, dtype=torch.float64, device=device) / (size - 1)).to(dtype)


def identity_map(shape: Sequence[int], *, dtype=torch.float32, device=None) -> Tensor:
    """The identity map of spatial shape ``shape``: ``(1, d, *shape)``."""
    axes = [axis_coordinates(int(s), dtype=dtype, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _broadcast_batch(*sizes: int) -> int:
    return max(sizes)


def sample(field: Tensor, coords: Tensor, *, mode: str = "bilinear") -> Tensor:
    """Interpolate ``field`` (B|1, C, *S_F) at ``coords`` (B|1, d, *P) in [0, 1] units.

    Border-clamped (bi/tri)linear interpolation in align-corners convention: SPEC §1. The output is
    ``(B, C, *P)``. ``mode="nearest"`` is for label maps.
    """
    d = coords.shape[1]
    if d not in (2, 3):
        raise ValueError(f"sample: coordinates must have 2 or 3 channels, got {d}")
    batch = _broadcast_batch(field.shape[0], coords.shape[0])
    points_shape = coords.shape[2:]
    # grid_sample wants (B, *grid, d) in [-1, 1] with the last spatial axis first; any point
    # layout goes through as a (N, 1[, 1]) grid.
    grid = (2 * coords.reshape(coords.shape[0], d, -1) - 1).movedim(1, -1).flip(-1)
    grid = grid.reshape(grid.shape[0], -1, *([1] * (d - 1)), d).expand(batch, -1, *([1] * (d - 1)), d)
    field = field.expand(batch, *field.shape[1:])
    out = F.grid_sample(field, grid, mode=mode, padding_mode="border", align_corners=True)
    return out.reshape(batch, field.shape[1], *points_shape)


def transform_points(chain: Sequence[Tensor], points: Tensor) -> Tensor:
    """φ = Φ_1∘…∘Φ_K at ``points``: ``y = x; for D in reversed(chain): y = y + sample(D, y)``."""
    y = points
    for field in reversed(chain):
        y = y + sample(field, y)
    return y


def compose(chain: Sequence[Tensor], shape: Sequence[int]) -> Tensor:
    """The chain materialised as one displacement field on grid ``shape``: ``φ(id) - id``."""
    identity = identity_map(shape, dtype=chain[0].dtype, device=chain[0].device)
    return transform_points(chain, identity) - identity


def _poison_non_finite(values: Tensor, coords: Tensor) -> Tensor:
    # grid_sample quietly samples the border at a NaN coordinate; a map that is not finite must
    # give a warped image that is not finite either. 0 * inf and 0 * nan are nan, 0 * x is 0.
    return values + 0 * coords.sum(dim=1, keepdim=True)


def warp(image: Tensor, chain: Sequence[Tensor], shape: Sequence[int] | None = None,
         *, mode: str = "bilinear") -> Tensor:
    """``image ∘ φ`` on the grid ``shape`` (default: the image's own grid)."""
    shape = tuple(image.shape[2:]) if shape is None else tuple(shape)
    coords = transform_points(chain, identity_map(shape, dtype=chain[0].dtype, device=image.device))
    return _poison_non_finite(sample(image, coords, mode=mode), coords)


# --------------------------------------------------------------------------------------------
# Inverse-consistency penalties (SPEC §2)
# --------------------------------------------------------------------------------------------


def loss_points(shape: Sequence[int], stride: int, noise: Tensor, noise_scale: float) -> Tensor:
    """``id[..., ::stride, ...] + noise_scale * noise``: the points a penalty is taken at."""
    identity = identity_map(shape, dtype=noise.dtype, device=noise.device)
    kept = identity[(slice(None), slice(None)) + (slice(None, None, stride),) * len(shape)]
    return kept + noise_scale * noise


def loss_points_shape(shape: Sequence[int], stride: int) -> tuple[int, ...]:
    """Spatial shape of ``id[..., ::stride, ...]``."""
    return tuple((int(s) + stride - 1) // stride for s in shape)


def _gradicon_one_direction(outer: Sequence[Tensor], inner: Sequence[Tensor], points: Tensor,
                            delta: float) -> Tensor:
    # e(x) = x - φ_outer(φ_inner(x)); the outer chain's fields are outermost.
    chain = list(outer) + list(inner)
    d = points.shape[1]
    error = points - transform_points(chain, points)
    total = points.new_zeros(())
    for k in range(d):
        step = torch.zeros(d, dtype=points.dtype, device=points.device)
        step[k] = delta
        shifted = points + step.view(1, d, *([1] * d))
        error_k = shifted - transform_points(chain, shifted)
        total = total + torch.mean(((error - error_k) / delta) ** 2)
    return total


def gradicon_loss(chain_ab: Sequence[Tensor], chain_ba: Sequence[Tensor], *, shape: Sequence[int],
                  noise: Tensor, stride: int = 1, delta: float = 1e-3, noise_scale: float | None = None,
                  symmetric: bool = False) -> Tensor:
    """Finite-difference GradICON: Σ_k mean(((e(Iε) - e(Iε + δ ê_k)) / δ)²), e(x) = x - φ_AB(φ_BA(x))."""
    if noise_scale is None:
        noise_scale = stride / shape[-1]
    points = loss_points(shape, stride, noise, noise_scale)
    loss = _gradicon_one_direction(chain_ab, chain_ba, points, delta)
    if symmetric:
        loss = loss + _gradicon_one_direction(chain_ba, chain_ab, points, delta)
    return loss


def icon_loss(chain_ab: Sequence[Tensor], chain_ba: Sequence[Tensor], *, shape: Sequence[int],
              noise: Tensor, noise_scale: float | None = None) -> Tensor:
    """ICON: mean((Iε - φ_AB(φ_BA(Iε)))²) + mean((Iε - φ_BA(φ_AB(Iε)))²)."""
    if noise_scale is None:
        noise_scale = 1 / shape[-1]
    points = loss_points(shape, 1, noise, noise_scale)
    ab_ba = transform_points(list(chain_ab) + list(chain_ba), points)
    ba_ab = transform_points(list(chain_ba) + list(chain_ab), points)
    return torch.mean((points - ab_ba) ** 2) + torch.mean((points - ba_ab) ** 2)


# --------------------------------------------------------------------------------------------
# Folding and smoothness baselines (SPEC §2, §4)
# --------------------------------------------------------------------------------------------


def _forward_differences(phi: Tensor) -> list[Tensor]:
    """Forward differences of ``phi`` along each spatial axis, all cropped to ``S - 1``."""
    d = phi.ndim - 2
    base = (slice(None), slice(None)) + (slice(None, -1),) * d
    diffs = []
    for k in range(d):
        ahead = list(base)
        ahead[2 + k] = slice(1, None)
        diffs.append(phi[tuple(ahead)] - phi[base])
    return diffs


def cell_volumes(phi: Tensor) -> Tensor:
    """Signed volume (area in 2D) of each grid cell under the map ``phi``: SPEC §4's dV or dA."""
    d = phi.ndim - 2
    if d == 3:
        a, b, c = _forward_differences(phi)
        return (torch.linalg.cross(a, b, dim=1) * c).sum(dim=1)
    du, dv = _forward_differences(phi)
    return du[:, 0] * dv[:, 1] - du[:, 1] * dv[:, 0]


def jacobian_determinant(phi: Tensor) -> Tensor:
    """Jacobian determinant of a map per grid cell, (B, *(S - 1)), 1 for the identity."""
    scale = 1.0
    for size in phi.shape[2:]:
        scale *= size - 1
    return cell_volumes(phi) * scale


def fold_percentage(phi: Tensor) -> Tensor:
    """Percentage of grid cells whose signed volume under ``phi`` is negative (the paper's %|J|)."""
    return (cell_volumes(phi) < 0).double().mean() * 100


def _central_derivative(u: Tensor, axis: int) -> Tensor:
    """Central first difference along spatial ``axis`` in [0, 1] units, over all of ``u``'s interior."""
    size = u.shape[2 + axis]
    ahead = u.narrow(2 + axis, 2, size - 2)
    behind = u.narrow(2 + axis, 0, size - 2)
    return (ahead - behind) * ((size - 1) / 2)


def _interior(u: Tensor, trim: Sequence[int]) -> Tensor:
    for axis, t in enumerate(trim):
        if t:
            u = u.narrow(2 + axis, t, u.shape[2 + axis] - 2 * t)
    return u


def diffusion_energy(phi: Tensor) -> Tensor:
    """``mean ‖∇(φ - id)‖²``: central differences in [0, 1] units over the interior voxels."""
    d = phi.ndim - 2
    u = phi - identity_map(phi.shape[2:], dtype=phi.dtype, device=phi.device)
    total = 0
    for k in range(d):
        trim = [1] * d
        du = _central_derivative(u, k)
        trim[k] = 0
        total = total + (_interior(du, trim) ** 2).sum(dim=1)
    return total.mean()


def bending_energy(phi: Tensor) -> Tensor:
    """``mean Σ_i ‖∇²(φ - id)_i‖²``: all second derivatives by central differences, interior voxels."""
    d = phi.ndim - 2
    u = phi - identity_map(phi.shape[2:], dtype=phi.dtype, device=phi.device)
    total = 0
    for k in range(d):
        for j in range(d):
            if j == k:
                size = u.shape[2 + k]
                second = (u.narrow(2 + k, 2, size - 2) - 2 * u.narrow(2 + k, 1, size - 2)
                          + u.narrow(2 + k, 0, size - 2)) * (size - 1) ** 2
                trim = [1] * d
                trim[k] = 0
            else:
                second = _central_derivative(_central_derivative(u, k), j)
                trim = [1] * d
                trim[k] = trim[j] = 0
            total = total + (_interior(second, trim) ** 2).sum(dim=1)
    return total.mean()
