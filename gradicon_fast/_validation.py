"""Argument checks shared by every backend: each error names the argument at fault.

The checks look at shapes, dtypes and devices only, never at the data (no per-call scan for
NaN: a non-finite field gives a non-finite result by construction of the kernels).
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor

MAX_CHAIN = 8
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, t, *, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (B, C, *spatial), got shape {tuple(t.shape)}")


def check_batch_dimension(name: str, field: Tensor, d: int | None = None) -> None:
    """A ``(d, *S)`` field given without its batch dimension would be read as ``(B, C, *S)`` and be
    reported for its channel count; say what is wrong instead. ``d``: the dimensionality, if known."""
    if d is None:
        unbatched = field.ndim in (3, 4) and field.shape[0] == field.ndim - 1 \
            and not (field.ndim == 4 and field.shape[1] == 2)  # (B, 2, H, W) is a batch of 2D fields
        d = field.ndim - 1
    else:
        unbatched = field.ndim == d + 1 and field.shape[0] == d
    if unbatched:
        raise ValueError(f"{name} has shape {tuple(field.shape)}: the batch dimension is missing (expected "
                         f"(B, d, *S), here (1, {', '.join(map(str, field.shape))}) for one {d}D field: "
                         f"add it with {name}[None])")


def check_chain(name: str, chain: Sequence[Tensor]) -> tuple[int, int]:
    """Check a chain of displacement fields; return (dimensionality d, broadcast batch size)."""
    if isinstance(chain, torch.Tensor):
        raise TypeError(f"{name} must be a list of displacement fields, got a single tensor; wrap it: [{name}]")
    try:
        chain = list(chain)
    except TypeError:
        raise TypeError(f"{name} must be a list of displacement fields, got {type(chain).__name__}") from None
    if not chain:
        raise ValueError(f"{name} is empty: a chain needs at least one displacement field")
    if len(chain) > MAX_CHAIN:
        raise ValueError(f"{name} has {len(chain)} fields; at most {MAX_CHAIN} are supported")
    first = chain[0]
    check_float_tensor(f"{name}[0]", first)
    check_batch_dimension(f"{name}[0]", first)
    d = first.ndim - 2
    if d not in (2, 3):
        raise ValueError(f"{name}[0] must be (B, d, *spatial) with d = 2 or 3 spatial axes, got shape {tuple(first.shape)}")
    batch = 1
    for i, field in enumerate(chain):
        check_float_tensor(f"{name}[{i}]", field)
        check_batch_dimension(f"{name}[{i}]", field, d)
        if field.ndim != d + 2:
            raise ValueError(f"{name}[{i}] has {field.ndim - 2} spatial axes but {name}[0] has {d}: "
                             f"a chain must be all 2D or all 3D")
        if field.shape[1] != d:
            raise ValueError(f"{name}[{i}] must have {d} channels (one per spatial axis), got {field.shape[1]}")
        if any(s < 1 for s in field.shape[2:]):
            raise ValueError(f"{name}[{i}] has an empty spatial axis: shape {tuple(field.shape)}")
        if field.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] has dtype {field.dtype} but {name}[0] has {first.dtype}")
        if field.device != first.device:
            raise ValueError(f"{name}[{i}] is on {field.device} but {name}[0] is on {first.device}")
        batch = merge_batch(batch, field.shape[0], f"{name}[{i}]")
    return d, batch


def merge_batch(batch: int, other: int, name: str) -> int:
    """Batch sizes broadcast when equal or 1."""
    if other == batch or other == 1:
        return batch
    if batch == 1:
        return other
    raise ValueError(f"{name} has batch size {other}, which does not match batch size {batch} of the other inputs "
                     f"(batch sizes must be equal or 1)")


def check_same_device_dtype(name: str, t: Tensor, ref_name: str, ref: Tensor, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_points(points: Tensor, d: int, chain_name: str, chain0: Tensor) -> None:
    check_float_tensor("points", points)
    if points.ndim < 3 or points.shape[1] != d:
        raise ValueError(f"points must be (B, {d}, *P) to match the {d}D chain {chain_name}, got shape {tuple(points.shape)}")
    check_same_device_dtype("points", points, f"{chain_name}[0]", chain0)


def check_shape(name: str, shape, d: int) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"{name} must be a tuple of {d} ints, got {shape!r}")
    if len(shape) != d:
        raise ValueError(f"{name} must have {d} entries to match the {d}D chains, got {tuple(shape)}")
    if any(s < 1 for s in shape):
        raise ValueError(f"{name} entries must be >= 1, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def check_pair(chain_ab, chain_ba) -> tuple[int, int]:
    d_ab, b_ab = check_chain("chain_AB", chain_ab)
    d_ba, b_ba = check_chain("chain_BA", chain_ba)
    if d_ab != d_ba:
        raise ValueError(f"chain_AB is {d_ab}D but chain_BA is {d_ba}D")
    check_same_device_dtype("chain_BA[0]", chain_ba[0], "chain_AB[0]", chain_ab[0])
    return d_ab, merge_batch(b_ab, b_ba, "chain_BA")


def check_noise(noise, d: int, points_shape: tuple[int, ...], ref: Tensor) -> None:
    if noise is None:
        return
    check_float_tensor("noise", noise)
    expected = (1, d, *points_shape)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must have shape {expected} (1, d, *points_shape), got {tuple(noise.shape)}")
    check_same_device_dtype("noise", noise, "chain_AB[0]", ref)
    if noise.requires_grad:
        raise ValueError("noise must not require grad: the penalties treat it as a constant")


def check_stride(stride) -> int:
    if not isinstance(stride, int) or isinstance(stride, bool):
        raise TypeError(f"stride must be an int, got {stride!r}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return stride


def check_positive(name: str, value) -> float:
    value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def check_map(name: str, phi) -> int:
    check_float_tensor(name, phi)
    check_batch_dimension(name, phi)
    d = phi.ndim - 2
    if d not in (2, 3) or phi.shape[1] != d:
        raise ValueError(f"{name} must be a map (B, d, *spatial) with d = 2 or 3 channels, got shape {tuple(phi.shape)}")
    if any(s < 2 for s in phi.shape[2:]):
        raise ValueError(f"{name} needs at least 2 voxels along every spatial axis, got shape {tuple(phi.shape)}")
    return d
