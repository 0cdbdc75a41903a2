"""The points a penalty (GradICON, ICON) is evaluated at, computed per point from its flat index:
``id[..., ::stride, ...] + noise_scale * noise`` (docs/conventions.md §2), the counterpart of
``csrc/penalty_points.h``.

The noise is either read from a (1, d, *counts) tensor or drawn in the kernel: point p takes the
first d of the four normal numbers ``tl.randn4x(seed, p)`` (Philox keyed by the seed, counter =
the flat point index, shared by the batch), which is what ``gradicon_fast.ops.normal_noise``
materialises; the backward kernels draw the same numbers again instead of storing them.

Float scalars (``noise_scale``, ``delta``) reach the kernels as the bits of a float64 so that
float64 kernels see them unrounded; ``scalar_from_bits`` rounds them once to the compute type, as
PyTorch rounds a Python scalar to the tensor's dtype. These bits and the seed are 64-bit ints,
passed as two int32 halves (``split64``/``join64``): torch.compile (Inductor, torch 2.11) fails on
a user Triton kernel's int argument beyond the int32 range.
"""

import struct

import triton
import triton.language as tl

from .sampling import as_index, grid_coordinate


def float_bits(value: float) -> int:
    """The bits of ``value`` as a float64, as a signed 64-bit int."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def split64(value: int) -> tuple[int, int]:
    """The 64 bits of ``value`` as two kernel arguments (low, high), each a signed 32-bit int."""
    bits = int(value) & 0xFFFF_FFFF_FFFF_FFFF
    return tuple(h - (1 << 32) if h >= (1 << 31) else h for h in (bits & 0xFFFF_FFFF, bits >> 32))


@triton.jit
def join64(LO, HI):
    """The int64 that split64 split."""
    low = tl.cast(tl.cast(LO, tl.int32), tl.uint32, bitcast=True).to(tl.int64)  # zero-extended
    return (tl.cast(HI, tl.int32).to(tl.int64) << 32) | low


@triton.jit
def scalar_from_bits(LO, HI, CT: tl.constexpr):
    return join64(LO, HI).to(tl.float64, bitcast=True).to(CT)


@triton.jit
def penalty_scalars(SEED_LO, SEED_HI, NOISE_SCALE_LO, NOISE_SCALE_HI, CT: tl.constexpr):
    """(seed, noise_scale) of a penalty kernel, from their halves."""
    return join64(SEED_LO, SEED_HI), scalar_from_bits(NOISE_SCALE_LO, NOISE_SCALE_HI, CT)


@triton.jit
def tile_points(t, n, TILE: tl.constexpr, BLOCK: tl.constexpr, BIG: tl.constexpr):
    """Flat indices (and mask) of step ``t`` of a loss kernel's walk over its tile of TILE points."""
    offs = as_index(tl.program_id(0), BIG) * TILE + t + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def store_partial(PARTIAL, acc):
    """A loss kernel's partial sum: program (t, b) writes entry b · programs + t."""
    tl.store(PARTIAL + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def as_columns(x, D: tl.constexpr):
    """A D-tuple of [BLOCK] coordinates as [BLOCK, 1] (one point per row)."""
    out = ()
    for k in tl.static_range(D):
        out = out + (x[k][:, None],)
    return out


@triton.jit
def penalty_point(p, counts, grid, stride, NOISE, n, seed, noise_scale, HAS_NOISE: tl.constexpr,
                  D: tl.constexpr, CT: tl.constexpr, mask):
    """The penalty points of flat indices ``p`` (a D-tuple of coordinates)."""
    if D == 3:
        rest = p // counts[2]
        index = (rest // counts[1], rest % counts[1], p % counts[2])
    else:
        index = (p // counts[1], p % counts[1])
    if HAS_NOISE:
        noise = ()
        for k in tl.static_range(D):
            noise = noise + (tl.load(NOISE + k * n + p, mask=mask, other=0.0).to(CT),)
    else:
        r0, r1, r2, r3 = tl.randn4x(seed, p)
        if D == 3:
            noise = (r0.to(CT), r1.to(CT), r2.to(CT))
        else:
            noise = (r0.to(CT), r1.to(CT))
    x = ()
    for k in tl.static_range(D):
        scaled = noise_scale * noise[k]  # rounded before the add, as the reference does
        x = x + (grid_coordinate(index[k] * stride, grid[k], CT) + scaled,)
    return x
