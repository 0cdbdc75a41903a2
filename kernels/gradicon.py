"""Triton kernels: the finite-difference GradICON penalty of one direction (docs/conventions.md §2).

``L = Σ_k mean(g_k²)``, ``g_k = (e(x) - e(x + δ ê_k)) / δ``, ``e(x) = x - φ(x)``, φ = φ_AB∘φ_BA
(the slots hold φ_AB's fields, then φ_BA's). Each point x travels through the composed chain
with its d shifted copies, as the columns of [BLOCK, 4] coordinates (E = d + 1 points, padded to
4), so that their reads and gradient writes hit the same cells together.

* ``gradicon_forward`` (autotuned on GPU): program (t, b) sums Σ_k Σ_c g² over the TILE points
  of tile t of batch entry b, in BLOCK-sized steps, in the compute type, and writes one partial
  sum; the host adds the partials in float64 and divides by B·d·N.
* ``gradicon_backward``: per point, the same forward pass (the noise drawn again from the seed),
  then ``∂L/∂φ(x_e)`` and the reverse pass through the chain; field gradients by atomic adds.
"""

import triton
import triton.language as tl

from .chain import SIZE_ARGS, chain_backward, chain_forward
from .penalty_points import join64, penalty_point, scalar_from_bits
from .sampling import as_index, div_rn
from .tuning import forward_configs


@triton.jit
def _shifted(x, delta, D: tl.constexpr):
    """The points (x, x + δ ê_0, …, x + δ ê_{d-1}) as the columns of [BLOCK, 4] coordinates (in 2D the
    fourth column repeats x, with a zero adjoint)."""
    col = tl.arange(0, 4)[None, :]
    pts = ()
    for k in tl.static_range(D):
        pts = pts + (x[k][:, None] + tl.where(col == k + 1, delta, 0.0),)
    return pts


@triton.jit
def _column(t, j):
    """Column j of a [BLOCK, 4] tensor, [BLOCK] (exact: one term is not zero)."""
    return tl.sum(tl.where(tl.arange(0, 4)[None, :] == j, t, 0.0), axis=1)


@triton.jit
def _fd_gradient_error(start, end, delta, D: tl.constexpr, CT: tl.constexpr):
    """g[k][c] = ((x - φ(x)) - (x_k - φ(x_k)))[c] / δ with x_k = x + δ ê_k: a D-tuple of D-tuples of [BLOCK]."""
    e0 = ()
    for c in tl.static_range(D):
        e0 = e0 + (_column(start[c] - end[c], 0),)
    g = ()
    for k in tl.static_range(D):
        gk = ()
        for c in tl.static_range(D):
            gk = gk + (div_rn(e0[c] - _column(start[c] - end[c], k + 1), delta, CT),)
        g = g + (gk,)
    return g


def _gradicon(
    NOISE, PARTIAL, GRAD_LOSS, N, W0, W1, W2, P0, P1, P2, STRIDE,
    SEED_LO, SEED_HI, NOISE_SCALE_LO, NOISE_SCALE_HI, DELTA_LO, DELTA_HI, COUNT,
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
    HAS_NOISE: tl.constexpr, BACKWARD: tl.constexpr,
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
    delta = scalar_from_bits(DELTA_LO, DELTA_HI, CT)
    if BACKWARD:
        offs = as_index(tl.program_id(0), BIG) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = penalty_point(offs, (P0, P1, P2), (W0, W1, W2), STRIDE, NOISE, n, seed, noise_scale, HAS_NOISE, D, CT,
                          mask)
        start = _shifted(x, delta, D)
        end, stash = chain_forward(start, fields, grads, sizes, b, NF, 0, BATCHED, D, CT, BIG, mask[:, None, None])
        g = _fd_gradient_error(start, end, delta, D, CT)
        # ∂L/∂φ(x_e) for L = (grad / (B·d·N)) · Σ g²: +v_kc at x_k, -Σ_k v_kc at x.
        scale = div_rn(tl.load(GRAD_LOSS).to(CT), tl.cast(COUNT, CT), CT)
        s = div_rn(2 * scale, delta, CT)
        col = tl.arange(0, 4)[None, :]
        adj = ()
        for c in tl.static_range(D):
            first = tl.zeros_like(x[0])
            a = tl.zeros_like(start[0])
            for k in tl.static_range(D):
                v = g[k][c] * s
                first -= v
                a += tl.where(col == k + 1, v[:, None], 0.0)
            adj = adj + (a + tl.where(col == 0, first[:, None], 0.0),)
        chain_backward(adj, stash, fields, grads, sizes, b, NF, 0, BATCHED, GMASK, STOP, 4, D, CT, BIG,
                       mask[:, None, None])
    else:
        tile = as_index(tl.program_id(0), BIG) * TILE
        acc = tl.zeros((BLOCK,), CT)
        for t in range(0, TILE, BLOCK):
            offs = tile + t + tl.arange(0, BLOCK)
            mask = offs < n
            x = penalty_point(offs, (P0, P1, P2), (W0, W1, W2), STRIDE, NOISE, n, seed, noise_scale, HAS_NOISE, D,
                              CT, mask)
            start = _shifted(x, delta, D)
            end, _ = chain_forward(start, fields, grads, sizes, b, NF, 0, BATCHED, D, CT, BIG, mask[:, None, None])
            g = _fd_gradient_error(start, end, delta, D, CT)
            sq = tl.zeros_like(acc)
            for k in tl.static_range(D):
                for c in tl.static_range(D):
                    sq += g[k][c] * g[k][c]
            acc += tl.where(mask, sq, 0.0)
        tl.store(PARTIAL + b * tl.num_programs(0) + tl.program_id(0), tl.sum(acc, axis=0))


_NO_SPECIALIZE = ["N", "W0", "W1", "W2", "P0", "P1", "P2", "STRIDE", "SEED_LO", "SEED_HI", "NOISE_SCALE_LO",
                  "NOISE_SCALE_HI", "DELTA_LO", "DELTA_HI", "COUNT", *SIZE_ARGS]

gradicon_forward = triton.autotune(configs=forward_configs(4), key=["N", "NF", "D"])(
    triton.jit(_gradicon, do_not_specialize=_NO_SPECIALIZE))
gradicon_backward = triton.jit(_gradicon, do_not_specialize=_NO_SPECIALIZE)
