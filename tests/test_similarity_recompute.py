"""LNCC's blur as banded matrix products, and its blurred products recomputed in backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradicon_fast.nn import similarity
from gradicon_fast.nn.similarity import gaussian_blur, gaussian_taps, lncc, lncc_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _depthwise_blur(x: torch.Tensor, sigma: int) -> torch.Tensor:
    """The blur as a zero-padded depthwise convolution along each axis, in float64."""
    taps = gaussian_taps(sigma, dtype=torch.float64)
    d, k, c = x.ndim - 2, taps.numel(), x.shape[1]
    conv = F.conv2d if d == 2 else F.conv3d
    x = x.double()
    for axis in range(d):
        shape = [1] * d
        shape[axis] = k
        padding = [0] * d
        padding[axis] = k // 2
        x = conv(x, taps.reshape(1, 1, *shape).expand(c, 1, *shape), padding=tuple(padding), groups=c)
    return x


@pytest.mark.parametrize("shape, sigma", [((7, 30, 12), 5), ((3, 1, 25), 2), ((18, 5), 5), ((9, 9), 1)])
def test_blur_equals_the_depthwise_convolution_also_on_axes_shorter_than_the_kernel(shape, sigma):
    x = torch.rand((2, 3, *shape), generator=torch.Generator().manual_seed(0))
    out = gaussian_blur(x, sigma)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), _depthwise_blur(x, sigma), rtol=0, atol=1e-6)


def test_lncc_keeps_only_the_images_and_its_gradient_is_that_of_the_plain_map():
    gen = torch.Generator().manual_seed(1)
    I = torch.rand((1, 1, 20, 18, 16), generator=gen, requires_grad=True)
    J = torch.rand((1, 1, 20, 18, 16), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = lncc_loss(I, J, 3)
    assert sum(saved) <= 2 * I.numel()  # the two images, not the blurred products
    (grad,) = torch.autograd.grad(loss, I)
    plain = 1 - similarity._lncc_map(I, J, 3).mean()
    (plain_grad,) = torch.autograd.grad(plain, I)
    assert torch.equal(loss.detach(), plain.detach()) and torch.equal(grad, plain_grad)
    with torch.no_grad():
        assert torch.equal(lncc(I, J, 3), similarity._lncc_map(I, J, 3))
