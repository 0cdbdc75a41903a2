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

from .chain import block_points, chain_backward, chain_forward, chain_kernels
from .penalty_points import penalty_point, penalty_scalars, scalar_from_bits, store_partial, tile_points
from .sampling import as_index, div_rn


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
    SEED_LO, SEED_HI, NOISE_SCALE_LO, NOISE_SCALE_HI, DELTA_LO, DELTA_HI, COUNT, CHAIN,
    STOP: tl.constexpr, HAS_NOISE: tl.constexpr, BACKWARD: tl.constexpr,
    D: tl.constexpr, F64: tl.constexpr, BIG: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    fields, grads, sizes = CHAIN
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    delta = scalar_from_bits(DELTA_LO, DELTA_HI, CT)
    seed, noise_scale = penalty_scalars(SEED_LO, SEED_HI, NOISE_SCALE_LO, NOISE_SCALE_HI, CT)
    b, n = tl.program_id(1), as_index(N, BIG)
    if BACKWARD:
        offs, mask = block_points(n, BLOCK, BIG)
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
        acc = tl.zeros((BLOCK,), CT)
        for t in range(0, TILE, BLOCK):
            offs, mask = tile_points(t, n, TILE, BLOCK, BIG)
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
        store_partial(PARTIAL, acc)


gradicon_forward, gradicon_backward = chain_kernels(
    _gradicon, ["N", "W0", "W1", "W2", "P0", "P1", "P2", "STRIDE", "SEED_LO", "SEED_HI", "NOISE_SCALE_LO",
                "NOISE_SCALE_HI", "DELTA_LO", "DELTA_HI", "COUNT"], ["N", "NF", "D"], points_per_row=4)
