"""The Triton backend's operators ``torch.ops.gradicon_fast_triton.*`` and their typed wrappers.

The operator bodies below check and prepare the arguments and launch the kernels; the op table
(``gradicon_fast.op_registry``) defines the operators from them, with the fake kernels and the
autograd formula it gives every backend. Each forward operator is a ``torch.library.triton_op``
whose body launches the kernels through ``torch.library.wrap_triton``, so that ``torch.compile``
can trace it; the backward operators stay opaque ``custom_op``s. On a torch without ``triton_op``
all are ``custom_op``s. The wrappers at the bottom have the signatures of ``gradicon_fast.ops``'
(``functional.py`` calls them for ``backend="triton"``).

Dtypes: float32 and float64 fields compute in their own precision; bfloat16/float16 fields
are read as they are and computed with in float32, their gradients accumulated in float32 and
rounded once at the end; outputs have the inputs' dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton

from gradicon_fast import op_registry
from gradicon_fast.op_registry import batch_size

from . import chain as _chain
from .chain import MAX_FIELDS, accumulation_dtype, grad_mask, slot_args, stop_index
from .gradicon import gradicon_backward, gradicon_forward
from .gradicon_analytic import gradicon_analytic_backward, gradicon_analytic_forward
from .icon import icon_backward, icon_forward
from .noise import normal_noise_kernel
from .penalty_points import float_bits, split64
from .transform_points import transform_points_backward, transform_points_forward
from .tuning import NUM_WARPS, TILE, backward_block, interpreted, noise_block
from .warp import warp_backward, warp_forward

Tensor = torch.Tensor

NAMESPACE = "gradicon_fast_triton"
MAX_CHAIN = MAX_FIELDS // 2

_wrap = getattr(torch.library, "wrap_triton", None) or (lambda kernel: kernel)


def _launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, traceable by torch.compile through wrap_triton.

    wrap_triton leaves interpreted kernels (``TRITON_INTERPRET=1``) unwrapped, so under fake
    tensors (shape propagation) there is nothing to launch: the output shapes are all we need.
    """
    if interpreted() and any(isinstance(a, torch.Tensor) and _is_fake(a) for a in args):
        return
    _wrap(kernel)[grid](*args, **kwargs)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or t.device.type == "meta"


# ---- argument plumbing --------------------------------------------------------------------------


def _check_chain(name: str, chain: Sequence[Tensor], max_fields: int = MAX_CHAIN) -> int:
    """Shape/dtype/device checks that keep the kernels' reads in bounds; returns d."""
    if not 1 <= len(chain) <= max_fields:
        raise ValueError(f"{name} must have 1 to {max_fields} fields, got {len(chain)}")
    d = chain[0].ndim - 2
    if d not in (2, 3):
        raise ValueError(f"{name}[0] must be (B, d, *spatial) with d = 2 or 3, got {tuple(chain[0].shape)}")
    for i, f in enumerate(chain):
        if f.ndim != d + 2 or f.shape[1] != d:
            raise ValueError(f"{name}[{i}] must be (B, {d}, *spatial), got {tuple(f.shape)}")
        if f.dtype != chain[0].dtype or f.device != chain[0].device:
            raise ValueError(f"{name}[{i}] must have the dtype and device of {name}[0]")
        if not f.is_floating_point():
            raise TypeError(f"{name}[{i}] must have a floating-point dtype, got {f.dtype}")
    return d


def _check_like(name: str, t: Tensor, ref: Tensor) -> None:
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} must have dtype {ref.dtype} on {ref.device}, got {t.dtype} on {t.device}")


def _grad_buffers(fields: Sequence[Tensor], needs: Sequence[bool]) -> list[Optional[Tensor]]:
    return [torch.zeros(f.shape, dtype=accumulation_dtype(f.dtype), device=f.device) if n else None
            for f, n in zip(fields, needs)]


def _returned(buffers: Sequence[Optional[Tensor]], fields: Sequence[Tensor]) -> list[Tensor]:
    """The gradients in the fields' dtype; an empty tensor where none was wanted (as the C++ ops)."""
    return [b.to(f.dtype) if b is not None else f.new_empty((0,)) for b, f in zip(buffers, fields)]


def _common(d: int, dtype: torch.dtype, big: bool) -> dict:
    return {"D": d, "F64": dtype == torch.float64, "BIG": big}


def _penalty_points(d: int, shape: Sequence[int], stride: int) -> list[int]:
    if len(shape) != d or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must have {d} entries >= 1, got {list(shape)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return [(int(s) + stride - 1) // stride for s in shape]


def _noise_arg(noise: Optional[Tensor], d: int, counts: Sequence[int], ref: Tensor) -> tuple[Tensor, bool]:
    if noise is None:
        return ref, False
    if list(noise.shape) != [1, d, *counts]:
        raise ValueError(f"noise must have shape {[1, d, *counts]}, got {list(noise.shape)}")
    _check_like("noise", noise, ref)
    return noise.contiguous(), True


def _padded(values: Sequence[int]) -> list[int]:
    return list(values) + [1] * (3 - len(values))


# ---- operator bodies: launch the kernels ------------------------------------------------------


def _transform_points(chain: list[Tensor], points: Tensor) -> Tensor:
    d = _check_chain("chain", chain)
    _check_like("points", points, chain[0])
    if points.ndim < 3 or points.shape[1] != d:
        raise ValueError(f"points must be (B, {d}, *P), got {tuple(points.shape)}")
    fields = [f.contiguous() for f in chain]
    x = points.contiguous()
    batch = batch_size(x, *fields)
    n = math.prod(x.shape[2:])
    out = x.new_empty((batch, *x.shape[1:]))
    if n == 0:
        return out
    slots, batched = slot_args(fields, [None] * len(fields), batch)
    _launch(
        transform_points_forward, lambda meta: (triton.cdiv(n, meta["BLOCK"]), batch),
        x, out, x, x, n, *slots, NF=len(fields), BATCHED=batched, GMASK=0, STOP=-1,
        X_BATCHED=x.shape[0] != 1, BACKWARD=False, POINT_GRAD=False, **_common(d, x.dtype, _chain.is_big(x, out, *fields)))
    return out


def _transform_points_backward(grad: Tensor, chain: list[Tensor], points: Tensor, chain_needs_grad: list[bool],
                               points_needs_grad: bool) -> tuple[list[Tensor], Tensor]:
    d = _check_chain("chain", chain)
    fields = [f.contiguous() for f in chain]
    x = points.contiguous()
    batch = batch_size(x, *fields)
    n = math.prod(x.shape[2:])
    grad = grad.contiguous()
    if list(grad.shape) != [batch, *x.shape[1:]]:
        raise ValueError(f"grad must have shape {[batch, *x.shape[1:]]}, got {list(grad.shape)}")
    buffers = _grad_buffers(fields, chain_needs_grad)
    grad_x = x.new_empty((batch, *x.shape[1:])) if points_needs_grad else None
    stop = stop_index(list(chain_needs_grad), points_needs_grad)
    if stop >= 0 and n > 0:
        slots, batched = slot_args(fields, buffers, batch)
        block = backward_block(d)
        _launch(
            transform_points_backward, (triton.cdiv(n, block), batch),
            x, x, grad, grad_x if grad_x is not None else x, n, *slots, NF=len(fields), BATCHED=batched,
            GMASK=grad_mask(chain_needs_grad), STOP=stop, X_BATCHED=x.shape[0] != 1, BACKWARD=True,
            POINT_GRAD=points_needs_grad, **_common(d, x.dtype, _chain.is_big(x, grad, *fields)),
            BLOCK=block, num_warps=NUM_WARPS)
    if grad_x is None:
        grad_x = x.new_empty((0,))
    elif x.shape[0] != batch:
        grad_x = grad_x.sum(0, keepdim=True)
    return _returned(buffers, fields), grad_x


def _warp_args(image: Tensor, chain: list[Tensor], shape: list[int]):
    d = _check_chain("chain", chain)
    _check_like("image", image, chain[0])
    if image.ndim != d + 2 or image.shape[1] < 1:
        raise ValueError(f"image must be (B, C, *spatial) with {d} spatial axes, got {tuple(image.shape)}")
    if len(shape) != d or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must have {d} entries >= 1, got {list(shape)}")
    fields = [f.contiguous() for f in chain]
    img = image.contiguous()
    batch = batch_size(img, *fields)
    out_shape = [batch, img.shape[1], *[int(s) for s in shape]]
    return d, fields, img, batch, out_shape


def _warp(image: Tensor, chain: list[Tensor], shape: list[int]) -> Tensor:
    d, fields, img, batch, out_shape = _warp_args(image, chain, shape)
    out = img.new_empty(out_shape)
    n = math.prod(shape)
    slots, batched = slot_args(fields, [None] * len(fields), batch)
    _launch(
        warp_forward, lambda meta: (triton.cdiv(n, meta["BLOCK"]), batch),
        img, out, img, img, img.shape[1], n, *_padded(img.shape[2:]), *_padded(shape), *slots, NF=len(fields),
        BATCHED=batched, GMASK=0, STOP=-1, IMG_BATCHED=img.shape[0] != 1, BACKWARD=False, IMAGE_GRAD=False,
        **_common(d, img.dtype, _chain.is_big(img, out, *fields)))
    return out


def _warp_backward(grad: Tensor, image: Tensor, chain: list[Tensor], shape: list[int], image_needs_grad: bool,
                   chain_needs_grad: list[bool]) -> tuple[Tensor, list[Tensor]]:
    d, fields, img, batch, out_shape = _warp_args(image, chain, shape)
    grad = grad.contiguous()
    if list(grad.shape) != out_shape:
        raise ValueError(f"grad must have shape {out_shape}, got {list(grad.shape)}")
    n = math.prod(shape)
    buffers = _grad_buffers(fields, chain_needs_grad)
    grad_img = torch.zeros(img.shape, dtype=accumulation_dtype(img.dtype), device=img.device) \
        if image_needs_grad else None
    stop = stop_index(list(chain_needs_grad), False)
    if stop >= 0 or image_needs_grad:
        slots, batched = slot_args(fields, buffers, batch)
        block = backward_block(d)
        _launch(
            warp_backward, (triton.cdiv(n, block), batch),
            img, img, grad, grad_img if grad_img is not None else img, img.shape[1], n, *_padded(img.shape[2:]),
            *_padded(shape), *slots, NF=len(fields), BATCHED=batched, GMASK=grad_mask(chain_needs_grad), STOP=stop,
            IMG_BATCHED=img.shape[0] != 1, BACKWARD=True, IMAGE_GRAD=image_needs_grad,
            **_common(d, img.dtype, _chain.is_big(img, grad, *fields)), BLOCK=block, num_warps=NUM_WARPS)
    grad_image = grad_img.to(img.dtype) if grad_img is not None else img.new_empty((0,))
    return grad_image, _returned(buffers, fields)


def _pair(chain_ab: list[Tensor], chain_ba: list[Tensor]):
    d = _check_chain("chain_ab", chain_ab)
    if _check_chain("chain_ba", chain_ba) != d:
        raise ValueError("chain_ab and chain_ba must both be 2D or 3D")
    _check_like("chain_ba[0]", chain_ba[0], chain_ab[0])
    fields = [f.contiguous() for f in list(chain_ab) + list(chain_ba)]
    return d, fields, batch_size(*fields)


def _penalty_launch(kernel, grid, pair, buffers, shape, stride, noise, seed, scalars, partial, grad_loss,
                    **constexprs) -> None:
    """Launch a penalty kernel on the points ``id[::stride] + noise_scale · noise`` of grid ``shape``.

    ``scalars``: the float arguments after the seed (noise_scale, then the penalty's own), passed
    as bits; ``stride=None``: a kernel on the whole grid, which takes no point counts or stride (ICON).
    """
    d, fields, batch = pair
    counts = _penalty_points(d, shape, stride or 1)
    n = math.prod(counts)
    noise_arg, has_noise = _noise_arg(noise, d, counts, fields[0])
    slots, batched = slot_args(fields, buffers, batch)
    points = _padded(shape) if stride is None else [*_padded(shape), *_padded(counts), int(stride)]
    bits = [half for value in scalars for half in split64(float_bits(value))]
    _launch(
        kernel, grid(n),
        noise_arg, partial, grad_loss, n, *points, *split64(seed), *bits, batch * d * n, *slots, NF=len(fields),
        BATCHED=batched, HAS_NOISE=has_noise, **_common(d, fields[0].dtype, _chain.is_big(noise_arg, *fields)),
        TILE=TILE, **constexprs)


def _penalty_value(kernel, pair, shape, stride, noise, seed, scalars, **constexprs) -> Tensor:
    """A penalty: per-program partial sums over TILE points, added in float64 and divided by B·d·N."""
    d, fields, batch = pair
    n = math.prod(_penalty_points(d, shape, stride or 1))
    programs = triton.cdiv(n, TILE)
    partial = fields[0].new_zeros((batch * programs,), dtype=accumulation_dtype(fields[0].dtype))
    _penalty_launch(kernel, lambda n: (programs, batch), pair, [None] * len(fields), shape, stride, noise, seed,
                    scalars, partial, partial, GMASK=0, BACKWARD=False, **constexprs)
    return (partial.sum(dtype=torch.float64) / (batch * d * n)).to(fields[0].dtype)


def _penalty_gradients(kernel, block, grad, pair, n_ab, needs, shape, stride, noise, seed, scalars,
                       **constexprs) -> tuple[list[Tensor], list[Tensor]]:
    """A penalty's gradients for the fields that ``needs`` (φ_AB's n_ab, then φ_BA's) marks."""
    d, fields, batch = pair
    buffers = _grad_buffers(fields, needs)
    if any(needs):
        _penalty_launch(kernel, lambda n: (triton.cdiv(n, block), batch), pair, buffers, shape, stride, noise, seed,
                        scalars, fields[0], grad.contiguous(), GMASK=grad_mask(needs), BACKWARD=True, BLOCK=block,
                        num_warps=NUM_WARPS, **constexprs)
    grads = _returned(buffers, fields)
    return grads[:n_ab], grads[n_ab:]


def _gradicon_loss(chain_ab: list[Tensor], chain_ba: list[Tensor], shape: list[int], stride: int,
                   noise: Optional[Tensor], seed: int, delta: float, noise_scale: float) -> Tensor:
    return _penalty_value(gradicon_forward, _pair(chain_ab, chain_ba), shape, stride, noise, seed,
                          (noise_scale, delta), STOP=-1)


def _gradicon_loss_backward(grad: Tensor, chain_ab: list[Tensor], chain_ba: list[Tensor], shape: list[int],
                            stride: int, noise: Optional[Tensor], seed: int, delta: float, noise_scale: float,
                            ab_needs_grad: list[bool], ba_needs_grad: list[bool]) -> tuple[list[Tensor], list[Tensor]]:
    pair = _pair(chain_ab, chain_ba)
    needs = list(ab_needs_grad) + list(ba_needs_grad)
    return _penalty_gradients(gradicon_backward, backward_block(pair[0], 4), grad, pair, len(chain_ab), needs, shape,
                              stride, noise, seed, (noise_scale, delta), STOP=stop_index(needs, False))


def _gradicon_analytic_loss(chain_ab: list[Tensor], chain_ba: list[Tensor], shape: list[int], stride: int,
                            noise: Optional[Tensor], seed: int, noise_scale: float) -> Tensor:
    return _penalty_value(gradicon_analytic_forward, _pair(chain_ab, chain_ba), shape, stride, noise, seed,
                          (noise_scale,), STOP=-1)


def _gradicon_analytic_loss_backward(grad: Tensor, chain_ab: list[Tensor], chain_ba: list[Tensor], shape: list[int],
                                     stride: int, noise: Optional[Tensor], seed: int, noise_scale: float,
                                     ab_needs_grad: list[bool],
                                     ba_needs_grad: list[bool]) -> tuple[list[Tensor], list[Tensor]]:
    pair = _pair(chain_ab, chain_ba)
    needs = list(ab_needs_grad) + list(ba_needs_grad)
    block = max(8, backward_block(pair[0]) // 2)  # the reverse pass also keeps J - I per field
    return _penalty_gradients(gradicon_analytic_backward, block, grad, pair, len(chain_ab), needs, shape, stride,
                              noise, seed, (noise_scale,), STOP=stop_index(needs, False))


def _icon_loss(chain_ab: list[Tensor], chain_ba: list[Tensor], shape: list[int], noise: Optional[Tensor], seed: int,
               noise_scale: float) -> Tensor:
    return _penalty_value(icon_forward, _pair(chain_ab, chain_ba), shape, None, noise, seed, (noise_scale,),
                          NA=len(chain_ab), STOP_AB=-1, STOP_BA=-1)


def _icon_loss_backward(grad: Tensor, chain_ab: list[Tensor], chain_ba: list[Tensor], shape: list[int],
                        noise: Optional[Tensor], seed: int, noise_scale: float, ab_needs_grad: list[bool],
                        ba_needs_grad: list[bool]) -> tuple[list[Tensor], list[Tensor]]:
    pair = _pair(chain_ab, chain_ba)
    ab, ba = list(ab_needs_grad), list(ba_needs_grad)
    return _penalty_gradients(icon_backward, backward_block(pair[0]), grad, pair, len(chain_ab), ab + ba, shape, None,
                              noise, seed, (noise_scale,), NA=len(chain_ab), STOP_AB=stop_index(ab + ba, False),
                              STOP_BA=stop_index(ba + ab, False))


def _normal_noise(seed: int, d: int, points_shape: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty((1, d, *points_shape), dtype=dtype, device=device)
    n = math.prod(points_shape)
    if n:
        block = noise_block()
        _launch(normal_noise_kernel, (triton.cdiv(n, block),), out, n, *split64(seed), D=d, BIG=_chain.is_big(out),
                BLOCK=block, num_warps=NUM_WARPS)
    return out


# ---- registration: the op table's fake kernels and autograd, these bodies --------------------


TRACED = op_registry.register_python(NAMESPACE, {
    "transform_points": _transform_points,
    "transform_points_backward": _transform_points_backward,
    "warp": _warp,
    "warp_backward": _warp_backward,
    "gradicon_loss": _gradicon_loss,
    "gradicon_loss_backward": _gradicon_loss_backward,
    "gradicon_analytic_loss": _gradicon_analytic_loss,
    "gradicon_analytic_loss_backward": _gradicon_analytic_loss_backward,
    "icon_loss": _icon_loss,
    "icon_loss_backward": _icon_loss_backward,
    "normal_noise": _normal_noise,
}, traceable_op=getattr(torch.library, "triton_op", None))  # the operators torch.compile traces into


# ---- typed wrappers (the signatures of gradicon_fast.ops') ------------------------------------


def _ops():
    return getattr(torch.ops, NAMESPACE)


def normal_noise(seed: int, d: int, points_shape: Sequence[int], *, dtype=torch.float32, device=None) -> Tensor:
    """The (1, d, *points_shape) standard-normal noise the penalties draw from ``seed``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _ops().normal_noise(int(seed), int(d), [int(s) for s in points_shape], dtype, device)


def transform_points(chain: Sequence[Tensor], points: Tensor) -> Tensor:
    return _ops().transform_points(list(chain), points)


def warp(image: Tensor, chain: Sequence[Tensor], shape: Sequence[int]) -> Tensor:
    return _ops().warp(image, list(chain), [int(s) for s in shape])


def gradicon_loss(chain_ab, chain_ba, shape, stride, noise, seed, delta, noise_scale) -> Tensor:
    return _ops().gradicon_loss(list(chain_ab), list(chain_ba), [int(s) for s in shape], int(stride), noise,
                                int(seed), float(delta), float(noise_scale))


def icon_loss(chain_ab, chain_ba, shape, noise, seed, noise_scale) -> Tensor:
    return _ops().icon_loss(list(chain_ab), list(chain_ba), [int(s) for s in shape], noise, int(seed),
                            float(noise_scale))


def gradicon_analytic_loss(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale) -> Tensor:
    """One direction of the analytic GradICON penalty: ‖J - I‖_F² of φ_ab∘φ_ba, mean over B·d·N."""
    return _ops().gradicon_analytic_loss(list(chain_ab), list(chain_ba), [int(s) for s in shape], int(stride), noise,
                                         int(seed), float(noise_scale))
