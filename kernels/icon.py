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

from .chain import SIZE_ARGS, chain_backward, chain_forward
from .penalty_points import join64, penalty_point, scalar_from_bits
from .sampling import as_index, div_rn
from .tuning import forward_configs


@triton.jit
def _column_points(x, D: tl.constexpr):
    """A D-tuple of [BLOCK] coordinates as [BLOCK, 1] (one point per row)."""
    out = ()
    for k in tl.static_range(D):
        out = out + (x[k][:, None],)
    return out


def _icon(
    NOISE, PARTIAL, GRAD_LOSS, N, W0, W1, W2, SEED_LO, SEED_HI, NOISE_SCALE_LO, NOISE_SCALE_HI, COUNT,
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
    NF: tl.constexpr, NA: tl.constexpr, BATCHED: tl.constexpr, GMASK: tl.constexpr,
    STOP_AB: tl.constexpr, STOP_BA: tl.constexpr, HAS_NOISE: tl.constexpr, BACKWARD: tl.constexpr,
    D: tl.constexpr, F64: tl.constexpr, BIG: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    fields = (F0, F1, F2, F3, F4, F5, F6, F7, F8, F9, F10, F11, F12, F13, F14, F15)
    grads = (G0, G1, G2, G3, G4, G5, G6, G7, G8, G9, G10, G11, G12, G13, G14, G15)
    sizes = ((A0, B0, C0), (A1, B1, C1), (A2, B2, C2), (A3, B3, C3), (A4, B4, C4), (A5, B5, C5),
             (A6, B6, C6), (A7, B7, C7), (A8, B8, C8), (A9, B9, C9), (A10, B10, C10), (A11, B11, C11),
             (A12, B12, C12), (A13, B13, C13), (A14, B14, C14), (A15, B15, C15))
    b = tl.program_id(1)
    n = as_index(N, BIG)
    seed = join64(SEED_LO, SEED_HI)
    noise_scale = scalar_from_bits(NOISE_SCALE_LO, NOISE_SCALE_HI, CT)
    grid = (W0, W1, W2)
    if BACKWARD:
        offs = as_index(tl.program_id(0), BIG) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        mask3 = mask[:, None, None]
        x = penalty_point(offs, grid, grid, 1, NOISE, n, seed, noise_scale, HAS_NOISE, D, CT, mask)
        x = _column_points(x, D)
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
        tile = as_index(tl.program_id(0), BIG) * TILE
        acc = tl.zeros((BLOCK,), CT)
        for t in range(0, TILE, BLOCK):
            offs = tile + t + tl.arange(0, BLOCK)
            mask = offs < n
            mask3 = mask[:, None, None]
            x = penalty_point(offs, grid, grid, 1, NOISE, n, seed, noise_scale, HAS_NOISE, D, CT, mask)
            x = _column_points(x, D)
            y1, _ = chain_forward(x, fields, grads, sizes, b, NF, 0, BATCHED, D, CT, BIG, mask3)
            y2, _ = chain_forward(x, fields, grads, sizes, b, NF, NA, BATCHED, D, CT, BIG, mask3)
            sq = tl.zeros_like(x[0])
            for k in tl.static_range(D):
                e1 = x[k] - y1[k]
                e2 = x[k] - y2[k]
                sq += e1 * e1 + e2 * e2
            acc += tl.where(mask, tl.sum(sq, axis=1), 0.0)
        tl.store(PARTIAL + b * tl.num_programs(0) + tl.program_id(0), tl.sum(acc, axis=0))


_NO_SPECIALIZE = ["N", "W0", "W1", "W2", "SEED_LO", "SEED_HI", "NOISE_SCALE_LO", "NOISE_SCALE_HI", "COUNT", *SIZE_ARGS]

icon_forward = triton.autotune(configs=forward_configs(), key=["N", "NF", "D"])(
    triton.jit(_icon, do_not_specialize=_NO_SPECIALIZE))
icon_backward = triton.jit(_icon, do_not_specialize=_NO_SPECIALIZE)
