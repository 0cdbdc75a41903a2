"""Triton kernel: a chain evaluated at points, φ(x) = Φ_1∘…∘Φ_K(x), and its reverse pass.

One kernel source, two compiled kernels: ``transform_points_forward`` (``BACKWARD=False``,
autotuned on GPU) writes φ(x); ``transform_points_backward`` (``BACKWARD=True``) runs the chain
again, then scatters ``∂L/∂field`` into the gradient buffers (atomic adds) and writes
``∂L/∂x``. Grid: (point blocks, batch). Points are (B|1, d, N), contiguous.
"""

import triton
import triton.language as tl

from .chain import block_points, chain_backward, chain_forward, chain_kernels
from .sampling import as_index


def _transform_points(
    X, OUT, GRAD_OUT, GRAD_X, N, CHAIN,
    STOP: tl.constexpr, X_BATCHED: tl.constexpr, BACKWARD: tl.constexpr, POINT_GRAD: tl.constexpr,
    D: tl.constexpr, F64: tl.constexpr, BIG: tl.constexpr, BLOCK: tl.constexpr,
):
    fields, grads, sizes = CHAIN
    b, n = tl.program_id(1), as_index(N, BIG)
    offs, mask = block_points(n, BLOCK, BIG)
    row = as_index(b, BIG) * D * n  # batch entry b of a (B, d, N) tensor
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
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


transform_points_forward, transform_points_backward = chain_kernels(_transform_points, ["N"], ["N", "NF", "D"])
