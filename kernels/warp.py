"""Triton kernel: an image warped by a chain, ``warped = sample(I, φ(id))`` on a chosen grid (docs/conventions.md §1).

One source, two compiled kernels: ``warp_forward`` (autotuned on GPU) writes the warped image;
``warp_backward`` runs the chain again, scatters ``∂L/∂I`` into the image's gradient buffer and
carries ``Σ_c ∂L/∂warped_c · ∇I_c`` back through the chain (field gradients by atomic adds).
Grid: (output-point blocks, batch). The image is (B|1, C, *S_I), the output (B, C, *shape).
"""

import triton
import triton.language as tl

from .chain import SIZE_ARGS, chain_backward, chain_forward
from .sampling import as_index, grid_coordinate, interpolate, interpolate_gradient, locate_cell, scatter
from .tuning import forward_configs


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
    IMG, OUT, GRAD_OUT, GRAD_IMG, CHANNELS, N, IA, IB, IC, OA, OB, OC,
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
    IMG_BATCHED: tl.constexpr, BACKWARD: tl.constexpr, IMAGE_GRAD: tl.constexpr,
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
    mask3 = mask[:, None, None]
    n = as_index(N, BIG)
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


_NO_SPECIALIZE = ["CHANNELS", "N", "IA", "IB", "IC", "OA", "OB", "OC", *SIZE_ARGS]

warp_forward = triton.autotune(configs=forward_configs(), key=["N", "NF", "D", "CHANNELS"])(
    triton.jit(_warp, do_not_specialize=_NO_SPECIALIZE))
warp_backward = triton.jit(_warp, do_not_specialize=_NO_SPECIALIZE)
