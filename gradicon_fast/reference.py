"""Pure-PyTorch reference of the conventions in docs/conventions.md: the oracle for every kernel, and the fallback backend.

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

from .reduction import fixed_order_mean

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# Coordinates and sampling (docs/conventions.md §1)
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

    Border-clamped (bi/tri)linear interpolation in align-corners convention: docs/conventions.md §1. The output is
    ``(B, C, *P)``. ``mode="nearest"`` is for label maps.
    """
    d = coords.shape[1]
    if d not in (2, 3):
        raise ValueError(f"sample: coordinates must have 2 or 3 channels, got {d}")
    batch = _broadcast_batch(field.shape[0], coords.shape[0])
    points_shape = coords.shape[2:]
    # grid_sample wants (B, *grid, d) in [-1, 1] with the last spatial axis first; any point
    # layout goes through as a (N, 1[, 1]) grid.
    # A NaN coordinate crashes grid_sample's CPU backward (torch 2.13): sample a finite stand-in
    # instead (any value outside [0, 1] clamps). The callers keep the NaN: a chain adds the
    # coordinates to the sample, and warp poisons its output.
    coords = torch.nan_to_num(coords, nan=0.0, posinf=2.0, neginf=-1.0)
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
# Inverse-consistency penalties (docs/conventions.md §2)
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
# Folding and smoothness baselines (docs/conventions.md §2, §4)
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
    """Signed volume (area in 2D) of each grid cell under the map ``phi``: docs/conventions.md §4's dV or dA.

    As in the published code, the 3D edge vectors meet at each cell's last corner and the 2D ones
    at its first.
    """
    if phi.ndim - 2 == 3:
        last = phi[:, :, 1:, 1:, 1:]
        a = last - phi[:, :, :-1, 1:, 1:]
        b = last - phi[:, :, 1:, :-1, 1:]
        c = last - phi[:, :, 1:, 1:, :-1]
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
    return fixed_order_mean(total)  # the same bits for any thread count (gradicon_fast/reduction.py)


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


# --------------------------------------------------------------------------------------------
# Analytic GradICON (docs/conventions.md §2): the exact chain-rule Jacobian of the piecewise (tri)linear maps
# --------------------------------------------------------------------------------------------
#
# The interpolant is written out explicitly here (a gather of the 2^d cell corners with computed
# weights) instead of going through grid_sample, whose backward is not differentiable: the
# penalty's gradient needs the derivative of the interpolant's gradient, i.e. its mixed second
# derivatives. Conventions are those of ``sample`` (border clamp, align-corners); the derivative
# of the clamped index is size - 1 strictly inside and 0 where the index is clamped (p <= 0 or
# p >= size - 1), as in grid_sample's backward.


def _axis_cell(x: Tensor, size: int):
    """Per axis: lower and upper corner indices, position in the cell (differentiable) and d(index)/dx."""
    hi = size - 1
    p = x * hi
    inside = (p > 0) & (p < hi)
    # Gradient only strictly inside, as grid_sample's clamp (torch.clamp's passes it at the border).
    clamped = torch.where(inside, p, p.detach().clamp(0, hi))
    lower = torch.floor(clamped.detach()).clamp(max=max(hi - 1, 0))
    frac = clamped - lower
    lower = lower.long()
    upper = (lower + 1).clamp(max=hi)
    dpdx = inside.to(x.dtype) * hi
    return lower, upper, frac, dpdx


def sample_with_gradient(field: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
    """The explicit interpolant: ``sample(field, coords)`` and its gradient with respect to the coordinates.

    ``field`` (B|1, C, *S_F), ``coords`` (B|1, d, *P). Returns values (B, C, *P) and gradient
    (B, C, d, *P) with ``gradient[:, c, k] = ∂ sample_c / ∂x_k``. Both are polynomials in the
    coordinates within a cell, built from gathered corner values, so autograd differentiates them
    (again) exactly.
    """
    d = coords.shape[1]
    batch = _broadcast_batch(field.shape[0], coords.shape[0])
    sizes = field.shape[2:]
    channels = field.shape[1]
    points_shape = coords.shape[2:]
    flat = coords.reshape(coords.shape[0], d, -1).expand(batch, d, -1)
    n = flat.shape[-1]
    cells = [_axis_cell(flat[:, k], int(sizes[k])) for k in range(d)]
    strides = [1] * d
    for k in range(d - 2, -1, -1):
        strides[k] = strides[k + 1] * int(sizes[k + 1])
    values_flat = field.reshape(field.shape[0], channels, -1).expand(batch, channels, -1)
    value = 0
    gradient = [0] * d
    for corner in range(1 << d):
        upper = [(corner >> (d - 1 - k)) & 1 for k in range(d)]
        index = 0
        factors, slopes = [], []
        for k, (lo, up, frac, dpdx) in enumerate(cells):
            index = index + (up if upper[k] else lo) * strides[k]
            factors.append(frac if upper[k] else 1 - frac)
            slopes.append(dpdx if upper[k] else -dpdx)
        corner_values = torch.gather(values_flat, 2, index.unsqueeze(1).expand(batch, channels, n))
        weight = factors[0]
        for f in factors[1:]:
            weight = weight * f
        value = value + corner_values * weight.unsqueeze(1)
        for k in range(d):
            w_k = slopes[k]
            for i in range(d):
                if i != k:
                    w_k = w_k * factors[i]
            gradient[k] = gradient[k] + corner_values * w_k.unsqueeze(1)
    value = value.reshape(batch, channels, *points_shape)
    gradient = torch.stack(gradient, dim=2).reshape(batch, channels, d, *points_shape)
    return value, gradient


def _chain_deviation(chain: Sequence[Tensor], points: Tensor) -> Tensor:
    """``J - I`` of the chain at ``points``, (B, d, d, *P), accumulated as a deviation from I.

    Field j (applied at y_j) maps the deviation M to ``G + M + G M`` with ``G = ∇s_j(y_j)``, which
    equals ``(I + G)(I + M) - I`` without the cancellation of forming ``J`` first.
    """
    d = points.shape[1]
    y = points
    deviation = None
    for field in reversed(chain):
        s, grad = sample_with_gradient(field, y)
        if deviation is None:
            deviation = grad
        else:
            deviation = grad + deviation + torch.einsum("bik...,bkj...->bij...", grad, deviation)
        y = y + s
    assert deviation.shape[1:3] == (d, d)
    return deviation


def chain_jacobian(chain: Sequence[Tensor], points: Tensor) -> Tensor:
    """Jacobian of φ = Φ_1∘…∘Φ_K at ``points`` (B|1, d, *P): (B, d, d, *P), ``J[:, i, j] = ∂φ_i/∂x_j``.

    The exact chain rule of the piecewise (tri)linear maps: ``Π (I + ∇s_j(y_j))`` over the fields
    in application order (the outermost field's factor leftmost).
    """
    d = points.shape[1]
    eye = torch.eye(d, dtype=points.dtype, device=points.device).view(1, d, d, *([1] * (points.ndim - 2)))
    return _chain_deviation(chain, points) + eye


def _gradicon_analytic_one_direction(outer: Sequence[Tensor], inner: Sequence[Tensor], points: Tensor) -> Tensor:
    deviation = _chain_deviation(list(outer) + list(inner), points)
    # Σ_k mean over (batch × d channels × points) of ((J - I) e_k)², i.e. Σ ‖J - I‖_F² / (B·d·N)
    return (deviation ** 2).sum(dim=2).mean()


def gradicon_loss_analytic(chain_ab: Sequence[Tensor], chain_ba: Sequence[Tensor], *, shape: Sequence[int],
                           noise: Tensor, stride: int = 1, noise_scale: float | None = None,
                           symmetric: bool = False) -> Tensor:
    """Analytic GradICON: ``(1 / (B·d·N)) Σ ‖J - I‖_F²`` with J the exact Jacobian of φ_AB∘φ_BA.

    The same points as ``gradicon_loss``; the δ → 0 limit of the finite-difference penalty.
    """
    if noise_scale is None:
        noise_scale = stride / shape[-1]
    points = loss_points(shape, stride, noise, noise_scale)
    loss = _gradicon_analytic_one_direction(chain_ab, chain_ba, points)
    if symmetric:
        loss = loss + _gradicon_analytic_one_direction(chain_ba, chain_ab, points)
    return loss
