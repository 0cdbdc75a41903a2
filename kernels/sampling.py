"""Per-point sampling math of the Triton kernels (docs/conventions.md §1), as ``@triton.jit`` helpers.

The same math as ``csrc/sampling.h``: a coordinate x in [0, 1] on an axis of ``size`` voxels is
the continuous index ``p = x * (size - 1)`` clamped to ``[0, size - 1]`` (border padding,
align-corners); interpolation is (bi/tri)linear; the derivative of the clamp is ``size - 1``
strictly inside and 0 at or beyond the border (as in grid_sample's backward).

Shapes. The helpers work on a block of points at once, each point possibly with E companions
that travel with it (GradICON's x and x + δ ê_k): a coordinate is a ``[BLOCK, E]`` tensor and a
point a D-tuple of them (axis order; channel k = axis k). A *cell* says where the points fall in
one sampled tensor, with the 2^D corners of each point along a third axis:

* ``offsets`` ``[BLOCK, E, 2^D]`` element offsets of the corners inside one channel (a corner
  beyond the last voxel repeats it, so every access stays inside the tensor);
* ``weights`` ``[BLOCK, E, 2^D]`` interpolation weights, Π_k (frac_k or 1 - frac_k);
* ``fracs``, ``dpdx``: D-tuples of ``[BLOCK, E]``, the position inside the cell and
  d(clamped index)/dx per axis.

Corner c takes the upper neighbour along axis k when bit D-1-k of c is set. A sampled value is
one gather of the 2^D corners and a weighted sum; a gradient scatter is one atomic add of the
2^D weighted adjoints. Keeping the corners in a tensor axis (instead of 2^D separate loads)
keeps the kernels' instruction count, and Triton's compile time, small.

Values are loaded in the tensor's dtype and converted to the compute type ``CT`` (float32, or
float64 for float64 tensors); offsets are int32, or int64 when ``BIG`` (a tensor with 2^31
elements or more).
"""

import triton
import triton.language as tl


@triton.jit
def as_index(i, BIG: tl.constexpr):
    """``i`` as the integer type offsets are computed in."""
    if BIG:
        r = i.to(tl.int64)
    else:
        r = i
    return r


@triton.jit
def div_rn(a, b, CT: tl.constexpr):
    """a / b rounded to nearest, as the reference divides (float32 ``/`` may be approximate on GPU)."""
    if CT == tl.float64:
        q = a / b
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def grid_coordinate(index, size, CT: tl.constexpr):
    """Identity coordinate ``index / (size - 1)`` (0 on an axis of size 1), computed in float64 and
    rounded once to ``CT``, as the reference's identity map is."""
    hi = tl.maximum(size - 1, 1).to(tl.float64)
    x = index.to(tl.float64) / hi
    return tl.where(size > 1, x, 0.0).to(CT)


@triton.jit
def locate_axis(x, size):
    """(lower index, fraction, has an upper neighbour, d index / dx) of coordinates ``x`` on one axis."""
    hi = tl.zeros_like(x) + (size - 1)
    p = x * hi
    inside = (p > 0) & (p < hi)
    # NaN compares false and lands on index 0: reads stay in bounds, and the NaN still reaches the
    # result through y = x + sample(D, x).
    clamped = tl.where(inside, p, tl.where(p > 0, hi, 0.0))
    index = clamped.to(tl.int32)  # clamped >= 0: truncation is floor
    # floor(clamped) == index, exactly; converting index back (sitofp) broke Triton 3.6's layout
    # pass for float64 in the analytic kernels on sm_90.
    frac = clamped - tl.floor(clamped)
    has_next = index < size - 1
    dpdx = tl.where(inside, hi, 0.0)
    return index, frac, has_next, dpdx


@triton.jit
def _upper(D: tl.constexpr, K: tl.constexpr):
    """[1, 1, 2^D]: whether corner c takes the upper neighbour along axis K."""
    c = tl.arange(0, 1 << D)[None, None, :]
    return ((c >> (D - 1 - K)) & 1) != 0


@triton.jit
def _factor(frac, up):
    """Per corner, the weight factor of one axis: frac or 1 - frac."""
    f = frac[:, :, None]
    return tl.where(up, f, 1 - f)


@triton.jit
def locate_cell(y, sz, D: tl.constexpr, BIG: tl.constexpr):
    """The cell (offsets, weights, fracs, dpdx) of points ``y`` in a contiguous grid of sizes ``sz``."""
    stride = as_index(tl.full([], 1, tl.int32), BIG)
    offsets = tl.zeros((1, 1, 1 << D), tl.int32)
    if BIG:
        offsets = offsets.to(tl.int64)
    fracs = ()
    dpdx = ()
    for kk in tl.static_range(D):
        # Axes from the last (stride 1) to the first.
        index, frac, has_next, dp = locate_axis(y[D - 1 - kk], sz[D - 1 - kk])
        up = _upper(D, D - 1 - kk) & has_next[:, :, None]
        offsets = offsets + (as_index(index, BIG) * stride)[:, :, None] + tl.where(up, stride, 0)
        stride = stride * sz[D - 1 - kk]
        fracs = (frac,) + fracs
        dpdx = (dp,) + dpdx
    weights = _factor(fracs[0], _upper(D, 0))
    for k in tl.static_range(1, D):
        weights = weights * _factor(fracs[k], _upper(D, k))
    return offsets, weights, fracs, dpdx


@triton.jit
def gather_corners(ptr, cell, mask, CT: tl.constexpr):
    """The 2^D corner values of one channel, [BLOCK, E, 2^D]; ``mask`` is [BLOCK, 1, 1]."""
    return tl.load(ptr + cell[0], mask=mask, other=0.0).to(CT)


@triton.jit
def interpolate(ptr, cell, CT: tl.constexpr, mask):
    """Value of one channel (``ptr`` at its first voxel) at the cell's points, [BLOCK, E]."""
    return tl.sum(gather_corners(ptr, cell, mask, CT) * cell[1], axis=2)


@triton.jit
def corner_slopes(cell, D: tl.constexpr, K: tl.constexpr):
    """∂weight/∂frac_K per corner: ±Π_{j≠K} (frac_j or 1 - frac_j), [BLOCK, E, 2^D]."""
    dw = tl.where(_upper(D, K), 1.0, -1.0)
    for j in tl.static_range(D):
        if j != K:
            dw = dw * _factor(cell[2][j], _upper(D, j))
    return dw


@triton.jit
def corner_curvatures(cell, D: tl.constexpr, K: tl.constexpr, J: tl.constexpr):
    """∂²weight/∂frac_K∂frac_J per corner (K ≠ J): ±Π_{i≠K,J} (frac_i or 1 - frac_i)."""
    dw = tl.where(_upper(D, K) == _upper(D, J), 1.0, -1.0)
    for i in tl.static_range(D):
        if i != K and i != J:
            dw = dw * _factor(cell[2][i], _upper(D, i))
    return dw


@triton.jit
def _gradient_from_corners(v, cell, D: tl.constexpr):
    """The interpolant's gradient from its corner values ``v``: a D-tuple, entry k = ∂f/∂x_k."""
    grad = ()
    for k in tl.static_range(D):
        grad = grad + (tl.sum(v * corner_slopes(cell, D, k), axis=2) * cell[3][k],)
    return grad


@triton.jit
def interpolate_gradient(ptr, cell, D: tl.constexpr, CT: tl.constexpr, mask):
    """Gradient of one channel with respect to the coordinates: a D-tuple, entry k = ∂f/∂x_k."""
    return _gradient_from_corners(gather_corners(ptr, cell, mask, CT), cell, D)


@triton.jit
def interpolate_with_gradient(ptr, cell, D: tl.constexpr, CT: tl.constexpr, mask):
    """(value, gradient D-tuple, corner values) of one channel from one gather."""
    v = gather_corners(ptr, cell, mask, CT)
    return tl.sum(v * cell[1], axis=2), _gradient_from_corners(v, cell, D), v


@triton.jit
def scatter(gptr, channel_stride, cell, a, C: tl.constexpr, E: tl.constexpr, mask):
    """grad[ch][corners] += a[ch] * weight for the C channels of ``a`` (a C-tuple of [BLOCK, E]),
    by atomic adds. With E > 1 companions, where all E points of a row lie in the same cell (the
    common case for x and x + δ ê_k) their contributions are summed first and each voxel gets one
    atomic add instead of E."""
    offsets = cell[0]
    weights = cell[1]
    if E == 1:
        for ch in tl.static_range(C):
            tl.atomic_add(gptr + ch * channel_stride + offsets, a[ch][:, :, None] * weights, mask=mask,
                          sem="relaxed")
    else:
        lowest = tl.min(offsets, axis=1)  # [BLOCK, 2^D]
        merged = tl.max(tl.max(offsets, axis=1) - lowest, axis=1) == 0  # [BLOCK]
        together = mask & merged[:, None, None]
        apart = mask & (merged == 0)[:, None, None]
        for ch in tl.static_range(C):
            contrib = a[ch][:, :, None] * weights
            tl.atomic_add(gptr + ch * channel_stride + lowest[:, None, :], tl.sum(contrib, axis=1)[:, None, :],
                          mask=together, sem="relaxed")
            tl.atomic_add(gptr + ch * channel_stride + offsets, contrib, mask=apart, sem="relaxed")
