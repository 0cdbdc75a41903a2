"""Triton kernels: the analytic GradICON penalty of one direction (docs/conventions.md §2, ``mode="analytic"``).

``L = Σ ‖J - I‖_F² / (B·d·N)`` with J the exact Jacobian of φ = φ_AB∘φ_BA (slots: φ_AB's fields,
then φ_BA's) at the penalty points, as ``reference.gradicon_loss_analytic``. Along the chain, in
application order, field j sampled at y_j with ``G = ∇s_j(y_j)`` maps the deviation ``M = J - I``
to ``G + M + G M`` (no cancellation from forming J first) and y_j to ``y_j + s_j(y_j)``.

* ``gradicon_analytic_forward`` (autotuned on GPU): per-program partial sums of Σ M² over TILE
  points, as GradICON's.
* ``gradicon_analytic_backward``: the forward pass again, keeping (y_j, M_j) per field, then the
  reverse pass: with Ā = ∂L/∂M_{j+1} and ȳ = ∂L/∂y_{j+1},
  ``Ḡ = Ā (I + M_j)ᵀ``, ``∂L/∂corner value = ȳ_c w + Σ_k Ḡ_ck ∂w/∂x_k``,
  ``ȳ ← ȳ + Gᵀ ȳ + Σ_cm Ḡ_cm ∇G_cm`` (∇G from the interpolant's mixed second derivatives) and
  ``Ā ← (I + G)ᵀ Ā``. Field gradients by atomic adds.
"""

import triton
import triton.language as tl

from .chain import block_points, chain_kernels, displaced, field_at
from .penalty_points import as_columns, penalty_point, penalty_scalars, store_partial, tile_points
from .sampling import (gather_corners, as_index, corner_curvatures, corner_slopes, div_rn, interpolate_with_gradient,
                       locate_cell)


@triton.jit
def _zeros_matrix(like, D: tl.constexpr):
    m = ()
    for i in tl.static_range(D):
        row = ()
        for j in tl.static_range(D):
            row = row + (tl.zeros_like(like),)
        m = m + (row,)
    return m


@triton.jit
def _deviation_step(G, M, D: tl.constexpr):
    """G + M + G M (D×D tuples)."""
    out = ()
    for i in tl.static_range(D):
        row = ()
        for j in tl.static_range(D):
            gm = G[i][0] * M[0][j]
            for k in tl.static_range(1, D):
                gm += G[i][k] * M[k][j]
            row = row + (G[i][j] + M[i][j] + gm,)
        out = out + (row,)
    return out


@triton.jit
def jacobian_forward(y, fields, grads, sizes, b, NF: tl.constexpr, BATCHED: tl.constexpr, D: tl.constexpr,
                     CT: tl.constexpr, BIG: tl.constexpr, mask):
    """J - I of the composed chain at points ``y`` (a D-tuple of [BLOCK, 1]), and the stash of
    (y_j, M_j) at which each field was sampled (application order)."""
    M = _zeros_matrix(y[0], D)
    stash = ()
    for jj in tl.static_range(NF):
        ptr, _, sz, cs = field_at(fields, grads, sizes, NF - 1 - jj, BATCHED, b, D, BIG)
        stash = stash + ((y, M),)
        cell = locate_cell(y, sz, D, BIG)
        s = ()
        G = ()
        for c in tl.static_range(D):
            value, gradient, _ = interpolate_with_gradient(ptr + c * cs, cell, D, CT, mask)
            s = s + (value,)
            G = G + (gradient,)
        M = _deviation_step(G, M, D)
        y = displaced(y, s, D)
    return M, stash


@triton.jit
def jacobian_backward(A, stash, fields, grads, sizes, b, NF: tl.constexpr, BATCHED: tl.constexpr,
                      GMASK: tl.constexpr, STOP: tl.constexpr, D: tl.constexpr, CT: tl.constexpr, BIG: tl.constexpr,
                      mask):
    """Reverse pass of ``jacobian_forward`` from Ā = ∂L/∂M (D×D); field gradients by atomic adds
    into the slots whose GMASK bit is set, through the composed chain's fields 0 … STOP."""
    ybar = ()
    for k in tl.static_range(D):
        ybar = ybar + (tl.zeros_like(A[0][0]),)
    for i in tl.static_range(NF):
        if i <= STOP:
            ptr, gptr, sz, cs = field_at(fields, grads, sizes, i, BATCHED, b, D, BIG)
            y = stash[NF - 1 - i][0]
            M = stash[NF - 1 - i][1]
            cell = locate_cell(y, sz, D, BIG)
            dp = cell[3]
            slopes = ()
            for k in tl.static_range(D):
                slopes = slopes + (corner_slopes(cell, D, k),)
            # Ḡ = Ā (I + M)ᵀ
            Gbar = ()
            for c in tl.static_range(D):
                row = ()
                for k in tl.static_range(D):
                    v = A[c][k]
                    for m in tl.static_range(D):
                        v += A[c][m] * M[k][m]
                    row = row + (v,)
                Gbar = Gbar + (row,)
            if (GMASK >> i) & 1:
                for c in tl.static_range(D):
                    contrib = ybar[c][:, :, None] * cell[1]
                    for k in tl.static_range(D):
                        contrib += (Gbar[c][k] * dp[k])[:, :, None] * slopes[k]
                    tl.atomic_add(gptr + c * cs + cell[0], contrib, mask=mask, sem="relaxed")
            if i < STOP:
                ynew = ybar
                Anew = A
                for c in tl.static_range(D):
                    v = gather_corners(ptr + c * cs, cell, mask, CT)
                    G_c = ()
                    for k in tl.static_range(D):
                        G_c = G_c + (tl.sum(v * slopes[k], axis=2) * dp[k],)
                    upd = ()
                    for k in tl.static_range(D):
                        t = ynew[k] + ybar[c] * G_c[k]
                        for m in tl.static_range(D):
                            if m != k:
                                h = tl.sum(v * corner_curvatures(cell, D, m, k), axis=2) * dp[m] * dp[k]
                                t += Gbar[c][m] * h
                        upd = upd + (t,)
                    ynew = upd
                    rows = ()
                    for m in tl.static_range(D):
                        row = ()
                        for j in tl.static_range(D):
                            row = row + (Anew[m][j] + G_c[m] * A[c][j],)
                        rows = rows + (row,)
                    Anew = rows
                ybar = ynew
                A = Anew
    return A


def _gradicon_analytic(
    NOISE, PARTIAL, GRAD_LOSS, N, W0, W1, W2, P0, P1, P2, STRIDE,
    SEED_LO, SEED_HI, NOISE_SCALE_LO, NOISE_SCALE_HI, COUNT, CHAIN,
    STOP: tl.constexpr, HAS_NOISE: tl.constexpr, BACKWARD: tl.constexpr,
    D: tl.constexpr, F64: tl.constexpr, BIG: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    fields, grads, sizes = CHAIN
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    b, n = tl.program_id(1), as_index(N, BIG)
    seed, noise_scale = penalty_scalars(SEED_LO, SEED_HI, NOISE_SCALE_LO, NOISE_SCALE_HI, CT)
    if BACKWARD:
        offs, mask = block_points(n, BLOCK, BIG)
        y = as_columns(penalty_point(offs, (P0, P1, P2), (W0, W1, W2), STRIDE, NOISE, n, seed, noise_scale, HAS_NOISE,
                                     D, CT, mask), D)
        M, stash = jacobian_forward(y, fields, grads, sizes, b, NF, BATCHED, D, CT, BIG, mask[:, None, None])
        # Ā = ∂L/∂M = 2 grad M / (B·d·N)
        scale = div_rn(2 * tl.load(GRAD_LOSS).to(CT), tl.cast(COUNT, CT), CT)
        A = ()
        for i in tl.static_range(D):
            row = ()
            for j in tl.static_range(D):
                row = row + (scale * M[i][j],)
            A = A + (row,)
        jacobian_backward(A, stash, fields, grads, sizes, b, NF, BATCHED, GMASK, STOP, D, CT, BIG,
                          mask[:, None, None])
    else:
        acc = tl.zeros((BLOCK,), CT)
        for t in range(0, TILE, BLOCK):
            offs, mask = tile_points(t, n, TILE, BLOCK, BIG)
            y = as_columns(penalty_point(offs, (P0, P1, P2), (W0, W1, W2), STRIDE, NOISE, n, seed, noise_scale,
                                         HAS_NOISE, D, CT, mask), D)
            M, _ = jacobian_forward(y, fields, grads, sizes, b, NF, BATCHED, D, CT, BIG, mask[:, None, None])
            sq = tl.zeros_like(y[0])
            for i in tl.static_range(D):
                for j in tl.static_range(D):
                    sq += M[i][j] * M[i][j]
            acc += tl.where(mask, tl.sum(sq, axis=1), 0.0)
        store_partial(PARTIAL, acc)


gradicon_analytic_forward, gradicon_analytic_backward = chain_kernels(
    _gradicon_analytic, ["N", "W0", "W1", "W2", "P0", "P1", "P2", "STRIDE", "SEED_LO", "SEED_HI", "NOISE_SCALE_LO",
                         "NOISE_SCALE_HI", "COUNT"], ["N", "NF", "D"])
