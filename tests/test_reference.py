"""The reference implementation against independent math (docs/conventions.md §1, §2, §4).

Nothing here compares the library with itself: the expected values come from hand-written NumPy
loops that follow docs/conventions.md literally, or from closed forms (affine maps, quadratic displacements).
The closed-form penalty tests also run on the fused CPU kernels when they are built.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import reference as R

from conftest import (
    HAS_CPU_KERNELS,
    rand_uniform,
    random_chain,
    random_field,
    random_points,
    random_shape,
    smooth_field,
)

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_KERNELS, reason="extension not built"))]


# ---- independent NumPy implementation of docs/conventions.md §1 ---------------------------------------------------


def np_identity(shape):
    """id[k][i] = i_k / (S_k - 1) in float64 (0 on a size-1 axis): (1, d, *shape)."""
    d = len(shape)
    out = np.zeros((1, d, *shape))
    for index in itertools.product(*[range(s) for s in shape]):
        for k in range(d):
            out[(0, k) + index] = index[k] / (shape[k] - 1) if shape[k] > 1 else 0.0
    return out


def np_sample(field, coords):
    """Border-clamped multilinear interpolation of field (B|1, C, *S) at coords (B|1, d, *P), by loops."""
    field = np.asarray(field, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64)
    d = coords.shape[1]
    sizes = field.shape[2:]
    batch = max(field.shape[0], coords.shape[0])
    points_shape = coords.shape[2:]
    flat = coords.reshape(coords.shape[0], d, -1)
    n = flat.shape[-1]
    out = np.zeros((batch, field.shape[1], n))
    for b in range(batch):
        fb = field[b if field.shape[0] > 1 else 0]
        xb = flat[b if coords.shape[0] > 1 else 0]
        for j in range(n):
            lower, frac = [], []
            for k in range(d):
                size = sizes[k]
                p = min(max(xb[k, j] * (size - 1), 0.0), size - 1.0)
                i0 = min(int(math.floor(p)), max(size - 2, 0))
                lower.append(i0)
                frac.append(p - i0)
            value = np.zeros(field.shape[1])
            for corner in itertools.product((0, 1), repeat=d):
                weight = 1.0
                index = []
                for k in range(d):
                    weight *= frac[k] if corner[k] else 1.0 - frac[k]
                    index.append(min(lower[k] + corner[k], sizes[k] - 1))
                value += weight * fb[(slice(None),) + tuple(index)]
            out[b, :, j] = value
    return out.reshape(batch, field.shape[1], *points_shape)


def np_transform(chain, points):
    """y = x; for D in reversed(chain): y = y + sample(D, y)."""
    y = np.asarray(points, dtype=np.float64)
    for field in reversed(chain):
        y = y + np_sample(field, y)
    return y


def np_gradicon(chain_ab, chain_ba, shape, stride, noise, noise_scale, delta=1e-3, symmetric=False):
    """docs/conventions.md §2 GradICON, written out: points id[::stride] + noise_scale * noise, FD of e(x) = x - φ_AB(φ_BA(x))."""
    d = len(shape)
    kept = np_identity(shape)[(slice(None), slice(None)) + (slice(None, None, stride),) * d]
    points = kept + noise_scale * np.asarray(noise, dtype=np.float64)

    def one(outer, inner):
        chain = list(outer) + list(inner)
        e0 = points - np_transform(chain, points)
        total = 0.0
        for k in range(d):
            shifted = points.copy()
            shifted[:, k] += delta
            ek = shifted - np_transform(chain, shifted)
            g = (e0 - ek) / delta
            total += np.mean(g ** 2)
        return total

    loss = one(chain_ab, chain_ba)
    if symmetric:
        loss += one(chain_ba, chain_ab)
    return loss


def np_folds(phi):
    """docs/conventions.md §4 literally: percentage of cells with negative dV (3D) or dA (2D)."""
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim == 5:
        a = phi[:, :, 1:, 1:, 1:] - phi[:, :, :-1, 1:, 1:]
        b = phi[:, :, 1:, 1:, 1:] - phi[:, :, 1:, :-1, 1:]
        c = phi[:, :, 1:, 1:, 1:] - phi[:, :, 1:, 1:, :-1]
        dv = (np.cross(a, b, axis=1) * c).sum(axis=1)
    else:
        du = phi[:, :, 1:, :-1] - phi[:, :, :-1, :-1]
        dv_ = phi[:, :, :-1, 1:] - phi[:, :, :-1, :-1]
        dv = du[:, 0] * dv_[:, 1] - du[:, 1] * dv_[:, 0]
    return 100.0 * np.mean(dv < 0)


def to_np(t):
    return t.detach().double().numpy()


# ---- identity and sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
def test_identity_map_is_index_over_size_minus_one(rng, d):
    shapes = [random_shape(rng, d, 2, 9) for _ in range(3)]
    shapes.append((1,) + random_shape(rng, d - 1, 2, 6) if d == 3 else (1, 5))  # a size-1 axis gives 0
    for shape in shapes:
        expected = np_identity(shape)
        got64 = gf.identity_map(shape, dtype=torch.float64)
        got32 = gf.identity_map(shape)
        assert got32.dtype == torch.float32 and tuple(got32.shape) == (1, d, *shape)
        assert torch.equal(got64, torch.from_numpy(expected))
        # computed in float64, rounded once to float32
        assert torch.equal(got32, torch.from_numpy(expected).float())
        for k in range(d):
            line = torch.linspace(0, 1, shape[k]) if shape[k] > 1 else torch.zeros(1)
            view = [1] * d
            view[k] = shape[k]
            # docs/conventions.md says this "equals torch.linspace(0, 1, S)"; float32 linspace is off by one ulp for
            # some sizes (e.g. 4, 7, 8): the float64-then-round definition is the one that holds.
            torch.testing.assert_close(got32[0, k], line.view(view).expand(shape), rtol=0, atol=2**-24)


def test_identity_map_size_one_axis_is_zero():
    ident = gf.identity_map((1, 4, 1))
    assert torch.all(ident[0, 0] == 0) and torch.all(ident[0, 2] == 0)
    assert torch.equal(ident[0, 1, 0, :, 0], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))


@pytest.mark.parametrize("d", [2, 3])
def test_sample_matches_handwritten_interpolation(rng, d):
    for field_batch, coord_batch in [(2, 2), (1, 3), (3, 1)]:
        shape = random_shape(rng, d, 2, 7)
        channels = int(torch.randint(1, 4, (1,), generator=rng))
        field = rand_uniform(rng, (field_batch, channels, *shape), -1, 1)
        # points in [-0.5, 1.5]: many are clamped to the border
        coords = random_points(rng, coord_batch, d, (7, 3), lo=-0.5, hi=1.5)
        got = R.sample(field, coords)
        assert tuple(got.shape) == (max(field_batch, coord_batch), channels, 7, 3)
        np.testing.assert_allclose(to_np(got), np_sample(to_np(field), to_np(coords)), rtol=0, atol=1e-12)


def test_sample_size_one_axes_and_exact_nodes(rng):
    field = rand_uniform(rng, (1, 2, 1, 5, 4), -1, 1)
    coords = random_points(rng, 1, 3, (20,), lo=-0.5, hi=1.5)
    got = R.sample(field, coords)
    np.testing.assert_allclose(to_np(got), np_sample(to_np(field), to_np(coords)), atol=1e-12)
    # a size-1 axis: the value does not depend on that coordinate
    moved = coords.clone()
    moved[:, 0] = rand_uniform(rng, moved[:, 0].shape, -2, 2)
    torch.testing.assert_close(R.sample(field, moved), got, rtol=0, atol=1e-12)
    # at the grid nodes the sample is the node value
    ident = R.identity_map((3, 5, 4), dtype=torch.float64)
    field3 = rand_uniform(rng, (2, 3, 3, 5, 4), -1, 1)
    torch.testing.assert_close(R.sample(field3, ident), field3, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_transform_points_compose_warp_semantics(rng, d, backend):
    batch = 2
    length = int(torch.randint(1, 5, (1,), generator=rng))
    chain = random_chain(rng, d, batch, length, 0.3, lo=2, hi=6)
    points = random_points(rng, 1, d, (11,), lo=-0.4, hi=1.4)
    chain_np = [to_np(f) for f in chain]
    got = gf.transform_points(chain, points, backend=backend)
    np.testing.assert_allclose(to_np(got), np_transform(chain_np, to_np(points)), atol=1e-12)

    shape = random_shape(rng, d, 2, 6)
    ident = np_identity(shape)
    composed = gf.compose(chain, shape, backend=backend)
    assert tuple(composed.shape) == (batch, d, *shape)
    np.testing.assert_allclose(to_np(composed), np_transform(chain_np, ident) - ident, atol=1e-12)

    image = rand_uniform(rng, (batch, 2, *random_shape(rng, d, 2, 6)))
    warped = gf.warp(image, chain, shape=shape, backend=backend)
    expected = np_sample(to_np(image), np_transform(chain_np, ident))
    np.testing.assert_allclose(to_np(warped), expected, atol=1e-12)
    # default output grid: the image's own
    own = gf.warp(image, chain, backend=backend)
    expected_own = np_sample(to_np(image), np_transform(chain_np, np_identity(tuple(image.shape[2:]))))
    np.testing.assert_allclose(to_np(own), expected_own, atol=1e-12)


def test_chain_order_last_field_applied_first():
    # D1 translates by +0.25 along axis 0 only where x0 < 0.5 (a step in a 3-voxel field); D2 by +0.3.
    d1 = torch.zeros(1, 2, 3, 2, dtype=torch.float64)
    d1[0, 0, 0] = 0.25  # the value at x0 = 0 only
    d2 = torch.full((1, 2, 2, 2), 0.0, dtype=torch.float64)
    d2[:, 0] = 0.5
    x = torch.zeros(1, 2, 1, dtype=torch.float64)
    # φ = Φ_1∘Φ_2: first x0 → 0.5 (D2), then D1 sampled at x0 = 0.5 (the middle node, value 0) → 0.5
    assert gf.transform_points([d1, d2], x, backend="torch")[0, 0, 0].item() == pytest.approx(0.5)
    # reversed chain: first D1 at 0 (+0.25), then D2 (+0.5) → 0.75
    assert gf.transform_points([d2, d1], x, backend="torch")[0, 0, 0].item() == pytest.approx(0.75)


# ---- folds, Jacobian determinant, smoothness baselines ------------------------------------------------


def affine_map(matrix, offset, shape, dtype=torch.float64):
    """φ(x) = A x + t on the identity grid of ``shape``: (1, d, *shape)."""
    ident = R.identity_map(shape, dtype=torch.float64)
    a = torch.as_tensor(matrix, dtype=torch.float64)
    t = torch.as_tensor(offset, dtype=torch.float64)
    phi = torch.einsum("ij,bj...->bi...", a, ident) + t.view(1, -1, *([1] * len(shape)))
    return phi.to(dtype)


@pytest.mark.parametrize("d", [2, 3])
def test_fold_percentage_identity_and_mirror(rng, d):
    shape = random_shape(rng, d, 3, 7)
    ident = gf.identity_map(shape, dtype=torch.float64)
    assert gf.fold_percentage(ident).item() == 0.0
    for k in range(d):
        mirrored = ident.clone()
        mirrored[:, k] = 1 - mirrored[:, k]
        assert gf.fold_percentage(mirrored).item() == pytest.approx(100.0)


def test_fold_percentage_one_known_cell_2d(rng):
    shape = random_shape(rng, 2, 3, 8)
    phi = gf.identity_map(shape, dtype=torch.float64).clone()
    h = [1 / (s - 1) for s in shape]
    # docs/conventions.md §4 2D: cell (0, 0) is the only one that uses node (0, 0); pushing that node past the
    # diagonal neighbour gives dA = h0 h1 - 4 h0 h1 < 0 there.
    phi[0, 0, 0, 0] = 2 * h[0]
    phi[0, 1, 0, 0] = 2 * h[1]
    cells = (shape[0] - 1) * (shape[1] - 1)
    assert gf.fold_percentage(phi).item() == pytest.approx(100.0 / cells)
    assert np_folds(to_np(phi)) == pytest.approx(100.0 / cells)


def test_fold_percentage_one_known_cell_3d(rng):
    shape = random_shape(rng, 3, 3, 6)
    phi = gf.identity_map(shape, dtype=torch.float64).clone()
    h = [1 / (s - 1) for s in shape]
    # docs/conventions.md §4 3D: a = φ[1:, 1:, 1:] - φ[:-1, 1:, 1:] etc. share the node at the cell's last corner;
    # node (-1, -1, -1) is used by the last cell only. Moving it to (1 - 2h): a = (-h0, -2h1, -2h2),
    # b = (-2h0, -h1, -2h2), c = (-2h0, -2h1, -h2), dV = -5 h0 h1 h2 < 0.
    for k in range(3):
        phi[0, k, -1, -1, -1] = 1 - 2 * h[k]
    cells = (shape[0] - 1) * (shape[1] - 1) * (shape[2] - 1)
    assert np_folds(to_np(phi)) == pytest.approx(100.0 / cells)
    assert gf.fold_percentage(phi).item() == pytest.approx(100.0 / cells)


@pytest.mark.parametrize(
    "d", [2, 3])
def test_fold_percentage_matches_spec_on_random_maps(rng, d):
    # rough random maps with many folds: the exact set of cells counted matters
    for _ in range(3):
        shape = random_shape(rng, d, 4, 7)
        phi = gf.identity_map(shape, dtype=torch.float64) + random_field(rng, 2, shape, 0.6 / max(shape))
        assert gf.fold_percentage(phi).item() == pytest.approx(np_folds(to_np(phi)), abs=1e-9)


def random_affine(rng, d, scale=0.3):
    return torch.eye(d, dtype=torch.float64) + rand_uniform(rng, (d, d), -scale, scale)


@pytest.mark.parametrize("d", [2, 3])
def test_jacobian_determinant_identity_and_affine(rng, d):
    shape = random_shape(rng, d, 3, 7)
    ident = gf.identity_map(shape, dtype=torch.float64)
    det_id = gf.jacobian_determinant(ident)
    assert tuple(det_id.shape) == (1, *(s - 1 for s in shape))
    torch.testing.assert_close(det_id, torch.ones_like(det_id), rtol=0, atol=1e-10)
    for scale in (0.3, 1.5):  # 1.5: the determinant may be negative
        a = random_affine(rng, d, scale)
        t = rand_uniform(rng, (d,), -0.5, 0.5)
        det = gf.jacobian_determinant(affine_map(a, t, shape))
        expected = torch.full_like(det, float(torch.linalg.det(a)))
        torch.testing.assert_close(det, expected, rtol=1e-9, atol=1e-9)
        assert gf.fold_percentage(affine_map(a, t, shape)).item() == (100.0 if torch.linalg.det(a) < 0 else 0.0)


@pytest.mark.parametrize("d", [2, 3])
def test_diffusion_and_bending_energy(rng, d):
    shape = random_shape(rng, d, 4, 8)
    ident = gf.identity_map(shape, dtype=torch.float64)
    assert gf.diffusion_energy(ident).item() == 0.0
    assert gf.bending_energy(ident).item() == 0.0
    # affine: ∇u = A - I everywhere, so diffusion = ‖A - I‖_F², bending = 0
    a = random_affine(rng, d)
    t = rand_uniform(rng, (d,), -0.2, 0.2)
    phi = affine_map(a, t, shape)
    expected = float(((a - torch.eye(d, dtype=torch.float64)) ** 2).sum())
    assert gf.diffusion_energy(phi).item() == pytest.approx(expected, rel=1e-9)
    assert abs(gf.bending_energy(phi).item()) < 1e-12 * max(shape) ** 4
    # quadratic displacement u_i = xᵀ Q_i x: central differences are exact, Hessian 2 Q_i,
    # bending = Σ_i ‖2 Q_i‖_F²
    q = rand_uniform(rng, (d, d, d), -0.5, 0.5)
    q = (q + q.transpose(1, 2)) / 2
    x = R.identity_map(shape, dtype=torch.float64)
    u = torch.einsum("ijk,bj...,bk...->bi...", q, x, x)
    assert gf.bending_energy(x + u).item() == pytest.approx(float(((2 * q) ** 2).sum()), rel=1e-8)
    # a random smooth non-affine map has positive energies
    smooth = x + smooth_field(rng, 2, shape, 0.05)
    assert gf.bending_energy(smooth).item() > 0
    assert gf.diffusion_energy(smooth).item() > 0


# ---- penalties: closed forms on affine maps -----------------------------------------------------------


def contraction(rng, d, batch):
    """Affine maps x ↦ A(x - ½) + ½ + τ, one per batch entry, with ‖A‖_∞ ≤ 0.85·1.12 < 0.96 and |τ| ≤ 0.02.

    Starting from [0.1, 0.901]^d, any three of them in a row keep every position within 0.41 of ½.
    """
    mats, offsets = [], []
    for _ in range(batch):
        s = float(rand_uniform(rng, (1,), 0.75, 0.85))
        a = s * (torch.eye(d, dtype=torch.float64) + rand_uniform(rng, (d, d), -0.04, 0.04))
        tau = rand_uniform(rng, (d,), -0.02, 0.02)
        mats.append(a)
        offsets.append(0.5 + tau - a @ torch.full((d,), 0.5, dtype=torch.float64))
    return torch.stack(mats), torch.stack(offsets)


def affine_field(mats, offsets, shape):
    """Displacement field of x ↦ A_b x + t_b on grid ``shape`` (exactly reproduced by interpolation in [0, 1])."""
    ident = R.identity_map(shape, dtype=torch.float64)
    d = len(shape)
    mapped = torch.einsum("bij,zj...->bi...", mats, ident) + offsets.view(-1, d, *([1] * d))
    return mapped - ident


def inner_points_noise(shape, stride):
    """Explicit noise which, with noise_scale = 1, moves the kept grid points to 0.1 + 0.8·id: inside [0.1, 0.9]."""
    kept = torch.from_numpy(np_identity(shape))[(slice(None), slice(None)) + (slice(None, None, stride),) * len(shape)]
    return 0.1 - 0.2 * kept, 0.1 + 0.8 * kept


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_penalties_vanish_for_inverse_translations(rng, d, backend):
    shape = random_shape(rng, d, 3, 7)
    t = rand_uniform(rng, (2, d), -0.2, 0.2)
    ab = [t.view(2, d, *([1] * d)).expand(2, d, *random_shape(rng, d, 2, 5)).contiguous()]
    ba = [(-t).view(2, d, *([1] * d)).expand(2, d, *random_shape(rng, d, 2, 5)).contiguous()]
    for stride in (1, 2):
        noise = torch.randn(1, d, *R.loss_points_shape(shape, stride), generator=rng, dtype=torch.float64)
        loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, noise_scale=0.0, backend=backend)
        assert 0 <= loss.item() < 1e-18
        sym = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, noise_scale=0.0, symmetric=True,
                               backend=backend)
        assert 0 <= sym.item() < 1e-18
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64)
    assert 0 <= gf.icon_loss(ab, ba, shape=shape, noise=noise, noise_scale=0.0, backend=backend).item() < 1e-24


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_penalties_vanish_for_inverse_affine_pair(rng, d, backend):
    shape = random_shape(rng, d, 3, 7)
    mats, offsets = contraction(rng, d, 2)
    inv = torch.linalg.inv(mats)
    inv_offsets = -torch.einsum("bij,bj->bi", inv, offsets)
    ba = [affine_field(mats, offsets, random_shape(rng, d, 2, 6))]
    ab = [affine_field(inv, inv_offsets, random_shape(rng, d, 2, 6))]
    for stride in (1, 2):
        noise, _ = inner_points_noise(shape, stride)
        loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, noise_scale=1.0, backend=backend)
        assert 0 <= loss.item() < 1e-16


def compose_affine(outer, inner):
    (a2, t2), (a1, t1) = outer, inner
    return torch.einsum("bij,bjk->bik", a2, a1), torch.einsum("bij,bj->bi", a2, t1) + t2


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_penalties_closed_form_for_affine_pair(rng, d, backend):
    batch = 2
    shape = random_shape(rng, d, 3, 7)
    # φ_AB = Φ_1∘Φ_2 and φ_BA = Φ_3, all contractions towards the centre, so every intermediate
    # position stays inside [0, 1] where the interpolated affine fields are exact.
    m1, m2, m3 = (contraction(rng, d, batch) for _ in range(3))
    ab = [affine_field(*m1, random_shape(rng, d, 2, 6)), affine_field(*m2, random_shape(rng, d, 2, 6))]
    ba = [affine_field(*m3, random_shape(rng, d, 2, 6))]
    map_ab = compose_affine(m1, m2)
    map_ba = m3
    eye = torch.eye(d, dtype=torch.float64)
    ab_ba, ba_ab = compose_affine(map_ab, map_ba), compose_affine(map_ba, map_ab)

    def closed(mat):
        # Σ_k mean over (batch × d × points) of ((M - I) e_k)²: Σ_k (1/(B d)) Σ_b ‖(M_b - I) e_k‖²
        return float(((mat - eye) ** 2).sum() / (batch * d))

    for stride in (1, 2):
        noise, points = inner_points_noise(shape, stride)
        # precondition: the points are where the construction is exact
        y = np_transform([to_np(f) for f in ba], to_np(points))
        assert y.min() > 0 and y.max() < 1
        loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, noise_scale=1.0, backend=backend)
        assert loss.item() == pytest.approx(closed(ab_ba[0]), rel=1e-8)
        sym = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, noise_scale=1.0, symmetric=True,
                               backend=backend)
        assert sym.item() == pytest.approx(closed(ab_ba[0]) + closed(ba_ab[0]), rel=1e-8)

    noise, points = inner_points_noise(shape, 1)
    x = to_np(points)  # (1, d, *shape)

    def icon_term(mat, off):
        mapped = np.einsum("bij,zj...->bi...", mat.numpy(), x) + off.numpy().reshape(batch, d, *([1] * d))
        return np.mean((x - mapped) ** 2)

    expected = icon_term(*ab_ba) + icon_term(*ba_ab)
    icon = gf.icon_loss(ab, ba, shape=shape, noise=noise, noise_scale=1.0, backend=backend)
    assert icon.item() == pytest.approx(expected, rel=1e-10)


# ---- penalties on non-linear chains: docs/conventions.md §2 written out ----------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
def test_gradicon_and_icon_match_handwritten_spec(rng, d):
    shape = random_shape(rng, d, 3, 6)
    ab = random_chain(rng, d, 2, 2, 0.1, lo=2, hi=5, smooth=True)
    ba = random_chain(rng, d, 2, 1, 0.1, lo=2, hi=5)
    ab_np, ba_np = [to_np(f) for f in ab], [to_np(f) for f in ba]
    for stride in (1, 2):
        noise = torch.randn(1, d, *R.loss_points_shape(shape, stride), generator=rng, dtype=torch.float64)
        # default noise_scale: stride / W (conventions: id + n/W dense, id + 2n/W sparse)
        got = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, backend="torch")
        expected = np_gradicon(ab_np, ba_np, shape, stride, to_np(noise), stride / shape[-1])
        assert got.item() == pytest.approx(expected, rel=1e-9)
        got = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, noise_scale=0.05, symmetric=True,
                               backend="torch")
        expected = np_gradicon(ab_np, ba_np, shape, stride, to_np(noise), 0.05, symmetric=True)
        assert got.item() == pytest.approx(expected, rel=1e-9)
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64)
    points = np_identity(shape) + to_np(noise) / shape[-1]
    expected = (np.mean((points - np_transform(ab_np + ba_np, points)) ** 2)
                + np.mean((points - np_transform(ba_np + ab_np, points)) ** 2))
    assert gf.icon_loss(ab, ba, shape=shape, noise=noise, backend="torch").item() == pytest.approx(expected, rel=1e-10)
