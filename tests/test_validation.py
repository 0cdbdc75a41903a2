"""Bad input gets a clear error that names the argument at fault.

Through the public API for the "torch" and "cpu" backends (the checks run before the backend is
chosen, and must not depend on it), and by calling torch.ops.gradicon_fast.* directly, where the C++
checks must raise RuntimeError instead of reading out of bounds.
"""

import re

import pytest
import torch

import gradicon_fast as gf

from conftest import HAS_CPU_KERNELS, HAS_CUDA, requires_cpu_kernels

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_KERNELS, reason="extension not built"))]


def field(batch=1, shape=(4, 5), channels=None, dtype=torch.float32, device="cpu"):
    d = len(shape)
    return torch.zeros(batch, d if channels is None else channels, *shape, dtype=dtype, device=device)


def points(batch=1, d=2, n=6, dtype=torch.float32, device="cpu"):
    return torch.full((batch, d, n), 0.5, dtype=dtype, device=device)


def image(batch=1, shape=(4, 5), channels=1, dtype=torch.float32):
    return torch.zeros(batch, channels, *shape, dtype=dtype)


def noise(shape=(4, 5), d=2, dtype=torch.float32):
    return torch.zeros(1, d, *shape, dtype=dtype)


# (id, call(backend), exception type, pattern the message must contain: the argument's name)
PUBLIC_CASES = [
    # batch sizes
    ("batch between chains", lambda b: gf.gradicon_loss([field(2)], [field(3)], shape=(4, 5), backend=b),
     ValueError, r"chain_BA"),
    ("batch between chains (icon)", lambda b: gf.icon_loss([field(2)], [field(3)], shape=(4, 5), backend=b),
     ValueError, r"chain_BA"),
    ("batch inside a chain", lambda b: gf.transform_points([field(2), field(3)], points(), backend=b),
     ValueError, r"chain\[1\]"),
    ("batch chain vs points", lambda b: gf.transform_points([field(2)], points(3), backend=b),
     ValueError, r"points"),
    ("batch chain vs image", lambda b: gf.warp(image(3), [field(2)], backend=b), ValueError, r"image"),
    # dimensionality and channels
    ("2D field with 3D field", lambda b: gf.transform_points([field(shape=(4, 5)), field(shape=(4, 5, 3))], points(),
                                                             backend=b), ValueError, r"chain\[1\]"),
    ("2D chain with 3D chain", lambda b: gf.gradicon_loss([field(shape=(4, 5))], [field(shape=(4, 5, 3))],
                                                          shape=(4, 5), backend=b), ValueError, r"chain_BA"),
    ("wrong channel count", lambda b: gf.transform_points([field(channels=3)], points(), backend=b),
     ValueError, r"chain\[0\].*channels"),
    ("wrong channel count, second field", lambda b: gf.icon_loss([field()], [field(), field(channels=1)],
                                                                 shape=(4, 5), backend=b),
     ValueError, r"chain_BA\[1\].*channels"),
    ("points with wrong channel count", lambda b: gf.transform_points([field()], points(d=3), backend=b),
     ValueError, r"points"),
    ("field with 1 spatial axis", lambda b: gf.transform_points([torch.zeros(1, 1, 5)], points(d=1), backend=b),
     ValueError, r"chain\[0\]"),
    # dtypes
    ("int field", lambda b: gf.transform_points([field(dtype=torch.int32)], points(), backend=b),
     TypeError, r"chain\[0\].*floating"),
    ("int image", lambda b: gf.warp(image(dtype=torch.int64), [field()], backend=b), TypeError, r"image"),
    ("mixed dtypes in a chain", lambda b: gf.transform_points([field(), field(dtype=torch.float64)], points(),
                                                              backend=b), TypeError, r"chain\[1\]"),
    ("mixed dtypes between chains", lambda b: gf.gradicon_loss([field()], [field(dtype=torch.float64)],
                                                               shape=(4, 5), backend=b), TypeError, r"chain_BA"),
    ("points dtype", lambda b: gf.transform_points([field()], points(dtype=torch.float64), backend=b),
     TypeError, r"points"),
    ("image dtype", lambda b: gf.warp(image(dtype=torch.float64), [field()], backend=b), TypeError, r"image"),
    ("noise dtype", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5), noise=noise(dtype=torch.float64),
                                               backend=b), TypeError, r"noise"),
    # devices
    ("meta field in a cpu chain", lambda b: gf.transform_points([field(), field(device="meta")], points(), backend=b),
     ValueError, r"chain\[1\].*meta"),
    ("meta points", lambda b: gf.transform_points([field()], points(device="meta"), backend=b),
     ValueError, r"points.*meta"),
    ("meta chain_BA", lambda b: gf.icon_loss([field()], [field(device="meta")], shape=(4, 5), backend=b),
     ValueError, r"chain_BA.*meta"),
    # chain length and type
    ("empty chain", lambda b: gf.transform_points([], points(), backend=b), ValueError, r"chain.*empty"),
    ("empty chain_AB", lambda b: gf.gradicon_loss([], [field()], shape=(4, 5), backend=b), ValueError,
     r"chain_AB.*empty"),
    ("nine fields", lambda b: gf.transform_points([field()] * 9, points(), backend=b), ValueError, r"chain.*8"),
    ("nine fields in chain_BA", lambda b: gf.icon_loss([field()], [field()] * 9, shape=(4, 5), backend=b),
     ValueError, r"chain_BA.*8"),
    ("a tensor instead of a list", lambda b: gf.transform_points(field(), points(), backend=b), TypeError, r"chain"),
    # stride
    ("stride 0", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5), stride=0, backend=b),
     ValueError, r"stride"),
    ("stride -1", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5), stride=-1, backend=b),
     ValueError, r"stride"),
    ("stride 1.5", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5), stride=1.5, backend=b),
     TypeError, r"stride"),
    ("stride 2.0", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5), stride=2.0, backend=b),
     TypeError, r"stride"),
    # noise
    ("noise shape", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5), noise=noise((4, 6)), backend=b),
     ValueError, r"noise"),
    ("noise shape, sparse", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5), stride=2,
                                                       noise=noise((4, 5)), backend=b), ValueError, r"noise"),
    ("noise batch", lambda b: gf.icon_loss([field()], [field()], shape=(4, 5), noise=noise().expand(2, -1, -1, -1),
                                           backend=b), ValueError, r"noise"),
    ("noise channels", lambda b: gf.icon_loss([field()], [field()], shape=(4, 5), noise=noise(d=3), backend=b),
     ValueError, r"noise"),
    ("noise requires grad", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5),
                                                       noise=noise().requires_grad_(True), backend=b),
     ValueError, r"noise"),
    ("noise requires grad (icon)", lambda b: gf.icon_loss([field()], [field()], shape=(4, 5),
                                                          noise=noise().requires_grad_(True), backend=b),
     ValueError, r"noise"),
    # images and shapes
    ("image with 3 spatial axes, 2D chain", lambda b: gf.warp(image(shape=(4, 5, 3)), [field()], backend=b),
     ValueError, r"image"),
    ("image with 1 spatial axis", lambda b: gf.warp(torch.zeros(1, 1, 5), [field()], backend=b),
     ValueError, r"image"),
    ("warp shape of wrong length", lambda b: gf.warp(image(), [field()], shape=(4, 5, 6), backend=b),
     ValueError, r"shape"),
    ("warp shape with a zero", lambda b: gf.warp(image(), [field()], shape=(4, 0), backend=b),
     ValueError, r"shape"),
    ("gradicon shape of wrong length", lambda b: gf.gradicon_loss([field()], [field()], shape=(4,), backend=b),
     ValueError, r"shape"),
    ("icon shape of wrong length", lambda b: gf.icon_loss([field()], [field()], shape=(4, 5, 6), backend=b),
     ValueError, r"shape"),
    ("compose shape of wrong length", lambda b: gf.compose([field()], (4, 5, 6), backend=b), ValueError, r"shape"),
    ("shape not ints", lambda b: gf.gradicon_loss([field()], [field()], shape=(4.0, 5.0), backend=b),
     TypeError, r"shape"),
    # a field or image without its batch dimension: said so, not reported for its channel count
    ("3D field without batch", lambda b: gf.compose([field(shape=(4, 5, 6))[0]], (4, 5, 6), backend=b),
     ValueError, r"chain\[0\] has shape \(3, 4, 5, 6\): the batch dimension is missing"),
    ("2D field without batch", lambda b: gf.gradicon_loss([field()[0]], [field()], shape=(4, 5), backend=b),
     ValueError, r"chain_AB\[0\] has shape \(2, 4, 5\): the batch dimension is missing"),
    ("later field without batch", lambda b: gf.compose([field(), field()[0]], (4, 5), backend=b),
     ValueError, r"chain\[1\] .*batch dimension is missing"),
    ("map without batch", lambda b: gf.jacobian_determinant(field(shape=(4, 5, 6))[0]),
     ValueError, r"phi .*batch dimension is missing"),
    ("image without batch", lambda b: gf.warp(image()[0], [field()], backend=b),
     ValueError, r"image .*batch dimension is missing"),
    # other scalars
    ("delta 0", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5), delta=0.0, backend=b),
     ValueError, r"delta"),
    ("negative noise_scale", lambda b: gf.gradicon_loss([field()], [field()], shape=(4, 5), noise_scale=-0.1,
                                                        backend=b), ValueError, r"noise_scale"),
    ("negative noise_scale (icon)", lambda b: gf.icon_loss([field()], [field()], shape=(4, 5), noise_scale=-0.1,
                                                           backend=b), ValueError, r"noise_scale"),
    ("warp mode", lambda b: gf.warp(image(), [field()], mode="bicubic", backend=b), ValueError, r"mode"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in PUBLIC_CASES], ids=[c[0] for c in PUBLIC_CASES])
def test_public_api_rejects(backend, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(backend)


def test_unknown_backend_name():
    for call in (lambda: gf.transform_points([field()], points(), backend="gpu"),
                 lambda: gf.gradicon_loss([field()], [field()], shape=(4, 5), backend="CPU"),
                 lambda: gf.use_backend("fast").__enter__()):
        with pytest.raises(ValueError, match=r"backend.*'auto'.*'torch'.*'cpu'"):
            call()


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present: the cuda backend may be available")
def test_unavailable_cuda_backend():
    for call in (lambda: gf.transform_points([field()], points(), backend="cuda"),
                 lambda: gf.warp(image(), [field()], backend="cuda"),
                 lambda: gf.gradicon_loss([field()], [field()], shape=(4, 5), backend="cuda"),
                 lambda: gf.icon_loss([field()], [field()], shape=(4, 5), backend="cuda")):
        with pytest.raises(RuntimeError, match=r"cuda"):
            call()
    with gf.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"cuda"):
            gf.transform_points([field()], points())


@requires_cpu_kernels
def test_cpu_backend_rejects_other_devices():
    with pytest.raises(ValueError, match=r"cpu.*meta"):
        gf.transform_points([field(device="meta")], points(device="meta"), backend="cpu")


# ---- direct calls of the compiled ops ---------------------------------------------------------------


def ops():
    import gradicon_fast.ops  # noqa: F401

    return torch.ops.gradicon_fast


F2 = field()
P2 = points()
G = torch.tensor(1.0)
DIRECT_CASES = [
    ("empty chain", lambda o: o.transform_points([], P2), r"chain.*empty"),
    ("nine fields", lambda o: o.transform_points([F2] * 9, P2), r"chain.*8"),
    ("2D and 3D fields", lambda o: o.transform_points([F2, field(shape=(4, 5, 3))], P2), r"chain\[1\]"),
    ("wrong channel count", lambda o: o.transform_points([field(channels=3)], P2), r"chain\[0\].*channels"),
    ("1 spatial axis", lambda o: o.transform_points([torch.zeros(1, 1, 5)], points(d=1)), r"chain\[0\]"),
    ("int field", lambda o: o.transform_points([field(dtype=torch.int32)], points(dtype=torch.int32)),
     r"chain\[0\].*floating"),
    ("mixed dtypes", lambda o: o.transform_points([F2, field(dtype=torch.float64)], P2), r"chain\[1\]"),
    ("batch mismatch", lambda o: o.transform_points([field(2), field(3)], P2), r"chain\[1\]"),
    ("points batch", lambda o: o.transform_points([field(2)], points(3)), r"points"),
    ("points channels", lambda o: o.transform_points([F2], points(d=3)), r"points"),
    ("points rank", lambda o: o.transform_points([F2], torch.zeros(2, 5)), r"points"),
    ("points dtype", lambda o: o.transform_points([F2], points(dtype=torch.float64)), r"points"),
    ("warp image rank", lambda o: o.warp(image(shape=(4, 5, 3)), [F2], [4, 5]), r"image"),
    ("warp image dtype", lambda o: o.warp(image(dtype=torch.float64), [F2], [4, 5]), r"image"),
    ("warp image batch", lambda o: o.warp(image(3), [field(2)], [4, 5]), r"image"),
    ("warp shape length", lambda o: o.warp(image(), [F2], [4, 5, 6]), r"shape"),
    ("warp shape zero", lambda o: o.warp(image(), [F2], [4, 0]), r"shape"),
    ("gradicon batch between chains", lambda o: o.gradicon_loss([field(2)], [field(3)], [4, 5], 1, None, 0, 1e-3, 0.1),
     r"chain_BA"),
    ("gradicon 2D with 3D", lambda o: o.gradicon_loss([F2], [field(shape=(4, 5, 3))], [4, 5], 1, None, 0, 1e-3, 0.1),
     r"2D or 3D"),
    ("gradicon dtypes", lambda o: o.gradicon_loss([F2], [field(dtype=torch.float64)], [4, 5], 1, None, 0, 1e-3, 0.1),
     r"chain_BA"),
    ("gradicon stride 0", lambda o: o.gradicon_loss([F2], [F2], [4, 5], 0, None, 0, 1e-3, 0.1), r"stride"),
    ("gradicon shape length", lambda o: o.gradicon_loss([F2], [F2], [4], 1, None, 0, 1e-3, 0.1), r"shape"),
    ("gradicon shape zero", lambda o: o.gradicon_loss([F2], [F2], [0, 5], 1, None, 0, 1e-3, 0.1), r"shape"),
    ("gradicon noise shape", lambda o: o.gradicon_loss([F2], [F2], [4, 5], 2, noise((4, 5)), 0, 1e-3, 0.1), r"noise"),
    ("gradicon noise dtype", lambda o: o.gradicon_loss([F2], [F2], [4, 5], 1, noise(dtype=torch.float64), 0, 1e-3,
                                                       0.1), r"noise"),
    ("gradicon delta", lambda o: o.gradicon_loss([F2], [F2], [4, 5], 1, None, 0, 0.0, 0.1), r"delta"),
    ("gradicon noise_scale", lambda o: o.gradicon_loss([F2], [F2], [4, 5], 1, None, 0, 1e-3, -1.0), r"noise_scale"),
    ("icon noise shape", lambda o: o.icon_loss([F2], [F2], [4, 5], noise((2, 3)), 0, 0.1), r"noise"),
    ("icon empty chain", lambda o: o.icon_loss([F2], [], [4, 5], None, 0, 0.1), r"chain_BA.*empty"),
    ("icon noise_scale", lambda o: o.icon_loss([F2], [F2], [4, 5], None, 0, -1.0), r"noise_scale"),
    ("transform_points_backward mask", lambda o: o.transform_points_backward(torch.zeros(1, 2, 6), [F2], P2,
                                                                             [True, True], True), r"chain_needs_grad"),
    ("transform_points_backward grad", lambda o: o.transform_points_backward(torch.zeros(1, 2, 7), [F2], P2, [True],
                                                                             True), r"grad"),
    ("warp_backward mask", lambda o: o.warp_backward(torch.zeros(1, 1, 4, 5), image(), [F2], [4, 5], True, []),
     r"chain_needs_grad"),
    ("warp_backward grad", lambda o: o.warp_backward(torch.zeros(1, 1, 4, 6), image(), [F2], [4, 5], True, [True]),
     r"grad"),
    ("gradicon_loss_backward mask", lambda o: o.gradicon_loss_backward(G, [F2], [F2], [4, 5], 1, None, 0, 1e-3, 0.1,
                                                                       [True], [True, False]), r"ba_needs_grad"),
    ("icon_loss_backward mask", lambda o: o.icon_loss_backward(G, [F2], [F2], [4, 5], None, 0, 0.1, [], [True]),
     r"ab_needs_grad"),
    ("normal_noise_ batch", lambda o: o.normal_noise_(torch.empty(2, 2, 4, 5), 0), r"out"),
    ("normal_noise_ channels", lambda o: o.normal_noise_(torch.empty(1, 5, 4, 5), 0), r"out"),
    ("normal_noise_ rank", lambda o: o.normal_noise_(torch.empty(1, 2), 0), r"out"),
    ("normal_noise_ non-contiguous", lambda o: o.normal_noise_(torch.empty(1, 2, 5, 4).transpose(2, 3), 0),
     r"contiguous"),
    ("gradicon batch size 0", lambda o: o.gradicon_loss([field(0)], [F2], [4, 5], 1, None, 0, 1e-3, 0.1),
     r"chain_AB.*batch size 0"),
    ("icon batch size 0", lambda o: o.icon_loss([F2], [field(0)], [4, 5], None, 0, 0.1), r"chain_BA.*batch size 0"),
    ("analytic batch size 0", lambda o: o.gradicon_analytic_loss([field(0)], [F2], [4, 5], 1, None, 0, 0.1),
     r"chain_AB.*batch size 0"),
    ("warp image batch size 0", lambda o: o.warp(image(0), [F2], [4, 5]), r"image.*batch size 0"),
    ("warp image size 0", lambda o: o.warp(image(shape=(0, 5)), [F2], [4, 5]), r"image.*spatial size"),
    ("points batch size 0", lambda o: o.transform_points([F2], points(0)), r"points.*batch size 0"),
    ("warp_backward grad dtype", lambda o: o.warp_backward(torch.zeros(1, 1, 4, 5, dtype=torch.float64), image(),
                                                           [F2], [4, 5], True, [True]), r"grad.*dtype"),
    ("transform_points_backward grad dtype", lambda o: o.transform_points_backward(
        torch.zeros(1, 2, 6, dtype=torch.float64), [F2], P2, [True], True), r"grad.*dtype"),
]


@requires_cpu_kernels
@pytest.mark.parametrize("call, pattern", [c[1:] for c in DIRECT_CASES], ids=[c[0] for c in DIRECT_CASES])
def test_compiled_ops_reject(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call(ops())


@requires_cpu_kernels
def test_compiled_ops_reject_mixed_devices():
    with pytest.raises(RuntimeError, match=re.compile(r"meta|device", re.I)):
        ops().transform_points([F2, field(device="meta")], P2)
