"""Per-point sampling math of the Triton kernels (SPEC §1), as ``@triton.jit`` helpers.

The same math as ``csrc/sampling.h``: a coordinate x in [0, 1] on an axis of ``size`` voxels is
the continuous index ``p = x * (size - 1)`` clamped to ``[0, size - 1]`` (border padding,
align-corners); interpolation is separable linear, last axis first; the derivative of the clamp
is ``size - 1`` strictly inside and 0 at or beyond the border (as in grid_sample's backward).

Every helper works on one block of points at once: a coordinate is a ``[BLOCK]`` tensor, a point
is a tuple of D coordinates (axis order, channel k = axis k), a *cell* is the tuple
``(base, steps, fracs, dpdx)`` that says where a point falls in one sampled tensor:

* ``base``  element offset of the lower corner inside one channel;
* ``steps`` per axis, the element offset from the lower to the upper corner (0 when the lower
  corner is the last voxel, so that every read stays inside the tensor);
* ``fracs`` per axis, the position inside the cell, in [0, 1);
* ``dpdx``  per axis, d(clamped index)/dx.

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
    frac = clamped - index.to(x.dtype)
    has_next = index < size - 1
    dpdx = tl.where(inside, hi, 0.0)
    return index, frac, has_next, dpdx


@triton.jit
def locate_cell(y, sz, D: tl.constexpr, BIG: tl.constexpr):
    """The cell of points ``y`` (a D-tuple) in a contiguous grid of sizes ``sz`` (axis order)."""
    if D == 3:
        i0, f0, n0, d0 = locate_axis(y[0], sz[0])
        i1, f1, n1, d1 = locate_axis(y[1], sz[1])
        i2, f2, n2, d2 = locate_axis(y[2], sz[2])
        s1 = as_index(sz[2], BIG)
        s0 = s1 * sz[1]
        base = as_index(i0, BIG) * s0 + as_index(i1, BIG) * s1 + as_index(i2, BIG)
        steps = (tl.where(n0, s0, 0), tl.where(n1, s1, 0), tl.where(n2, 1, 0))
        fracs = (f0, f1, f2)
        dpdx = (d0, d1, d2)
    else:
        i0, f0, n0, d0 = locate_axis(y[0], sz[0])
        i1, f1, n1, d1 = locate_axis(y[1], sz[1])
        s0 = as_index(sz[1], BIG)
        base = as_index(i0, BIG) * s0 + as_index(i1, BIG)
        steps = (tl.where(n0, s0, 0), tl.where(n1, 1, 0))
        fracs = (f0, f1)
        dpdx = (d0, d1)
    return base, steps, fracs, dpdx


@triton.jit
def same_cell(a, b, D: tl.constexpr):
    """Per point: do cells ``a`` and ``b`` have the same corners?"""
    same = a[0] == b[0]
    for k in tl.static_range(D):
        same = same & (a[1][k] == b[1][k])
    return same


@triton.jit
def lerp(a, b, t):
    return a + t * (b - a)


@triton.jit
def _load(ptr, mask, CT: tl.constexpr):
    return tl.load(ptr, mask=mask, other=0.0).to(CT)


@triton.jit
def interpolate(ptr, cell, D: tl.constexpr, CT: tl.constexpr, mask):
    """Value of one channel (``ptr`` at its first voxel) at ``cell``."""
    p = ptr + cell[0]
    st = cell[1]
    fr = cell[2]
    if D == 3:
        c00 = lerp(_load(p, mask, CT), _load(p + st[2], mask, CT), fr[2])
        c01 = lerp(_load(p + st[1], mask, CT), _load(p + st[1] + st[2], mask, CT), fr[2])
        c10 = lerp(_load(p + st[0], mask, CT), _load(p + st[0] + st[2], mask, CT), fr[2])
        c11 = lerp(_load(p + st[0] + st[1], mask, CT), _load(p + st[0] + st[1] + st[2], mask, CT), fr[2])
        value = lerp(lerp(c00, c01, fr[1]), lerp(c10, c11, fr[1]), fr[0])
    else:
        c0 = lerp(_load(p, mask, CT), _load(p + st[1], mask, CT), fr[1])
        c1 = lerp(_load(p + st[0], mask, CT), _load(p + st[0] + st[1], mask, CT), fr[1])
        value = lerp(c0, c1, fr[0])
    return value


@triton.jit
def interpolate_gradient(ptr, cell, D: tl.constexpr, CT: tl.constexpr, mask):
    """Gradient of one channel with respect to the coordinates: a D-tuple, entry k = ∂f/∂x_k."""
    p = ptr + cell[0]
    st = cell[1]
    fr = cell[2]
    dp = cell[3]
    if D == 3:
        v000 = _load(p, mask, CT)
        v001 = _load(p + st[2], mask, CT)
        v010 = _load(p + st[1], mask, CT)
        v011 = _load(p + st[1] + st[2], mask, CT)
        v100 = _load(p + st[0], mask, CT)
        v101 = _load(p + st[0] + st[2], mask, CT)
        v110 = _load(p + st[0] + st[1], mask, CT)
        v111 = _load(p + st[0] + st[1] + st[2], mask, CT)
        c00 = lerp(v000, v001, fr[2])
        c01 = lerp(v010, v011, fr[2])
        c10 = lerp(v100, v101, fr[2])
        c11 = lerp(v110, v111, fr[2])
        g0 = (lerp(c10, c11, fr[1]) - lerp(c00, c01, fr[1])) * dp[0]
        g1 = lerp(c01 - c00, c11 - c10, fr[0]) * dp[1]
        g2 = lerp(lerp(v001 - v000, v011 - v010, fr[1]), lerp(v101 - v100, v111 - v110, fr[1]), fr[0]) * dp[2]
        grad = (g0, g1, g2)
    else:
        v00 = _load(p, mask, CT)
        v01 = _load(p + st[1], mask, CT)
        v10 = _load(p + st[0], mask, CT)
        v11 = _load(p + st[0] + st[1], mask, CT)
        g0 = (lerp(v10, v11, fr[1]) - lerp(v00, v01, fr[1])) * dp[0]
        g1 = lerp(v01 - v00, v11 - v10, fr[0]) * dp[1]
        grad = (g0, g1)
    return grad


@triton.jit
def corner(cell, CORNER: tl.constexpr, D: tl.constexpr):
    """(weight, element offset) of corner ``CORNER`` of a cell; bit D-1-k set = upper along axis k."""
    w = tl.full(cell[2][0].shape, 1.0, cell[2][0].dtype)
    offset = cell[0]
    for k in tl.static_range(D):
        if (CORNER >> (D - 1 - k)) & 1:
            w = w * cell[2][k]
            offset = offset + cell[1][k]
        else:
            w = w * (1 - cell[2][k])
    return w, offset


@triton.jit
def scatter_cell(gptr, channel_stride, cell, a, C: tl.constexpr, D: tl.constexpr, mask):
    """grad[ch][corners of cell] += a[ch] * weight for the C channels of ``a`` (atomic)."""
    for c in tl.static_range(1 << D):
        w, offset = corner(cell, c, D)
        for ch in tl.static_range(C):
            tl.atomic_add(gptr + ch * channel_stride + offset, a[ch] * w, mask=mask, sem="relaxed")


@triton.jit
def scatter_cells(gptr, channel_stride, cells, a, E: tl.constexpr, D: tl.constexpr, mask):
    """Scatter of E points travelling together (GradICON's x and x + δ ê_k): ``cells`` and ``a`` are
    E-tuples. Where all E points lie in the same cell (the common case) their contributions are
    summed first and every voxel gets one atomic add instead of E."""
    if E == 1:
        scatter_cell(gptr, channel_stride, cells[0], a[0], D, D, mask)
    else:
        merged = mask
        for e in tl.static_range(1, E):
            merged = merged & same_cell(cells[0], cells[e], D)
        for c in tl.static_range(1 << D):
            w0, offset = corner(cells[0], c, D)
            for ch in tl.static_range(D):
                v = a[0][ch] * w0
                for e in tl.static_range(1, E):
                    we, _ = corner(cells[e], c, D)
                    v += tl.where(merged, a[e][ch] * we, 0.0)
                tl.atomic_add(gptr + ch * channel_stride + offset, v, mask=mask, sem="relaxed")
        apart = mask & (merged == 0)
        for e in tl.static_range(1, E):
            scatter_cell(gptr, channel_stride, cells[e], a[e], D, D, apart)
