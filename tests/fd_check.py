"""Checking a float32 finite-difference GradICON (value and gradients) against the exact penalty.

The penalty's residual r_k(x) = (e(x) - e(x + δ ê_k)) / δ divides differences of O(1) coordinates
by δ = 1e-3, so every float32 implementation, the reference included, carries rounding noise of
~1e-4 of a residual, more where a chain's Jacobians multiply it. Two things make a fixed
tolerance on the gradients fail correct code now and then:

* Kinks. The derivative of r_k with respect to a field applied before (inside) field m carries
  the slope of m where m is sampled, over δ. That slope jumps at m's grid lines and where clamping
  starts at its border. A coordinate within float32 rounding of such a line lands on either side
  depending on the order of operations, and the gradient entries of the inner fields next to that
  point change by (jump in slope) / δ times the point's weight: by more than the whole gradient's
  norm. fd_kink_entries finds these entries from the geometry (in float64).
* Uneven noise. A gradient entry dominated by a few points whose δ-shifted companions straddle a
  grid line is far larger than its neighbours and so is its rounding noise: relative to the
  field's largest entry it reached 8.6e-3 in 2400 draws of test_cpu_parity's inputs.
  jittered_gradients measures that noise for the draw at hand: the exact penalty's gradients when
  every coordinate of the chain is moved by a random float32 rounding.

check_fd holds each entry to FD_TOL of its field's largest entry plus JITTER_FACTOR times its own
measured noise, and exempts the kink entries (they only need to be finite): the 2^d cell corners,
per inner field, of each point with a coordinate within KINK_MARGIN of a kink, usually none or a
few percent of the entries (up to a quarter on fields of 2-7 voxels a side). A wrong corner weight
(off by 0.2 %), a dropped term or a wrong δ shows on many entries, and fails.
"""

import torch

from gradicon_fast import reference as R

FD_TOL = {torch.float64: 1e-10, torch.float32: 1e-3}  # δ = 1e-3 amplifies float32 rounding

# How close (in [0, 1] coordinate units) a sampled coordinate must come to a kink of a field's
# interpolant for float32 rounding to put it on the other side. Measured over 100 draws of the
# float32 test inputs (chains of up to eight fields, coordinates up to ~2): float32 sample
# coordinates at most 8.8 units of 2^-23 from the float64 ones, plus ~1 for rounding the points
# themselves; 32 units leaves room for a kernel that rounds in another order.
KINK_MARGIN = 2.0 ** -18

# An entry may differ from the exact penalty by JITTER_FACTOR times the largest change that
# JITTER_DRAWS random float32-sized roundings of every coordinate make to it (plus FD_TOL of its
# field's scale). With two draws, one of 2400 test_cpu_parity draws came out 1.12 times over: its
# two roundings happened to leave the worst entry nearly unchanged (four gave 0.23).
JITTER_FACTOR = 4.0
JITTER_DRAWS = 4


def sample_coordinates(chain, points):
    """The coordinates (B|1, d, *P) at which each field of ``chain`` is sampled, in float64.

    The last field is applied first: ``chain[-1]`` is sampled at ``points``, ``chain[-2]`` at
    ``points`` moved by it, and so on (docs/conventions.md §1)."""
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


def _directions(fields, n_ab, symmetric):
    """The chains of the penalty's directions, as index lists into ``fields`` (outermost first)."""
    orders = [list(range(len(fields)))]
    if symmetric:
        orders.append(list(range(n_ab, len(fields))) + list(range(n_ab)))
    return orders


def fd_kink_entries(chain_ab, chain_ba, points, delta=1e-3, symmetric=False, margin=KINK_MARGIN):
    """Per field of ``chain_ab + chain_ba``, a (B_f, *S_f) bool mask of the entries whose gradient of
    the finite-difference GradICON at ``points`` (B|1, d, *P) may take a term that a float32 rounding
    changes by a jump in slope over δ (all channels of an entry alike).

    For each point and each of its δ-shifted companions, in each direction of the penalty: where
    field m is sampled within ``margin`` of a kink, the cell corners at which every field applied
    before m is sampled for that same point are marked.
    """
    fields = list(chain_ab) + list(chain_ba)
    masks = [torch.zeros(f.shape[0], *f.shape[2:], dtype=torch.bool, device=f.device) for f in fields]
    d = points.shape[1]
    batch = max([f.shape[0] for f in fields] + [points.shape[0]])
    for order in _directions(fields, len(chain_ab), symmetric):
        chain = [fields[i] for i in order]
        for axis in [None] + list(range(d)):
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


def _float32_rounding(y, generator):
    """A random move of each coordinate by up to one float32 ulp of its magnitude."""
    magnitude = y.detach().abs().clamp_min(2.0 ** -10)
    ulp = torch.exp2(torch.floor(torch.log2(magnitude))) * 2.0 ** -23
    return ulp * (2 * torch.rand(y.shape, generator=generator, dtype=y.dtype).to(y.device) - 1)


def _jittered_penalty(fields, n_ab, points, delta, symmetric, generator):
    """The finite-difference GradICON in float64 with every coordinate of every chain evaluation
    moved by a float32-sized rounding: the points, and the point after each field."""
    def transform(chain, x):
        y = x + _float32_rounding(x, generator)
        for field in reversed(chain):
            y = y + R.sample(field, y)
            y = y + _float32_rounding(y, generator)
        return y

    d = points.shape[1]
    total = 0
    for order in _directions(fields, n_ab, symmetric):
        chain = [fields[i] for i in order]
        error = points - transform(chain, points)
        for k in range(d):
            shifted = points.clone()
            shifted[:, k] += delta
            total = total + torch.mean(((error - (shifted - transform(chain, shifted))) / delta) ** 2)
    return total


def jittered_gradients(fields, n_ab, points, delta=1e-3, symmetric=False, seed=0):
    """(value, gradients) of the float64 penalty of ``fields`` (float64 leaves) with random
    float32-sized roundings of the coordinates (reproducible by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    value = _jittered_penalty(fields, n_ab, points, delta, symmetric, generator)
    return value.detach(), torch.autograd.grad(value, fields)


def check_fd(got, fields, what, *, n_ab, shape, noise, stride=1, noise_scale=None, delta=1e-3, symmetric=False,
             slack=0.0):
    """A finite-difference GradICON result ``got`` = (value, gradients of ``fields``; a gradient None
    where not asked for) against the exact penalty: the reference in float64 on the inputs upcast
    exactly. ``fields``: chain_ab + chain_ba, the first ``n_ab`` of them chain_ab; the other
    arguments as gradicon_loss's.

    float64: norm-wise relative error FD_TOL (+ slack), value and gradients.
    float32: value within FD_TOL (+ slack) relative, plus JITTER_FACTOR times its measured noise;
    each gradient entry within FD_TOL (+ slack) of its field's largest entry plus JITTER_FACTOR
    times its own measured noise; the entries next to kinks only finite (see the module docstring).
    """
    value, grads = got[0].detach(), got[1]
    dtype = value.dtype
    tol = FD_TOL[dtype] + slack
    device = fields[0].device
    xs = [f.detach().double().requires_grad_(True) for f in fields]
    noise64 = noise.detach().double()
    truth = R.gradicon_loss(xs[:n_ab], xs[n_ab:], shape=shape, noise=noise64, stride=stride, delta=delta,
                            noise_scale=noise_scale, symmetric=symmetric)
    true_grads = torch.autograd.grad(truth, xs)
    truth = float(truth.detach())
    asked = [(i, g, t) for i, (g, t) in enumerate(zip(grads, true_grads)) if g is not None]
    for i, g, t in asked:
        assert g.shape == t.shape, f"{what} gradient {i}: shape {tuple(g.shape)}, expected {tuple(t.shape)}"
        assert torch.isfinite(g).all(), f"{what} gradient {i}: not finite"
    if dtype == torch.float64:
        err = abs(float(value) - truth) / abs(truth) if truth else abs(float(value))
        assert err <= tol, f"{what} value: {float(value)!r} against {truth!r} (relative error {err:.3g})"
        num = sum(float(((g.double() - t) ** 2).sum()) for _, g, t in asked)
        den = sum(float((t ** 2).sum()) for _, _, t in asked)
        err = (num / den) ** 0.5 if den else num ** 0.5
        assert err <= tol, f"{what} gradients: relative error {err:.3g} > {tol:g}"
        return
    scale = noise_scale if noise_scale is not None else stride / shape[-1]
    points = R.loss_points(shape, stride, noise64, scale)
    kinks = fd_kink_entries(xs[:n_ab], xs[n_ab:], points, delta, symmetric)
    value_noise, grad_noise = 0.0, [torch.zeros_like(t) for t in true_grads]
    for seed in range(JITTER_DRAWS):
        v, gs = jittered_gradients(xs, n_ab, points, delta, symmetric, seed)
        value_noise = max(value_noise, abs(float(v) - truth))
        grad_noise = [torch.maximum(n, (j - t).abs()) for n, j, t in zip(grad_noise, gs, true_grads)]
    err = abs(float(value) - truth)
    allowed = tol * abs(truth) + JITTER_FACTOR * value_noise
    assert err <= allowed, (f"{what} value: {float(value)!r} against the float64 penalty's {truth!r} (off by "
                            f"{err:.3g}, allowed {allowed:.3g})")
    for i, g, t in asked:
        exempt = kinks[i].unsqueeze(1).expand_as(t).to(device)
        error = torch.where(exempt, 0, (g.detach().double() - t).abs())
        allowed = tol * float(t.abs().max()) + JITTER_FACTOR * grad_noise[i]
        wrong = error > allowed
        assert not wrong.any(), (
            f"{what} gradient {i} (shape {tuple(t.shape)}): {int(wrong.sum())} entries off by more than allowed "
            f"(worst {float(error[wrong].max()):.3g} against {float(allowed[wrong][error[wrong].argmax()]):.3g}; "
            f"largest entry {float(t.abs().max()):.3g}; {int(exempt[:, 0].sum())} entries next to kinks exempt)")
