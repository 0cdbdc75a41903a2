"""Converters between gradicon_fast's chains and the transform conventions of other frameworks.

gradicon_fast (docs/conventions.md §1): a displacement field ``D`` is ``(B, d, *S)``, channel k the
displacement along array axis k in [0, 1] units of the field of view (``index = x · (S - 1)``,
align-corners), sampled with border clamping; a chain is a list of such fields, outermost first.
The converters go both ways (velocities: to a chain only):

- **voxel displacements** (VoxelMorph's ``SpatialTransformer``, MONAI's ``Warp``): ``flow``
  ``(B, d, *S)``, channel k in voxels along array axis k, ``warped(p) = moving(p + flow(p))`` on
  the flow's own grid: ``D = flow / (S - 1)``;
- **stationary velocities** in voxels (VoxelMorph's ``IntegrateVelocityField``/``integrate_vec``,
  MONAI's ``DVF2DDF``), integrated by scaling and squaring into one displacement;
- **``grid_sample`` grids** ``(B, *S_out, d)`` in [-1, 1], component 0 along the *last* spatial
  axis, with ``align_corners`` either way;
- **ITK/ANTs physical fields** (LPS millimetres on an image grid): :class:`gradicon_fast.io.DisplacementField`.

docs/own_training_code.md shows them at work in a training loop.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _validation as V
from . import functional as _functional
from . import reference as _ref

Tensor = torch.Tensor

__all__ = ["from_grid", "from_itk", "from_velocity", "from_voxel_displacement", "to_grid", "to_itk",
           "to_voxel_displacement"]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_channels_first(name: str, field) -> int:
    """A ``(B, d, *S)`` float tensor with d = 2 or 3; returns d."""
    V.check_float_tensor(name, field)
    V.check_batch_dimension(name, field)
    d = field.ndim - 2
    if d not in (2, 3) or field.shape[1] != d:
        raise ValueError(f"{name} must be (B, d, *S) with d = 2 or 3 channels, one per spatial axis, got shape "
                         f"{tuple(field.shape)}")
    if any(s < 1 for s in field.shape[2:]):
        raise ValueError(f"{name} has an empty spatial axis: shape {tuple(field.shape)}")
    return d


def _check_align_corners(align_corners) -> bool:
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be True or False (as given to grid_sample), got {align_corners!r}")
    return align_corners


def _index_scale(shape: Sequence[int], like: Tensor) -> Tensor:
    """``S - 1`` per axis (1 for an axis of size 1), shaped to multiply channel k of a ``(B, d, *S)`` field."""
    scale = torch.tensor([max(int(s) - 1, 1) for s in shape], dtype=like.dtype, device=like.device)
    return scale.view(1, len(shape), *([1] * len(shape)))


def _grid_shape(chain: Sequence[Tensor], shape, d: int) -> tuple[int, ...]:
    """``shape`` checked, or the chain's common field shape when it is not given."""
    if shape is not None:
        return V.check_shape("shape", shape, d)
    shapes = {tuple(field.shape[2:]) for field in chain}
    if len(shapes) != 1:
        raise ValueError(f"the chain's fields have different grids {sorted(shapes)}: give the grid to evaluate it "
                         f"on as shape=")
    return shapes.pop()


def _displacement_on(chain: Sequence[Tensor], shape, backend) -> tuple[Tensor, tuple[int, ...]]:
    """The chain as one displacement in [0, 1] units on grid ``shape`` (default: its fields' grid)."""
    d, _ = V.check_chain("chain", chain)
    shape = _grid_shape(chain, shape, d)
    if len(chain) == 1 and tuple(chain[0].shape[2:]) == shape:
        return chain[0], shape  # already on that grid: no resampling, so round trips are exact
    return _functional.compose(chain, shape, backend=backend), shape


# --------------------------------------------------------------------------------------------
# Voxel displacements and velocities (VoxelMorph, MONAI)
# --------------------------------------------------------------------------------------------


def from_voxel_displacement(flow: Tensor) -> list[Tensor]:
    """A voxel displacement ``flow`` (B, d, *S) as a one-field chain.

    ``flow``'s channel k is the displacement along array axis k in voxels of its own grid, as
    VoxelMorph's ``SpatialTransformer`` and MONAI's ``Warp`` take it
    (``warped(p) = moving(p + flow(p))``, moving image and flow on the same grid). MONAI's
    ``Warp(padding_mode="border")`` samples exactly as gradicon_fast does; VoxelMorph's zero padding
    and MONAI's ``"zeros"``/``"reflection"`` differ only where ``p + flow(p)`` leaves the image.
    """
    _check_channels_first("flow", flow)
    return [flow / _index_scale(flow.shape[2:], flow)]


def to_voxel_displacement(chain: Sequence[Tensor], shape: Sequence[int] | None = None, *,
                          backend: str | None = None) -> Tensor:
    """The chain as a voxel displacement ``(B, d, *shape)`` for ``SpatialTransformer``/``Warp``.

    ``shape`` (default: the grid of the chain's fields, if they share one) is the grid of the images
    the flow will warp; the chain is evaluated at its voxel centres (``compose``).
    """
    disp, shape = _displacement_on(chain, shape, backend)
    return disp * _index_scale(shape, disp)


def from_velocity(velocity: Tensor, *, steps: int = 7, backend: str | None = None) -> list[Tensor]:
    """A stationary velocity in voxels ``(B, d, *S)``, integrated by scaling and squaring, as a one-field chain.

    ``D = v / 2^steps``, then ``steps`` times ``D ← D + D ∘ (id + D)``: the integration of
    VoxelMorph's ``IntegrateVelocityField``/``integrate_vec`` and MONAI's ``DVF2DDF(num_steps=steps)``. The
    squarings sample with border clamping (MONAI's ``padding_mode="border"``); their default zero
    padding differs only where an intermediate displacement points out of the grid.
    Differentiable with respect to ``velocity``.
    """
    _check_channels_first("velocity", velocity)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    shape = tuple(velocity.shape[2:])
    disp = from_voxel_displacement(velocity)[0] / 2 ** steps
    for _ in range(steps):
        disp = _functional.compose([disp, disp], shape, backend=backend)
    return [disp]


# --------------------------------------------------------------------------------------------
# grid_sample grids
# --------------------------------------------------------------------------------------------


def _input_scale(input_shape, d: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(S_in, max(S_in - 1, 1))`` of the sampled image, shaped like a ``(B, d, *S)`` field's channels."""
    if input_shape is None:
        raise ValueError("align_corners=False needs input_shape=, the spatial shape of the image the grid samples "
                         "(its [-1, 1] range spans the voxels' outer edges, which depend on the size)")
    input_shape = V.check_shape("input_shape", input_shape, d)
    size = torch.tensor(input_shape, dtype=like.dtype, device=like.device).view(1, d, *([1] * d))
    return size, _index_scale(input_shape, like)


def from_grid(grid: Tensor, *, align_corners: bool, input_shape: Sequence[int] | None = None) -> list[Tensor]:
    """A ``grid_sample`` grid ``(B, *S_out, d)`` as a one-field chain on the grid ``S_out``.

    ``grid[..., 0]`` is the position along the *last* spatial axis, in [-1, 1]: the centres of the
    first and last voxels with ``align_corners=True``, their outer edges with ``False`` (which then
    needs ``input_shape``, the spatial shape of the image the grid samples). ``grid_sample`` with
    ``padding_mode="border"`` samples exactly as gradicon_fast does, either way.
    """
    V.check_float_tensor("grid", grid)
    align_corners = _check_align_corners(align_corners)
    d = grid.ndim - 2
    if d not in (2, 3) or grid.shape[-1] != d:
        hint = (" (it looks channels-first, like a map: grid_sample grids are channels-last)"
                if d in (2, 3) and grid.shape[1] == d else "")
        raise ValueError(f"grid must be (B, *S_out, d) with d = 2 or 3 spatial axes and d last, got shape "
                         f"{tuple(grid.shape)}{hint}")
    output_shape = tuple(grid.shape[1:-1])
    if any(s < 1 for s in output_shape):
        raise ValueError(f"grid has an empty spatial axis: shape {tuple(grid.shape)}")
    normalised = grid.flip(-1).movedim(-1, 1)  # channel k along array axis k
    if align_corners:
        coords = (normalised + 1) / 2
    else:
        size, scale = _input_scale(input_shape, d, grid)
        coords = ((normalised + 1) * size - 1) / 2 / scale
    identity = _ref.identity_map(output_shape, dtype=grid.dtype, device=grid.device)
    return [coords - identity]


def to_grid(chain: Sequence[Tensor], shape: Sequence[int] | None = None, *, align_corners: bool,
            input_shape: Sequence[int] | None = None, backend: str | None = None) -> Tensor:
    """The chain's map on grid ``shape`` as a ``grid_sample`` grid ``(B, *shape, d)``.

    ``F.grid_sample(image, grid, align_corners=align_corners, padding_mode="border")`` then equals
    ``gradicon_fast.warp(image, chain, shape=shape)``. ``align_corners=False`` needs ``input_shape``,
    the spatial shape of the image the grid will sample.
    """
    align_corners = _check_align_corners(align_corners)
    disp, shape = _displacement_on(chain, shape, backend)
    d = len(shape)
    coords = _ref.identity_map(shape, dtype=disp.dtype, device=disp.device) + disp
    if align_corners:
        normalised = 2 * coords - 1
    else:
        size, scale = _input_scale(input_shape, d, disp)
        normalised = (2 * coords * scale + 1) / size - 1
    return normalised.movedim(1, -1).flip(-1)


# --------------------------------------------------------------------------------------------
# ITK/ANTs physical displacement fields
# --------------------------------------------------------------------------------------------


def _geometry(name: str, grid):
    """A :class:`gradicon_fast.io.Geometry` from a Geometry or an :class:`gradicon_fast.io.Image`."""
    from .io import Geometry

    geometry = getattr(grid, "geometry", grid)
    if not isinstance(geometry, Geometry):
        raise TypeError(f"{name} must be a gradicon_fast.io.Geometry or Image, got {type(grid).__name__}")
    return geometry


def _as_displacement_field(field):
    from .io import DisplacementField
    from .io.image import _sitk

    if isinstance(field, DisplacementField):
        return field
    sitk = _sitk()
    if isinstance(field, sitk.DisplacementFieldTransform):
        return DisplacementField.from_sitk_image(field.GetDisplacementField())
    if isinstance(field, sitk.Image):
        return DisplacementField.from_sitk_image(field)
    if isinstance(field, sitk.Transform):
        raise TypeError(f"field is a {field.GetName()}, not a displacement field: sample it on a grid first with "
                        f"gradicon_fast.io.field_of_transform(transform, geometry)")
    raise TypeError(f"field must be a gradicon_fast.io.DisplacementField, a SimpleITK vector image or a "
                    f"sitk.DisplacementFieldTransform, got {type(field).__name__}")


def from_itk(field, *, moving=None, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> list[Tensor]:
    """An ITK/ANTs displacement field (LPS mm on the fixed grid, ``warped(p) = moving(p + u(p))``) as a
    one-field chain ``[(1, d, *S)]`` on the field's grid.

    ``field``: a :class:`gradicon_fast.io.DisplacementField` (e.g. from ``io.read_displacement_field``),
    a SimpleITK vector image or a ``sitk.DisplacementFieldTransform``. The chain's targets are in
    [0, 1] units of ``moving`` (a Geometry or Image: the grid of the image it resamples), by default of
    the field's own grid. ``gradicon_fast.warp`` of the moving image with the chain then gives what
    ``sitk.Resample`` gives, wherever the target lies inside the moving image (docs/conventions.md §7).
    """
    field = _as_displacement_field(field)
    moving = None if moving is None else _geometry("moving", moving)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return [field.map_displacement(dtype=dtype, moving=moving).to(device)]


def to_itk(chain: Sequence[Tensor], fixed, *, moving=None, backend: str | None = None):
    """The chain as an ITK/ANTs displacement field on ``fixed``'s grid: a :class:`gradicon_fast.io.DisplacementField`.

    ``fixed`` (a Geometry or Image) is the grid the chain's source coordinates are [0, 1] units of;
    its targets are ``moving``'s (default: ``fixed``'s). Write it with
    ``io.write_displacement_field`` or use ``field.to_sitk_transform()``; a batch holds one field per
    pair, so convert one pair at a time (``[D[i:i + 1] for D in chain]``).
    """
    from .io import chain_to_field

    _, batch = V.check_chain("chain", chain)
    if batch != 1:
        raise ValueError(f"the chain has batch size {batch}, an ITK field holds one transform: convert one pair at a "
                         f"time, [D[i:i + 1] for D in chain]")
    fixed = _geometry("fixed", fixed)
    moving = None if moving is None else _geometry("moving", moving)
    if len(fixed.shape) != chain[0].ndim - 2:
        raise ValueError(f"the chain is {chain[0].ndim - 2}D but the fixed grid is {len(fixed.shape)}D")
    return chain_to_field(chain, fixed, moving=moving, backend=backend)
