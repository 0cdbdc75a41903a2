"""Triton kernel: a chain evaluated at points, φ(x) = Φ_1∘…∘Φ_K(x), and its reverse pass.

One kernel source, two compiled kernels: ``transform_points_forward`` (``BACKWARD=False``,
autotuned on GPU) writes φ(x); ``transform_points_backward`` (``BACKWARD=True``) runs the chain
again, then scatters ``∂L/∂field`` into the gradient buffers (atomic adds) and writes
``∂L/∂x``. Grid: (point blocks, batch). Points are (B|1, d, N), contiguous.
"""

import triton
import triton.language as tl

from .chain import SIZE_ARGS, chain_backward, chain_forward
from .sampling import as_index
from .tuning import forward_configs


def _transform_points(
    X, OUT, GRAD_OUT, GRAD_X, N,
    F0, G0, A0, B0, C0,
    F1, G1, A1, B1, C1,
    F2, G2, A2, B2, C2,
    F3, G3, A3, B3, C3,
    F4, G4, A4, B4, C4,
    F5, G5, A5, B5, C5,
    F6, G6, A6, B6, C6,
    F7, G7, A7, B7, C7,
    F8, G8, A8, B8, C8,
    F9, G9, A9, B9, C9,
    F10, G10, A10, B10, C10,
    F11, G11, A11, B11, C11,
    F12, G12, A12, B12, C12,
    F13, G13, A13, B13, C13,
    F14, G14, A14, B14, C14,
    F15, G15, A15, B15, C15,
    NF: tl.constexpr, BATCHED: tl.constexpr, GMASK: tl.constexpr, STOP: tl.constexpr,
    X_BATCHED: tl.constexpr, BACKWARD: tl.constexpr, POINT_GRAD: tl.constexpr,
    D: tl.constexpr, F64: tl.constexpr, BIG: tl.constexpr, BLOCK: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    fields = (F0, F1, F2, F3, F4, F5, F6, F7, F8, F9, F10, F11, F12, F13, F14, F15)
    grads = (G0, G1, G2, G3, G4, G5, G6, G7, G8, G9, G10, G11, G12, G13, G14, G15)
    sizes = ((A0, B0, C0), (A1, B1, C1), (A2, B2, C2), (A3, B3, C3), (A4, B4, C4), (A5, B5, C5),
             (A6, B6, C6), (A7, B7, C7), (A8, B8, C8), (A9, B9, C9), (A10, B10, C10), (A11, B11, C11),
             (A12, B12, C12), (A13, B13, C13), (A14, B14, C14), (A15, B15, C15))
    b = tl.program_id(1)
    offs = as_index(tl.program_id(0), BIG) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    n = as_index(N, BIG)
    row = as_index(b, BIG) * D * n  # batch entry b of a (B, d, N) tensor
    if X_BATCHED:
        xrow = row
    else:
        xrow = row * 0
    x = ()
    for k in tl.static_range(D):
        x = x + (tl.load(X + xrow + k * n + offs, mask=mask, other=0.0).to(CT)[:, None],)
    end, stash = chain_forward(x, fields, grads, sizes, b, NF, 0, BATCHED, D, CT, BIG, mask[:, None, None])
    if BACKWARD:
        a = ()
        for k in tl.static_range(D):
            a = a + (tl.load(GRAD_OUT + row + k * n + offs, mask=mask, other=0.0).to(CT)[:, None],)
        a = chain_backward(a, stash, fields, grads, sizes, b, NF, 0, BATCHED, GMASK, STOP, 1, D, CT, BIG,
                           mask[:, None, None])
        if POINT_GRAD:
            for k in tl.static_range(D):
                tl.store(GRAD_X + row + k * n + offs, tl.sum(a[k], axis=1).to(GRAD_X.dtype.element_ty), mask=mask)
    else:
        for k in tl.static_range(D):
            tl.store(OUT + row + k * n + offs, tl.sum(end[k], axis=1).to(OUT.dtype.element_ty), mask=mask)


_NO_SPECIALIZE = ["N", *SIZE_ARGS]

transform_points_forward = triton.autotune(configs=forward_configs(), key=["N", "NF", "D"])(
    triton.jit(_transform_points, do_not_specialize=_NO_SPECIALIZE))
transform_points_backward = triton.jit(_transform_points, do_not_specialize=_NO_SPECIALIZE)
