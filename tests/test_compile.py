"""torch.compile(fullgraph=True) through the public API on the fused CPU ops: the same values and
gradients as eager (the ops' fake kernels let the whole function trace as one graph)."""

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import reference as R

from conftest import leaves, rand_uniform, random_field, random_points, requires_cpu_kernels

pytestmark = requires_cpu_kernels


@pytest.mark.parametrize("dtype", [torch.float32])
def test_compiled_equals_eager(rng, dtype):
    torch._dynamo.reset()
    d = 3
    ab = [random_field(rng, 2, (4, 5, 6), 0.05, dtype), random_field(rng, 1, (3, 4, 5), 0.05, dtype)]
    ba = [random_field(rng, 2, (5, 4, 3), 0.05, dtype)]
    shape = (5, 6, 4)
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64).to(dtype)
    sparse = torch.randn(1, d, *R.loss_points_shape(shape, 2), generator=rng, dtype=torch.float64).to(dtype)
    points = random_points(rng, 2, d, (7, 2), dtype=dtype)
    image = rand_uniform(rng, (1, 2, 6, 5, 4), dtype=dtype)

    def objective(a1, a2, b1, x, img):
        reg = gf.gradicon_loss([a1, a2], [b1], shape=shape, noise=noise, backend="cpu")
        reg = reg + gf.gradicon_loss([a1, a2], [b1], shape=shape, stride=2, noise=sparse, symmetric=True,
                                     backend="cpu")
        reg = reg + gf.icon_loss([a1, a2], [b1], shape=shape, noise=noise, backend="cpu")
        y = gf.transform_points([a1, a2], x, backend="cpu")
        warped = gf.warp(img, [b1], shape=(3, 5, 4), backend="cpu")
        return reg + (y ** 2).mean() + (warped ** 2).mean()

    compiled = torch.compile(objective, fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        xs = leaves(ab + ba + [points, image])
        got = compiled(*xs)
        got_grads = torch.autograd.grad(got, xs)
        ys = leaves(ab + ba + [points, image])
        expected = objective(*ys)
        expected_grads = torch.autograd.grad(expected, ys)
        # the same kernels run in both: equal up to the summation order of the graph's adds
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)
        ab = [f * 1.1 for f in ab]  # new values, same shapes
