"""torch.library.opcheck on the compiled ops: schema, autograd registration, fake (meta) kernels and
AOT dispatch, in float32 and float64, with inputs that do and do not require grad."""

import pytest
import torch

from gradicon_fast import reference as R

from conftest import rand_uniform, random_field, random_points, requires_cpu_kernels

pytestmark = requires_cpu_kernels

FOUNDATION_OPS = ["normal_noise_", "transform_points", "transform_points_backward", "warp", "warp_backward",
                  "gradicon_loss", "gradicon_loss_backward", "icon_loss", "icon_loss_backward"]


def ops():
    import gradicon_fast.ops  # noqa: F401  (registers the autograd and fake kernels)

    return torch.ops.gradicon_fast


def test_all_foundation_ops_are_registered():
    for name in FOUNDATION_OPS:
        assert hasattr(ops(), name), name


def cases(rng, d, dtype, requires_grad):
    """(op name, args) for every foundation op on small random inputs."""
    shape = (4, 5, 3)[:d] if d == 3 else (4, 5)
    fshape = (3, 4, 5)[:d] if d == 3 else (3, 4)

    def field(batch, s, magnitude=0.1):
        return random_field(rng, batch, s, magnitude, dtype).requires_grad_(requires_grad)

    ab = [field(2, shape), field(1, fshape)]
    ba = [field(2, fshape)]
    points = random_points(rng, 2, d, (7,), dtype=dtype).requires_grad_(requires_grad)
    image = rand_uniform(rng, (2, 2, *fshape), dtype=dtype).requires_grad_(requires_grad)
    out_shape = list(reversed(shape))
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64).to(dtype)
    sparse_noise = torch.randn(1, d, *R.loss_points_shape(shape, 2), generator=rng, dtype=torch.float64).to(dtype)
    seed = int(torch.randint(0, 2**62, (1,), generator=rng))
    detached = [f.detach() for f in ab]
    one = torch.tensor(1.0, dtype=dtype)
    return [
        ("normal_noise_", (torch.empty(1, d, *shape, dtype=dtype), seed)),
        ("transform_points", (ab, points)),
        ("warp", (image, ab, out_shape)),
        ("gradicon_loss", (ab, ba, list(shape), 1, noise, 0, 1e-3, 0.2)),
        ("gradicon_loss", (ab, ba, list(shape), 2, sparse_noise, 0, 1e-3, 0.4)),
        ("gradicon_loss", (ab, ba, list(shape), 2, None, seed, 1e-3, 0.4)),
        ("icon_loss", (ab, ba, list(shape), noise, 0, 0.2)),
        ("icon_loss", (ab, ba, list(shape), None, seed, 0.2)),
        # backward ops: called by the autograd kernels on detached inputs
        ("transform_points_backward", (torch.randn(2, d, 7, generator=rng, dtype=torch.float64).to(dtype), detached,
                                       points.detach(), [True, False], True)),
        ("transform_points_backward", (torch.randn(2, d, 7, generator=rng, dtype=torch.float64).to(dtype), detached,
                                       points.detach(), [False, True], False)),
        ("warp_backward", (torch.randn(2, 2, *out_shape, generator=rng, dtype=torch.float64).to(dtype),
                           image.detach(), detached, out_shape, True, [True, True])),
        ("warp_backward", (torch.randn(2, 2, *out_shape, generator=rng, dtype=torch.float64).to(dtype),
                           image.detach(), detached, out_shape, False, [False, True])),
        ("gradicon_loss_backward", (one, detached, [f.detach() for f in ba], list(shape), 1, noise, 0, 1e-3, 0.2,
                                    [True, False], [True])),
        ("gradicon_loss_backward", (one, detached, [f.detach() for f in ba], list(shape), 2, None, seed, 1e-3, 0.4,
                                    [False, True], [False])),
        ("icon_loss_backward", (one, detached, [f.detach() for f in ba], list(shape), noise, 0, 0.2,
                                [True, True], [True])),
        ("icon_loss_backward", (one, detached, [f.detach() for f in ba], list(shape), None, seed, 0.2,
                                [True, False], [False])),
    ]


@pytest.mark.parametrize("dtype, d, requires_grad", [(torch.float32, 3, True), (torch.float64, 2, True),
                                                     (torch.float64, 3, False), (torch.float32, 2, False)])
def test_opcheck(rng, dtype, d, requires_grad):
    covered = set()
    for name, args in cases(rng, d, dtype, requires_grad):
        result = torch.library.opcheck(getattr(ops(), name), args)
        assert all(v == "SUCCESS" for v in result.values()), (name, result)
        covered.add(name)
    assert covered == set(FOUNDATION_OPS)
