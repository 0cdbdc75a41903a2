"""The Triton backend against the PyTorch reference: values and gradients of every fused op.

Without a CUDA device the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set here before the kernels are imported); sizes stay tiny because the
interpreter is slow. Inputs are fresh random draws (the ``rng`` fixture prints its seed).

Tolerances (norm-wise relative errors unless said otherwise):
* chain evaluation, warp, ICON: values and gradients 1e-5 in float32 — the kernels do the same
  float32 operations as the reference up to ordering (a few ulps).
* finite-difference GradICON in float32: conftest.check_fd against the exact (float64) penalty,
  value and each gradient entry 1e-3. g_k divides a difference of O(1) coordinates by δ = 1e-3, so
  one float32 ulp of a coordinate (6e-8) is an error of ~6e-5 in g: the float32 reference itself is
  only that close to the exact penalty. The entries next to a kink of a field, where rounding picks
  the side, are exempt. The float64 test checks the exact semantics at 1e-10.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before the @triton.jit functions are defined, i.e. before the import below.
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402  (the annotations of the kernel sources spelled out below)

import gradicon_fast as gf  # noqa: E402
from gradicon_fast import reference as R  # noqa: E402
from gradicon_fast.kernels import ops as T  # noqa: E402

from conftest import check_fd, leaves, random_chain, random_points, random_shape, relative_error  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
F32 = 1e-5        # chain evaluation, warp, ICON (float32)


def half_tolerance(dtype):
    """Norm-wise tolerance for outputs stored in a half-precision dtype.

    The kernels compute in float32 and round each output (value or gradient) once to ``dtype``;
    the reference runs in float32 on the same (rounded, exactly upcast) fields. On the GPU that
    rounding is to nearest (error <= eps/2 per element), but the interpreter's float32 -> bfloat16
    conversion truncates (error < eps), so allow one unit in the last place, eps, plus 2e-4 for the
    float32 differences underneath (finite-difference penalty: ~1e-4).
    """
    return torch.finfo(dtype).eps + 2e-4


def _chain(rng, d, batch, length, magnitude=0.08, dtype=torch.float32, lo=3, hi=7):
    return [f.to(dtype=dtype, device=DEVICE) for f in random_chain(rng, d, batch, length, magnitude, lo=lo, hi=hi)]


def _grads(out, inputs, seed_grad=None):
    if seed_grad is None:
        return torch.autograd.grad(out, inputs)
    return torch.autograd.grad(out, inputs, seed_grad)


def _check_gradicon(loss, fields, n_ab, what, **penalty):
    """A float32 finite-difference GradICON loss against the float64 penalty (fd_check.check_fd)."""
    check_fd((loss.detach(), list(_grads(loss, fields))), fields, what, n_ab=n_ab, **penalty)


# ---- chain evaluation ---------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_transform_points(rng, d, batch):
    # 3 fields of different non-cubic resolutions; with batch 2 the middle field and the points
    # have batch 1 and broadcast; points lie in [-0.3, 1.3] (some beyond the border).
    chain = leaves(_chain(rng, d, batch, 3))
    points = leaves([random_points(rng, 1, d, (6, 5)).to(device=DEVICE, dtype=torch.float32)])[0]
    out = gf.transform_points(chain, points, backend="triton")
    ref = gf.transform_points(chain, points, backend="torch")
    assert out.shape == ref.shape == (batch, d, 6, 5)
    assert relative_error(out, ref) < F32
    seed_grad = torch.randn(ref.shape, generator=rng).to(DEVICE)
    got = _grads(out, chain + [points], seed_grad)
    want = _grads(ref, chain + [points], seed_grad)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert relative_error(g, w) < F32


@pytest.mark.parametrize("which", ["middle field", "points only"])
def test_transform_points_partial_gradients(rng, which):
    # Only some inputs want a gradient: the reverse pass stops early / skips scatters.
    d = 3
    chain = _chain(rng, d, 2, 3)
    points = random_points(rng, 2, d, (7,)).to(device=DEVICE, dtype=torch.float32)
    if which == "middle field":
        chain[1].requires_grad_(True)
        inputs = [chain[1]]
    else:
        points.requires_grad_(True)
        inputs = [points]
    got = _grads(T.transform_points(chain, points).square().sum(), inputs)
    want = _grads(R.transform_points(chain, points).square().sum(), inputs)
    assert relative_error(list(got), list(want)) < F32


def test_singleton_axes(rng):
    # Axes of size 1 (index always 0, zero derivative), in fields and in the warped image.
    chain = leaves([(0.1 * torch.randn((2, 3, 1, 4, 3), generator=rng)).to(DEVICE),
                    (0.1 * torch.randn((1, 3, 3, 1, 1), generator=rng)).to(DEVICE)])
    points = random_points(rng, 2, 3, (8,)).to(device=DEVICE, dtype=torch.float32)
    out, ref = T.transform_points(chain, points), R.transform_points(chain, points)
    assert relative_error(out, ref) < F32
    assert relative_error(list(_grads(out.sum(), chain)), list(_grads(ref.sum(), chain))) < F32
    image = torch.randn((1, 1, 1, 3, 4), generator=rng).to(DEVICE)
    assert relative_error(T.warp(image, chain, (2, 3, 1)), R.warp(image, chain, (2, 3, 1))) < F32


def test_64bit_offsets(rng, monkeypatch):
    # The int64 offset code (used when a tensor has 2^31 elements or more), forced on small tensors.
    from gradicon_fast.kernels import chain as chain_module

    monkeypatch.setattr(chain_module, "FORCE_64BIT_OFFSETS", True)
    d = 3
    chain = leaves(_chain(rng, d, 2, 2, hi=5))
    points = random_points(rng, 1, d, (9,)).to(device=DEVICE, dtype=torch.float32)
    out, ref = T.transform_points(chain, points), R.transform_points(chain, points)
    assert relative_error(out, ref) < F32
    assert relative_error(list(_grads(out.sum(), chain)), list(_grads(ref.sum(), chain))) < F32
    image = leaves([torch.randn((1, 2, 4, 3, 5), generator=rng).to(DEVICE)])[0]
    out, ref = T.warp(image, chain, (3, 4, 2)), R.warp(image, chain, (3, 4, 2))
    assert relative_error(out, ref) < F32
    assert relative_error(list(_grads(out.sum(), [image] + chain)), list(_grads(ref.sum(), [image] + chain))) < F32
    shape = (4, 3, 5)
    noise = _noise(rng, d, shape)
    loss = T.icon_loss(chain[:1], chain[1:], shape, noise, 0, 0.2)
    ref = R.icon_loss(chain[:1], chain[1:], shape=shape, noise=noise, noise_scale=0.2)
    assert abs(loss.item() - ref.item()) <= F32 * abs(ref.item())
    loss = T.gradicon_loss(chain[:1], chain[1:], shape, 2, None, 11, 1e-3, 0.4)
    noise = T.normal_noise(11, d, R.loss_points_shape(shape, 2), device=DEVICE)
    _check_gradicon(loss, chain, 1, "64-bit offsets", shape=shape, stride=2, noise=noise, noise_scale=0.4)


def test_transform_points_float64(rng):
    # float64 fields compute in float64 (checked under the interpreter; not required on GPU).
    chain = leaves(_chain(rng, 2, 2, 2, dtype=torch.float64))
    points = leaves([random_points(rng, 2, 2, (9,)).to(DEVICE)])[0]
    out = T.transform_points(chain, points)
    ref = R.transform_points(chain, points)
    assert out.dtype == torch.float64
    assert relative_error(out, ref) < 1e-12
    got = _grads(out.sum(), chain + [points])
    want = _grads(ref.sum(), chain + [points])
    assert relative_error(list(got), list(want)) < 1e-12


# ---- warp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
def test_warp(rng, d):
    # Two-channel image of batch 1 at its own resolution, a 2-field chain of batch 2, an output
    # grid of yet another shape.
    chain = leaves(_chain(rng, d, 2, 2))
    image = leaves([torch.randn((1, 2, *random_shape(rng, d, 3, 6)), generator=rng).to(DEVICE)])[0]
    shape = random_shape(rng, d, 3, 6)
    out = gf.warp(image, chain, shape=shape, backend="triton")
    ref = gf.warp(image, chain, shape=shape, backend="torch")
    assert out.shape == ref.shape == (2, 2, *shape)
    assert relative_error(out, ref) < F32
    seed_grad = torch.randn(ref.shape, generator=rng).to(DEVICE)
    got = _grads(out, [image] + chain, seed_grad)
    want = _grads(ref, [image] + chain, seed_grad)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert relative_error(g, w) < F32


@pytest.mark.parametrize("which", ["image", "fields"])
def test_warp_partial_gradients(rng, which):
    d = 2
    chain = _chain(rng, d, 1, 2)
    image = torch.randn((2, 3, 5, 4), generator=rng).to(DEVICE)
    inputs = [image.requires_grad_(True)] if which == "image" else [f.requires_grad_(True) for f in chain]
    got = _grads(T.warp(image, chain, (4, 6)).sum(), inputs)
    want = _grads(R.warp(image, chain, (4, 6)).sum(), inputs)
    assert relative_error(list(got), list(want)) < F32


def test_warp_non_finite_map():
    # A NaN displacement makes the warped value NaN where the reference's is (never the border value).
    field = torch.zeros(1, 2, 5, 5, device=DEVICE)
    field[0, 0, 3, 3] = float("nan")
    image = torch.ones(1, 1, 5, 5, device=DEVICE)
    out = T.warp(image, [field], (5, 5))
    ref = R.warp(image, [field], (5, 5))
    assert torch.isnan(out[0, 0, 3, 3])
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    torch.testing.assert_close(out, ref, equal_nan=True)


# ---- GradICON (finite differences) ------------------------------------------------------------


def _noise(rng, d, points_shape, dtype=torch.float32):
    return torch.randn((1, d, *points_shape), generator=rng, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("d, stride, symmetric", [(2, 1, False), (2, 2, True), (3, 1, False), (3, 2, True)])
def test_gradicon(rng, d, stride, symmetric):
    # Batch 2, with a field of batch 1 broadcast over it.
    hi = 6 if d == 2 else 5
    chain_ab = leaves(_chain(rng, d, 2, 2, lo=3, hi=hi))
    chain_ba = leaves(_chain(rng, d, 1, 1, lo=3, hi=hi))
    shape = random_shape(rng, d, 3, hi + 1)
    noise = _noise(rng, d, R.loss_points_shape(shape, stride))
    kwargs = dict(shape=shape, stride=stride, noise=noise, symmetric=symmetric)
    loss = gf.gradicon_loss(chain_ab, chain_ba, backend="triton", **kwargs)
    assert loss.shape == () and loss.dtype == torch.float32
    _check_gradicon(loss, chain_ab + chain_ba, 2, "gradicon", **kwargs)


@pytest.mark.parametrize("d", [2, 3])
def test_gradicon_float64_exact(rng, d):
    # In float64 the finite differences lose nothing that matters: the same semantics to 1e-10.
    chain_ab = leaves(_chain(rng, d, 1, 1, dtype=torch.float64, hi=5))
    chain_ba = leaves(_chain(rng, d, 1, 2, dtype=torch.float64, hi=5))
    shape = random_shape(rng, d, 3, 5)
    noise = _noise(rng, d, R.loss_points_shape(shape, 2), torch.float64)
    kwargs = dict(shape=shape, stride=2, noise=noise)
    loss = gf.gradicon_loss(chain_ab, chain_ba, backend="triton", **kwargs)
    ref = gf.gradicon_loss(chain_ab, chain_ba, backend="torch", **kwargs)
    assert abs(loss.item() - ref.item()) <= 1e-10 * abs(ref.item())
    got = _grads(loss, chain_ab + chain_ba)
    want = _grads(ref, chain_ab + chain_ba)
    assert relative_error(list(got), list(want)) < 1e-8


def test_many_points(rng):
    # More points than one program takes (several blocks, several loss partial sums per batch entry).
    d = 2
    chain_ab = leaves(_chain(rng, d, 2, 2))
    chain_ba = leaves(_chain(rng, d, 1, 1))
    shape = (23, 29)
    noise = _noise(rng, d, R.loss_points_shape(shape, 1))
    loss = T.gradicon_loss(chain_ab, chain_ba, shape, 1, noise, 0, 1e-3, 1 / 29)
    _check_gradicon(loss, chain_ab + chain_ba, 2, "many points", shape=shape, stride=1, noise=noise,
                    noise_scale=1 / 29)
    loss = T.icon_loss(chain_ab, chain_ba, shape, noise, 0, 1 / 29)
    ref = R.icon_loss(chain_ab, chain_ba, shape=shape, noise=noise)
    assert abs(loss.item() - ref.item()) <= F32 * abs(ref.item())
    points = random_points(rng, 1, d, (700,)).to(device=DEVICE, dtype=torch.float32)
    assert relative_error(T.transform_points(chain_ab, points), R.transform_points(chain_ab, points)) < F32
    image = torch.randn((1, 1, 9, 8), generator=rng).to(DEVICE)
    assert relative_error(T.warp(image, chain_ab, shape), R.warp(image, chain_ab, shape)) < F32


def test_gradicon_longest_chains(rng):
    # 8 + 8 fields: every one of the kernels' 16 field slots in use.
    d = 2
    chain_ab = leaves(_chain(rng, d, 1, 8, magnitude=0.02, lo=2, hi=4))
    chain_ba = leaves(_chain(rng, d, 1, 8, magnitude=0.02, lo=2, hi=4))
    # Enough points (12 x 11) that the float32 rounding of the finite differences, amplified by
    # 16 compositions, averages out in the loss value (with 4 points it reached 7e-4).
    shape = (24, 21)
    noise = _noise(rng, d, R.loss_points_shape(shape, 2))
    loss = T.gradicon_loss(chain_ab, chain_ba, shape, 2, noise, 0, 1e-3, 2 / 21)
    _check_gradicon(loss, chain_ab + chain_ba, 8, "longest chains", shape=shape, stride=2, noise=noise,
                    noise_scale=2 / 21)


# ---- analytic GradICON ---------------------------------------------------------------------------


@pytest.mark.parametrize("d, stride, symmetric", [(2, 1, True), (3, 2, False)])
def test_gradicon_analytic(rng, d, stride, symmetric):
    # The exact chain-rule Jacobian: no finite-difference noise, so float32 tolerances.
    chain_ab = leaves(_chain(rng, d, 2, 2, hi=5))
    chain_ba = leaves(_chain(rng, d, 1, 1, hi=5))
    shape = random_shape(rng, d, 3, 6)
    noise = _noise(rng, d, R.loss_points_shape(shape, stride))
    kwargs = dict(shape=shape, stride=stride, noise=noise, symmetric=symmetric, mode="analytic")
    loss = gf.gradicon_loss(chain_ab, chain_ba, backend="triton", **kwargs)
    ref = gf.gradicon_loss(chain_ab, chain_ba, backend="torch", **kwargs)
    assert abs(loss.item() - ref.item()) <= F32 * abs(ref.item())
    got = _grads(loss, chain_ab + chain_ba)
    want = _grads(ref, chain_ab + chain_ba)
    for g, w in zip(got, want):
        assert relative_error(g, w) < F32


def test_gradicon_analytic_seeded_float64(rng):
    d, shape, seed = 3, (4, 5, 3), _seed(rng)
    chain_ab = leaves(_chain(rng, d, 1, 2, dtype=torch.float64, hi=5))
    chain_ba = leaves(_chain(rng, d, 2, 1, dtype=torch.float64, hi=5))
    noise = T.normal_noise(seed, d, shape, dtype=torch.float64, device=DEVICE)
    loss = T.gradicon_analytic_loss(chain_ab, chain_ba, shape, 1, None, seed, 1 / 3)
    ref = R.gradicon_loss_analytic(chain_ab, chain_ba, shape=shape, stride=1, noise=noise, noise_scale=1 / 3)
    assert abs(loss.item() - ref.item()) <= 1e-12 * abs(ref.item())
    got = _grads(loss, chain_ab + chain_ba)
    want = _grads(ref, chain_ab + chain_ba)
    assert relative_error(list(got), list(want)) < 1e-12


# ---- ICON ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3])
def test_icon(rng, d):
    hi = 6 if d == 2 else 5
    chain_ab = leaves(_chain(rng, d, 2, 2, hi=hi))
    chain_ba = leaves(_chain(rng, d, 1, 1, hi=hi))
    shape = random_shape(rng, d, 3, hi)
    noise = _noise(rng, d, shape)
    loss = gf.icon_loss(chain_ab, chain_ba, shape=shape, noise=noise, backend="triton")
    ref = gf.icon_loss(chain_ab, chain_ba, shape=shape, noise=noise, backend="torch")
    assert abs(loss.item() - ref.item()) <= F32 * abs(ref.item())
    got = _grads(loss, chain_ab + chain_ba)
    want = _grads(ref, chain_ab + chain_ba)
    for g, w in zip(got, want):
        assert relative_error(g, w) < F32


# ---- seeded noise -------------------------------------------------------------------------------


def _philox_normal(seed: int, d: int, n: int) -> np.ndarray:
    """csrc/philox.h in numpy: Philox4x32-10 keyed by the seed, counter = point index, Box-Muller."""
    mask = np.uint64(0xFFFFFFFF)
    p = np.arange(n, dtype=np.uint64)
    c0, c1 = p & mask, p >> np.uint64(32)
    c2 = np.zeros(n, np.uint64)
    c3 = np.zeros(n, np.uint64)
    seed &= (1 << 64) - 1
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        prod0 = np.uint64(0xD2511F53) * c0
        prod2 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((prod2 >> np.uint64(32)) ^ c1 ^ k0, prod2 & mask,
                          (prod0 >> np.uint64(32)) ^ c3 ^ k1, prod0 & mask)
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask

    def uniform(bits):
        x = bits.astype(np.uint32).view(np.int32)
        x = np.where(x < 0, ~x, x)
        return x.astype(np.float32) * np.float32(4.6566127342e-10)

    out = []
    for a, b in ((c0, c1), (c2, c3)):
        u1 = np.maximum(uniform(a), np.float32(1e-7))
        theta = np.float32(6.283185307179586) * uniform(b)
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        out += [r * np.cos(theta), r * np.sin(theta)]
    return np.stack(out[:d])


def _seed(rng) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=rng))


def test_normal_noise(rng):
    seed = _seed(rng)
    noise = T.normal_noise(seed, 3, (5, 7), device=DEVICE)
    want = torch.from_numpy(_philox_normal(seed, 3, 35)).reshape(1, 3, 5, 7)
    torch.testing.assert_close(noise.cpu(), want, rtol=1e-4, atol=1e-5)
    try:
        from gradicon_fast import ops as C
        other = C.normal_noise(seed, 3, (5, 7), device=DEVICE)
    except Exception:  # the compiled extension is optional
        return
    torch.testing.assert_close(noise, other, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 2**62 - 1, 2**63 - 1])
def test_normal_noise_seed_bits(seed):
    # Seeds reach the kernels as two int32 halves (kernels/penalty_points.py: split64/join64):
    # the halves' sign bits and the carry between them.
    noise = T.normal_noise(seed, 2, (9,), device=DEVICE)
    want = torch.from_numpy(_philox_normal(seed, 2, 9)).reshape(1, 2, 9)
    torch.testing.assert_close(noise.cpu(), want, rtol=1e-4, atol=1e-5)


def test_gradicon_seeded(rng):
    # noise=None: the kernels draw the noise from the seed, forward and (again) backward.
    d, shape, stride, seed = 2, (5, 6), 2, _seed(rng)
    chain_ab = leaves(_chain(rng, d, 2, 2))
    chain_ba = leaves(_chain(rng, d, 2, 1))
    noise = T.normal_noise(seed, d, R.loss_points_shape(shape, stride), device=DEVICE)
    loss = T.gradicon_loss(chain_ab, chain_ba, shape, stride, None, seed, 1e-3, stride / shape[-1])
    given = T.gradicon_loss(chain_ab, chain_ba, shape, stride, noise, 0, 1e-3, stride / shape[-1])
    assert loss.item() == given.item()
    _check_gradicon(loss, chain_ab + chain_ba, 2, "seeded", shape=shape, stride=stride, noise=noise)


def test_icon_seeded(rng):
    d, shape, seed = 3, (4, 3, 5), _seed(rng)
    chain_ab = leaves(_chain(rng, d, 1, 1, hi=5))
    chain_ba = leaves(_chain(rng, d, 1, 2, hi=5))
    noise = T.normal_noise(seed, d, shape, device=DEVICE)
    loss = T.icon_loss(chain_ab, chain_ba, shape, None, seed, 1 / shape[-1])
    ref = R.icon_loss(chain_ab, chain_ba, shape=shape, noise=noise)
    assert abs(loss.item() - ref.item()) <= F32 * abs(ref.item())
    got = _grads(loss, chain_ab + chain_ba)
    want = _grads(ref, chain_ab + chain_ba)
    assert relative_error(list(got), list(want)) < F32


# ---- half-precision fields ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_fields(rng, dtype):
    d = 2
    chain16 = leaves(_chain(rng, d, 2, 2, dtype=dtype))
    chain32 = leaves([f.detach().float() for f in chain16])  # exact upcast of the rounded fields
    points16 = random_points(rng, 1, d, (5, 3)).to(dtype=dtype, device=DEVICE)

    out = T.transform_points(chain16, points16)
    ref = R.transform_points(chain32, points16.float())
    assert out.dtype == dtype
    assert relative_error(out, ref) < half_tolerance(dtype)
    got = _grads(out.float().sum(), chain16)
    want = _grads(ref.sum(), chain32)
    assert all(g.dtype == dtype for g in got)
    assert relative_error(list(got), list(want)) < half_tolerance(dtype)

    image16 = torch.randn((1, 1, 5, 6), generator=rng).to(dtype=dtype, device=DEVICE)
    warped = T.warp(image16, chain16, (4, 5))
    assert relative_error(warped, R.warp(image16.float(), chain32, (4, 5))) < half_tolerance(dtype)

    shape = (5, 4)
    noise = _noise(rng, d, R.loss_points_shape(shape, 2), dtype)
    loss = T.gradicon_loss(chain16, chain16[:1], shape, 2, noise, 0, 1e-3, 2 / 4)
    ref = R.gradicon_loss(chain32, chain32[:1], shape=shape, stride=2, noise=noise.float())
    assert loss.dtype == dtype
    assert abs(loss.item() - ref.item()) <= half_tolerance(dtype) * abs(ref.item())
    got = _grads(loss.float(), chain16)
    want = _grads(ref, chain32)
    assert relative_error(list(got), list(want)) < half_tolerance(dtype)

    # The analytic penalty, which is what half-precision maps need (δ is below their resolution).
    loss = T.gradicon_analytic_loss(chain16, chain16[:1], shape, 2, noise, 0, 2 / 4)
    ref = R.gradicon_loss_analytic(chain32, chain32[:1], shape=shape, stride=2, noise=noise.float())
    assert abs(loss.item() - ref.item()) <= half_tolerance(dtype) * abs(ref.item())
    got = _grads(loss.float(), chain16)
    want = _grads(ref, chain32)
    assert relative_error(list(got), list(want)) < half_tolerance(dtype)


# ---- registration, compilation ------------------------------------------------------------------


def test_a_kernel_source_writes_its_chain_arguments_once():
    # CHAIN stands for the 16 slots, then NF, BATCHED, GMASK, where the host passes them.
    import inspect

    from gradicon_fast.kernels import chain as chain_module

    def kernel(X, N, CHAIN, D: tl.constexpr):
        fields, grads, sizes = CHAIN
        return fields, grads, sizes, NF, BATCHED, GMASK  # noqa: F821 (parameters once spelled out)

    spelled = chain_module.with_chain_arguments(kernel)
    slots = [f"{name}{j}" for j in range(16) for name in "FGABC"]
    assert list(inspect.signature(spelled).parameters) == ["X", "N", *slots, "NF", "BATCHED", "GMASK", "D"]
    fields, grads, sizes, nf, batched, gmask = spelled(None, 9, *range(80), 2, 1, 3, 3)
    assert fields == tuple(range(0, 80, 5)) and grads == tuple(range(1, 80, 5))
    assert sizes[1] == (7, 8, 9) and (nf, batched, gmask) == (2, 1, 3)
    assert "fields, grads, sizes = (F0, F1, F2" in inspect.getsource(spelled)  # what Triton reads

    def no_chain(X, N):
        return X

    with pytest.raises(ValueError, match="CHAIN"):
        chain_module.with_chain_arguments(no_chain)


def test_registered_ops_have_fake_kernels(rng):
    # Shapes under FakeTensorMode, as torch.compile traces them.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        chain = [torch.empty(2, 3, 4, 5, 6), torch.empty(1, 3, 3, 3, 3)]
        assert T.transform_points(chain, torch.empty(1, 3, 10)).shape == (2, 3, 10)
        assert T.warp(torch.empty(1, 2, 4, 4, 4), chain, (5, 6, 7)).shape == (2, 2, 5, 6, 7)
        assert T.gradicon_loss(chain, chain, (4, 5, 6), 2, None, 3, 1e-3, 0.3).shape == ()
        assert T.icon_loss(chain, chain, (4, 5, 6), None, 3, 0.2).shape == ()
        assert T.gradicon_analytic_loss(chain, chain, (4, 5, 6), 2, None, 3, 0.3).shape == ()


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile of Triton kernels needs a CUDA device "
                                         "(Inductor does not compile user Triton kernels for CPU)")
def test_torch_compile_fullgraph(rng):
    d = 3
    chain_ab = leaves(_chain(rng, d, 2, 2))
    chain_ba = leaves(_chain(rng, d, 2, 2))
    image = torch.randn((2, 1, 6, 5, 7), generator=rng).to(DEVICE)
    shape = (6, 5, 7)
    noise = _noise(rng, d, R.loss_points_shape(shape, 2))

    def objective(chain_ab, chain_ba, image):
        warped = T.warp(image, chain_ab, shape)
        reg = T.gradicon_loss(chain_ab, chain_ba, shape, 2, noise, 0, 1e-3, 2 / 7)
        icon = T.icon_loss(chain_ab, chain_ba, shape, None, 7, 1 / 7)
        analytic = T.gradicon_analytic_loss(chain_ab, chain_ba, shape, 2, None, 5, 2 / 7)
        return warped.square().mean() + reg + icon + analytic

    compiled = torch.compile(objective, fullgraph=True)
    got = compiled(chain_ab, chain_ba, image)
    want = objective(chain_ab, chain_ba, image)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    g_got = torch.autograd.grad(got, chain_ab + chain_ba)
    g_want = torch.autograd.grad(want, chain_ab + chain_ba)
    assert relative_error(list(g_got), list(g_want)) < 1e-4


@pytest.mark.skipif(os.environ.get("GRADICON_TRITON_AOT", "0") in ("", "0"),
                    reason="slow (minutes): set GRADICON_TRITON_AOT=1 to compile every kernel for sm_90")
def test_kernels_compile_for_gpu():
    # The interpreter accepts programs the compiler rejects: compile every launched variant for
    # sm_90 down to a cubin (no GPU needed), in a process without TRITON_INTERPRET.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "gradicon_fast.kernels.aot_check"], env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
