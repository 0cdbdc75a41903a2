"""Triton kernel: an image warped by a chain, ``warped = sample(I, φ(id))`` on a chosen grid (docs/conventions.md §1).

One source, two compiled kernels: ``warp_forward`` (autotuned on GPU) writes the warped image;
``warp_backward`` runs the chain again, scatters ``∂L/∂I`` into the image's gradient buffer and
carries ``Σ_c ∂L/∂warped_c · ∇I_c`` back through the chain (field gradients by atomic adds).
Grid: (output-point blocks, batch). The image is (B|1, C, *S_I), the output (B, C, *shape).
"""

import triton
import triton.language as tl

from .chain import block_points, chain_backward, chain_forward, chain_kernels
from .sampling import as_index, grid_coordinate, interpolate, interpolate_gradient, locate_cell, scatter


@triton.jit
def grid_point(offs, shape, D: tl.constexpr, CT: tl.constexpr):
    """Identity coordinates of flat indices ``offs`` of a grid of sizes ``shape``: a D-tuple of [BLOCK, 1]."""
    if D == 3:
        i2 = offs % shape[2]
        rest = offs // shape[2]
        x = (grid_coordinate(rest // shape[1], shape[0], CT)[:, None],
             grid_coordinate(rest % shape[1], shape[1], CT)[:, None], grid_coordinate(i2, shape[2], CT)[:, None])
    else:
        x = (grid_coordinate(offs // shape[1], shape[0], CT)[:, None],
             grid_coordinate(offs % shape[1], shape[1], CT)[:, None])
    return x


def _warp(
    IMG, OUT, GRAD_OUT, GRAD_IMG, CHANNELS, N, IA, IB, IC, OA, OB, OC, CHAIN,
    STOP: tl.constexpr, IMG_BATCHED: tl.constexpr, BACKWARD: tl.constexpr, IMAGE_GRAD: tl.constexpr,
    D: tl.constexpr, F64: tl.constexpr, BIG: tl.constexpr, BLOCK: tl.constexpr,
):
    fields, grads, sizes = CHAIN
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    b, n = tl.program_id(1), as_index(N, BIG)
    offs, mask = block_points(n, BLOCK, BIG)
    mask3 = mask[:, None, None]
    x = grid_point(offs, (OA, OB, OC), D, CT)
    end, stash = chain_forward(x, fields, grads, sizes, b, NF, 0, BATCHED, D, CT, BIG, mask3)
    cell = locate_cell(end, (IA, IB, IC), D, BIG)
    if D == 3:
        image_channel = as_index(IA, BIG) * IB * IC
    else:
        image_channel = as_index(IA, BIG) * IB
    if IMG_BATCHED:
        img_row = as_index(b, BIG) * CHANNELS * image_channel
    else:
        img_row = as_index(b, BIG) * 0 * image_channel
    out_row = as_index(b, BIG) * CHANNELS * n
    if BACKWARD:
        a = ()
        for k in tl.static_range(D):
            a = a + (tl.zeros_like(end[0]),)
        for c in range(CHANNELS):
            g = tl.load(GRAD_OUT + out_row + c * n + offs, mask=mask, other=0.0).to(CT)[:, None]
            if IMAGE_GRAD:
                scatter(GRAD_IMG + img_row + c * image_channel, 0, cell, (g,), 1, 1, mask3)
            if STOP >= 0:
                gi = interpolate_gradient(IMG + img_row + c * image_channel, cell, D, CT, mask3)
                upd = ()
                for k in tl.static_range(D):
                    upd = upd + (a[k] + g * gi[k],)
                a = upd
        if STOP >= 0:
            chain_backward(a, stash, fields, grads, sizes, b, NF, 0, BATCHED, GMASK, STOP, 1, D, CT, BIG, mask3)
    else:
        # 0 for a finite point, NaN otherwise: a non-finite map never gives a finite image
        # (clamping alone would sample the border).
        poison = end[0] - end[0]
        for k in tl.static_range(1, D):
            poison += end[k] - end[k]
        for c in range(CHANNELS):
            v = interpolate(IMG + img_row + c * image_channel, cell, CT, mask3) + poison
            tl.store(OUT + out_row + c * n + offs, tl.sum(v, axis=1).to(OUT.dtype.element_ty), mask=mask)


warp_forward, warp_backward = chain_kernels(_warp, ["CHANNELS", "N", "IA", "IB", "IC", "OA", "OB", "OC"],
                                            ["N", "NF", "D", "CHANNELS"])
