"""Triton kernel: the penalties' seeded noise, materialised (1, d, N): channel k of point p is the
k-th of ``tl.randn4x(seed, p)`` — the numbers the penalty kernels draw for themselves, and the
ones ``csrc/philox.h`` (``gradicon_fast.ops.normal_noise``) computes on the other backends."""

import triton
import triton.language as tl

from .penalty_points import join64
from .sampling import as_index


@triton.jit(do_not_specialize=["N", "SEED_LO", "SEED_HI"])
def normal_noise_kernel(OUT, N, SEED_LO, SEED_HI, D: tl.constexpr, BIG: tl.constexpr, BLOCK: tl.constexpr):
    offs = as_index(tl.program_id(0), BIG) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    n = as_index(N, BIG)
    r0, r1, r2, r3 = tl.randn4x(join64(SEED_LO, SEED_HI), offs)
    ty = OUT.dtype.element_ty
    tl.store(OUT + offs, r0.to(ty), mask=mask)
    tl.store(OUT + n + offs, r1.to(ty), mask=mask)
    if D >= 3:
        tl.store(OUT + 2 * n + offs, r2.to(ty), mask=mask)
    if D >= 4:
        tl.store(OUT + 3 * n + offs, r3.to(ty), mask=mask)
