"""Shared fixtures and helpers for the test suite.

Randomised tests draw their inputs from the `rng` fixture, a generator seeded afresh on every run
(from os.urandom); the seed is printed, so pytest shows it with a failure. To rerun with that seed,
set GRADICON_FAST_TEST_SEED (a decimal integer), e.g.

    GRADICON_FAST_TEST_SEED=3943008167 python -m pytest "tests/test_cpu_kernel_paths.py::test_x[...]"

Every test that takes `rng` then draws the same inputs as in the failing run.
"""

import os

import pytest
import torch

import gradicon_fast as gf

HAS_CPU_KERNELS = gf.backends()["cpu"]
HAS_CUDA = torch.cuda.is_available()

requires_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="the C++ extension is not built")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


SEED_VARIABLE = "GRADICON_FAST_TEST_SEED"


def drawn_seed():
    """The seed for the `rng` fixture: GRADICON_FAST_TEST_SEED if set, else 32 fresh random bits."""
    forced = os.environ.get(SEED_VARIABLE, "").strip()
    if not forced:
        return int.from_bytes(os.urandom(4), "little")
    try:
        return int(forced)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VARIABLE} must be a decimal integer, got {forced!r}") from None


@pytest.fixture
def rng():
    """A seeded generator: fresh inputs every run unless GRADICON_FAST_TEST_SEED forces the seed;
    the seed is printed (pytest shows it on failure)."""
    seed = drawn_seed()
    print(f"generator seed: {seed} (rerun with {SEED_VARIABLE}={seed})")
    return torch.Generator().manual_seed(seed)


# ---- random inputs shared by the foundation tests ------------------------------------------------
# Every helper takes the test's `rng` generator so that the printed seed reproduces the inputs.


def rand_uniform(generator, shape, lo=0.0, hi=1.0, dtype=torch.float64):
    """Uniform numbers in [lo, hi) drawn from ``generator``."""
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)


def random_field(generator, batch, shape, magnitude, dtype=torch.float64):
    """A rough displacement field (batch, d, *shape): independent uniform values in [-magnitude, magnitude]."""
    return rand_uniform(generator, (batch, len(shape), *shape), -magnitude, magnitude, dtype)


def smooth_field(generator, batch, shape, magnitude, dtype=torch.float64, control=3):
    """A smooth displacement field: uniform values on a ``control``-per-axis grid, upsampled (bi/trilinear).

    Its values lie in [-magnitude, magnitude]; with few control points it is smooth but not affine.
    """
    d = len(shape)
    coarse = rand_uniform(generator, (batch, d, *([control] * d)), -magnitude, magnitude, torch.float64)
    mode = "bilinear" if d == 2 else "trilinear"
    fine = torch.nn.functional.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)
    return fine.to(dtype).contiguous()


def random_shape(generator, d, lo=3, hi=8):
    """A random spatial shape with sizes in [lo, hi], never cubic (at least two sizes differ)."""
    while True:
        shape = tuple(int(s) for s in torch.randint(lo, hi + 1, (d,), generator=generator))
        if len(set(shape)) > 1:
            return shape


def random_chain(generator, d, batch, length, magnitude, dtype=torch.float64, lo=3, hi=8, smooth=False,
                 broadcast=True):
    """A chain of ``length`` fields of different random non-cubic resolutions.

    With ``broadcast`` and batch > 1, the second field has batch size 1 (it broadcasts over the batch).
    """
    chain = []
    for i in range(length):
        shape = random_shape(generator, d, lo, hi)
        b = 1 if (broadcast and batch > 1 and i == 1) else batch
        make = smooth_field if smooth else random_field
        chain.append(make(generator, b, shape, magnitude, dtype))
    return chain


def random_points(generator, batch, d, points_shape, lo=-0.3, hi=1.3, dtype=torch.float64):
    """Points (batch, d, *points_shape) uniform in [lo, hi]^d: some fall outside [0, 1]."""
    return rand_uniform(generator, (batch, d, *points_shape), lo, hi, dtype)


def relative_error(got, expected):
    """Norm-wise relative error ||got - expected|| / ||expected|| over tensors or lists of tensors."""
    if isinstance(got, torch.Tensor):
        got, expected = [got], [expected]
    got, expected = [g.detach() for g in got], [e.detach() for e in expected]
    num = sum(float(((g.double() - e.double()) ** 2).sum()) for g, e in zip(got, expected))
    den = sum(float((e.double() ** 2).sum()) for e in expected)
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def leaves(tensors):
    """Detached copies of ``tensors`` that require grad."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ---- finite-difference GradICON in float32 --------------------------------------------------------
#
# The penalty's residual r_k(x) = (e(x) - e(x + δ ê_k)) / δ is differentiated with respect to the
# fields. Its derivative with respect to a field applied before (inside) field m carries the slope
# of field m at the point where m is sampled, divided by δ. That slope jumps at m's grid lines (and
# where clamping starts at its border). A coordinate within float32 rounding of such a line lands
# on either side depending on the order of operations, so a correct float32 kernel and the float32
# reference may each differ from the float64 penalty there by (jump in slope) / δ times that
# point's weight: on a few gradient entries, by far more than the whole gradient's norm. These
# entries are a property of the finite-difference penalty, not of a kernel, and are known from the
# geometry: fd_kink_entries finds them; check_fd holds every other entry to a tight tolerance.

FD_TOL = {torch.float64: 1e-10, torch.float32: 1e-3}  # δ = 1e-3 amplifies float32 rounding

# How close (in [0, 1] coordinate units) a sampled coordinate must come to a kink of a field's
# interpolant for float32 rounding to put it on the other side: float32 coordinates of a chain
# differ from the float64 ones by under 2^-22 (about one ulp of 1.0; measured: at most 0.75 ulp);
# eight times that covers a kernel that rounds in another order.
KINK_MARGIN = 2.0 ** -19


def sample_coordinates(chain, points):
    """The coordinates (B|1, d, *P) at which each field of ``chain`` is sampled, in float64.

    The last field is applied first: ``chain[-1]`` is sampled at ``points``, ``chain[-2]`` at
    ``points`` moved by it, and so on (docs/conventions.md §1)."""
    from gradicon_fast import reference as R

    coords = [None] * len(chain)
    y = points.detach().double()
    for t in range(len(chain) - 1, -1, -1):
        coords[t] = y
        y = y + R.sample(chain[t].detach().double(), y)
    return coords


def near_kink(coords, sizes, margin=KINK_MARGIN):
    """(B, *P) bool: the coordinates within ``margin`` of a kink of a field of spatial ``sizes`` along
    any axis: a grid line, or the border where clamping starts (an axis of size 1 has none)."""
    near = torch.zeros(coords.shape[:1] + coords.shape[2:], dtype=torch.bool, device=coords.device)
    for k, n in enumerate(sizes):
        if n > 1:
            u = coords[:, k] * (n - 1)  # in voxels
            near |= (u - u.round().clamp(0, n - 1)).abs() < margin * (n - 1)
    return near


def _mark_cell_corners(mask, coords, selected):
    """Set in ``mask`` (B_f, *S) the 2^d corners of the cells holding the ``selected`` (B, N) of
    ``coords`` (B, d, N); a mask of batch 1 belongs to a field that broadcasts over the batch."""
    sizes = mask.shape[1:]
    lower = []
    for k, n in enumerate(sizes):
        u = (coords[:, k] * (n - 1)).clamp(0, n - 1)
        lower.append(u.floor().long().clamp(0, max(n - 2, 0)))
    flat = mask.view(mask.shape[0], -1)
    for corner in range(1 << len(sizes)):
        index = torch.zeros_like(lower[0])
        for k, n in enumerate(sizes):
            index = index * n + (lower[k] + ((corner >> k) & 1)).clamp(max=n - 1)
        for b in range(coords.shape[0]):
            flat[b if mask.shape[0] > 1 else 0, index[b][selected[b]]] = True


def fd_kink_entries(chain_ab, chain_ba, points, delta=1e-3, symmetric=False, margin=KINK_MARGIN):
    """Per field of ``chain_ab + chain_ba``, a (B_f, *S_f) bool mask of the entries whose gradient of
    the finite-difference GradICON at ``points`` (B|1, d, *P) may take a term that a float32 rounding
    changes by a jump in slope over δ (see above; all channels of an entry alike).

    For each point and each of its δ-shifted companions, in each direction of the penalty: where
    field m is sampled within ``margin`` of a kink, the cell corners at which every field applied
    before m is sampled for that same point are marked.
    """
    fields = list(chain_ab) + list(chain_ba)
    masks = [torch.zeros(f.shape[0], *f.shape[2:], dtype=torch.bool, device=f.device) for f in fields]
    n_ab, d = len(chain_ab), points.shape[1]
    orders = [list(range(len(fields)))]
    if symmetric:
        orders.append(list(range(n_ab, len(fields))) + list(range(n_ab)))
    batch = max([f.shape[0] for f in fields] + [points.shape[0]])
    steps = [None] + [k for k in range(d)]
    for order in orders:
        chain = [fields[i] for i in order]
        for axis in steps:
            x = points.detach().double().clone()
            if axis is not None:
                x[:, axis] += delta
            coords = sample_coordinates(chain, x)
            coords = [c.expand(batch, *c.shape[1:]).reshape(batch, d, -1) for c in coords]
            kinked = torch.zeros(batch, coords[0].shape[-1], dtype=torch.bool, device=x.device)
            for t, (field, c) in enumerate(zip(chain, coords)):  # outermost (applied last) first
                if kinked.any():
                    _mark_cell_corners(masks[order[t]], c, kinked)
                kinked |= near_kink(c, field.shape[2:], margin)
    return masks


def exact(fn, inputs):
    """(value, gradients) of fn("torch", *inputs) on the reference in float64, the inputs upcast exactly."""
    xs = leaves([x.detach().double() for x in inputs])
    y = fn("torch", *xs)
    return y.detach(), torch.autograd.grad(y, xs)


def check_fd(got, expected, fields, what, *, n_ab, shape, noise, stride=1, noise_scale=None, delta=1e-3,
             symmetric=False, slack=0.0):
    """A finite-difference GradICON result against the exact penalty: the reference in float64 on the
    inputs upcast exactly. ``got`` and ``expected``: (value, gradients of ``fields``) from the backend
    under test and from the reference in the same dtype (a gradient None where not asked for);
    ``fields``: chain_ab + chain_ba, the first ``n_ab`` of them chain_ab.

    float64: norm-wise relative error FD_TOL (+ slack), value and gradients.
    float32: value and every gradient entry within FD_TOL (+ slack) of the exact one (relative to
    the value, or to the largest entry of the field), or else no farther than 3x the float32
    reference's largest such error: rounding of the coordinates (~6e-8) over δ is ~1e-4 of a residual,
    more where a chain multiplies it, alike for every float32 implementation. Exempt (they only
    need to be finite): the entries fd_kink_entries marks, where rounding decides the side of a kink;
    a wrong weight or a lost term is off on most entries, orders of magnitude farther.
    """
    from gradicon_fast import reference as R

    dtype = got[0].dtype
    tol = FD_TOL[dtype] + slack
    xs = leaves([f.detach().double() for f in fields])
    noise64 = noise.detach().double()
    truth = R.gradicon_loss(xs[:n_ab], xs[n_ab:], shape=shape, noise=noise64, stride=stride, delta=delta,
                            noise_scale=noise_scale, symmetric=symmetric)
    true_grads = torch.autograd.grad(truth, xs)
    truth = truth.detach()
    asked = [(i, g, e, t) for i, (g, e, t) in enumerate(zip(got[1], expected[1], true_grads)) if g is not None]
    for i, g, _, t in asked:
        assert g.shape == t.shape, f"{what} gradient {i}: shape {tuple(g.shape)}, expected {tuple(t.shape)}"
        assert torch.isfinite(g).all(), f"{what} gradient {i}: not finite"
    if dtype == torch.float64:
        err = relative_error(got[0], truth)
        assert err <= tol, f"{what} value: {float(got[0])!r} against {float(truth)!r} (relative error {err:.3g})"
        err = relative_error([g for _, g, _, _ in asked], [t for _, _, _, t in asked])
        assert err <= tol, f"{what} gradients: relative error {err:.3g} > {tol:g}"
        return
    err, reference_err = relative_error(got[0], truth), relative_error(expected[0], truth)
    assert err <= max(tol, 3 * reference_err), (
        f"{what} value: {float(got[0])!r} against the float64 penalty's {float(truth)!r} (relative error "
        f"{err:.3g}; the float32 reference's {reference_err:.3g})")
    scale = noise_scale if noise_scale is not None else stride / shape[-1]
    points = R.loss_points(shape, stride, noise64, scale)
    kinks = fd_kink_entries(xs[:n_ab], xs[n_ab:], points, delta, symmetric)
    for i, g, e, t in asked:
        exempt = kinks[i].unsqueeze(1).expand_as(t)
        error = torch.where(exempt, 0, (g.detach().double() - t).abs())
        reference_error = torch.where(exempt, 0, (e.detach().double() - t).abs())
        allowed = max(tol * float(t.abs().max()), 3 * float(reference_error.max()))
        wrong = error > allowed
        assert not wrong.any(), (
            f"{what} gradient {i} (shape {tuple(t.shape)}): {int(wrong.sum())} entries off by more than "
            f"{allowed:.3g} (up to {float(error.max()):.3g}; largest entry {float(t.abs().max()):.3g}; "
            f"{int(exempt[:, 0].sum())} entries next to kinks exempt)")
