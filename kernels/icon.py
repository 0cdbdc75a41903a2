"""Triton kernels: the ICON penalty, both directions (docs/conventions.md §2).

``L = mean((x - φ_AB(φ_BA(x)))²) + mean((x - φ_BA(φ_AB(x)))²)`` at ``x = id + noise_scale · n``.
The slots hold φ_AB's NA fields, then φ_BA's; φ_AB∘φ_BA reads them in order and φ_BA∘φ_AB
rotated by NA (``ROT``), so each field is passed once and both compositions add into the same
gradient buffers.

* ``icon_forward`` (autotuned on GPU): per-program partial sums over TILE points, as GradICON's.
* ``icon_backward``: both compositions again, ``∂L/∂φ(x) = -2 grad (x - φ(x)) / (B·d·N)``, and
  their reverse passes.
"""

import triton
import triton.language as tl

from .chain import block_points, chain_backward, chain_forward, chain_kernels
from .penalty_points import as_columns, penalty_point, penalty_scalars, store_partial, tile_points
from .sampling import as_index, div_rn


def _icon(
    NOISE, PARTIAL, GRAD_LOSS, N, W0, W1, W2, SEED_LO, SEED_HI, NOISE_SCALE_LO, NOISE_SCALE_HI, COUNT, CHAIN,
    NA: tl.constexpr, STOP_AB: tl.constexpr, STOP_BA: tl.constexpr, HAS_NOISE: tl.constexpr, BACKWARD: tl.constexpr,
    D: tl.constexpr, F64: tl.constexpr, BIG: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    fields, grads, sizes = CHAIN
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    b, n = tl.program_id(1), as_index(N, BIG)
    seed, noise_scale = penalty_scalars(SEED_LO, SEED_HI, NOISE_SCALE_LO, NOISE_SCALE_HI, CT)
    grid = (W0, W1, W2)
    if BACKWARD:
        offs, mask = block_points(n, BLOCK, BIG)
        mask3 = mask[:, None, None]
        x = as_columns(penalty_point(offs, grid, grid, 1, NOISE, n, seed, noise_scale, HAS_NOISE, D, CT, mask), D)
        scale = div_rn(2 * tl.load(GRAD_LOSS).to(CT), tl.cast(COUNT, CT), CT)
        if STOP_AB >= 0:
            y, stash = chain_forward(x, fields, grads, sizes, b, NF, 0, BATCHED, D, CT, BIG, mask3)
            a = ()
            for k in tl.static_range(D):
                a = a + (-scale * (x[k] - y[k]),)
            chain_backward(a, stash, fields, grads, sizes, b, NF, 0, BATCHED, GMASK, STOP_AB, 1, D, CT, BIG, mask3)
        if STOP_BA >= 0:
            y, stash = chain_forward(x, fields, grads, sizes, b, NF, NA, BATCHED, D, CT, BIG, mask3)
            a = ()
            for k in tl.static_range(D):
                a = a + (-scale * (x[k] - y[k]),)
            chain_backward(a, stash, fields, grads, sizes, b, NF, NA, BATCHED, GMASK, STOP_BA, 1, D, CT, BIG, mask3)
    else:
        acc = tl.zeros((BLOCK,), CT)
        for t in range(0, TILE, BLOCK):
            offs, mask = tile_points(t, n, TILE, BLOCK, BIG)
            mask3 = mask[:, None, None]
            x = as_columns(penalty_point(offs, grid, grid, 1, NOISE, n, seed, noise_scale, HAS_NOISE, D, CT, mask), D)
            y1, _ = chain_forward(x, fields, grads, sizes, b, NF, 0, BATCHED, D, CT, BIG, mask3)
            y2, _ = chain_forward(x, fields, grads, sizes, b, NF, NA, BATCHED, D, CT, BIG, mask3)
            sq = tl.zeros_like(x[0])
            for k in tl.static_range(D):
                e1 = x[k] - y1[k]
                e2 = x[k] - y2[k]
                sq += e1 * e1 + e2 * e2
            acc += tl.where(mask, tl.sum(sq, axis=1), 0.0)
        store_partial(PARTIAL, acc)


icon_forward, icon_backward = chain_kernels(
    _icon, ["N", "W0", "W1", "W2", "SEED_LO", "SEED_HI", "NOISE_SCALE_LO", "NOISE_SCALE_HI", "COUNT"], ["N", "NF", "D"])
