"""The op table (gradicon_fast.op_registry): one declaration of each op's fake kernel and autograd
serves every backend, and a backend is one registration.

A toy backend, the extension's CPU kernels called from Python bodies, is registered as a new
namespace: its ops must pass torch.library.opcheck (schema, fake kernels, autograd registration)
and differentiate like the PyTorch reference, through the table's autograd formula and the
backward ops, whichever inputs want gradients.
"""

import pytest
import torch

from gradicon_fast import op_registry
from gradicon_fast import reference as R

from conftest import random_field, random_points, requires_cpu_kernels

pytestmark = requires_cpu_kernels
Tensor = torch.Tensor
NAMESPACE = "gradicon_fast_registry_test"


def _kernels():
    import gradicon_fast.ops  # noqa: F401  (the extension's ops with their fake kernels)

    return torch.ops.gradicon_fast


# The toy backend's bodies: the extension's CPU kernels, called from Python.
def _transform_points(chain: list[Tensor], points: Tensor) -> Tensor:
    return _kernels().transform_points(chain, points)


def _transform_points_backward(grad: Tensor, chain: list[Tensor], points: Tensor, chain_needs_grad: list[bool],
                               points_needs_grad: bool) -> tuple[list[Tensor], Tensor]:
    return _kernels().transform_points_backward(grad, chain, points, chain_needs_grad, points_needs_grad)


def _icon_loss(chain_ab: list[Tensor], chain_ba: list[Tensor], shape: list[int], noise: Tensor | None, seed: int,
               noise_scale: float) -> Tensor:
    return _kernels().icon_loss(chain_ab, chain_ba, shape, noise, seed, noise_scale)


def _icon_loss_backward(grad: Tensor, chain_ab: list[Tensor], chain_ba: list[Tensor], shape: list[int],
                        noise: Tensor | None, seed: int, noise_scale: float, ab_needs_grad: list[bool],
                        ba_needs_grad: list[bool]) -> tuple[list[Tensor], list[Tensor]]:
    return _kernels().icon_loss_backward(grad, chain_ab, chain_ba, shape, noise, seed, noise_scale, ab_needs_grad,
                                         ba_needs_grad)


@pytest.fixture(scope="module")
def toy_ops():
    traced = op_registry.register_python(NAMESPACE, {
        "transform_points": _transform_points,
        "transform_points_backward": _transform_points_backward,
        "icon_loss": _icon_loss,
        "icon_loss_backward": _icon_loss_backward,
    })
    assert traced == set()  # no traceable_op given: every op is an opaque custom_op
    return getattr(torch.ops, NAMESPACE)


def _cases(rng, requires_grad):
    shape = [4, 5, 3]
    ab = [random_field(rng, 2, shape, 0.1).requires_grad_(requires_grad),
          random_field(rng, 1, [3, 4, 4], 0.1).requires_grad_(requires_grad)]
    ba = [random_field(rng, 2, [3, 4, 5], 0.1).requires_grad_(requires_grad)]
    points = random_points(rng, 2, 3, (7,)).requires_grad_(requires_grad)
    noise = torch.randn(1, 3, *shape, generator=rng, dtype=torch.float64)
    return [("transform_points", (ab, points)), ("icon_loss", (ab, ba, shape, noise, 0, 0.2)),
            ("icon_loss", (ab, ba, shape, None, 0, 0.2))]


@pytest.mark.parametrize("requires_grad", [True, False])
def test_a_registered_backend_passes_opcheck(toy_ops, rng, requires_grad):
    for name, args in _cases(rng, requires_grad):
        result = torch.library.opcheck(getattr(toy_ops, name), args)
        assert all(v == "SUCCESS" for v in result.values()), (name, result)


@pytest.mark.parametrize("first", [0, 1])
def test_a_registered_backend_differentiates_like_its_reference(toy_ops, rng, first):
    reference = {"transform_points": R.transform_points,
                 "icon_loss": lambda ab, ba, shape, noise, seed, scale: R.icon_loss(ab, ba, shape=shape, noise=noise,
                                                                                    noise_scale=scale)}
    for name, args in _cases(rng, False)[:2]:  # the third draws its noise from the seed: not for the reference
        tensors = [t for x in args[:2] for t in (x if isinstance(x, list) else [x])]  # the differentiable inputs
        # Every other input wants a gradient: the backward op gets the flags, the others get None.
        wanted = [t.requires_grad_() for t in tensors[first::2]]
        got = torch.autograd.grad(getattr(toy_ops, name)(*args).square().sum(), wanted)
        want = torch.autograd.grad(reference[name](*args).square().sum(), wanted)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_fake_kernels_give_the_output_shapes(toy_ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        chain = [torch.empty(2, 3, 4, 5, 6), torch.empty(1, 3, 3, 3, 3)]
        assert toy_ops.transform_points(chain, torch.empty(1, 3, 10)).shape == (2, 3, 10)
        grads, grad_points = toy_ops.transform_points_backward(torch.empty(2, 3, 10), chain, torch.empty(1, 3, 10),
                                                               [True, False], True)
        assert [g.shape for g in grads] == [(2, 3, 4, 5, 6), (0,)] and grad_points.shape == (1, 3, 10)
        assert toy_ops.icon_loss(chain, chain, [4, 5, 6], None, 3, 0.2).shape == ()
        with pytest.raises(ValueError, match="batch sizes"):
            toy_ops.transform_points([torch.empty(2, 3, 4, 5, 6)], torch.empty(3, 3, 10))


def test_every_op_of_the_extension_is_in_the_table():
    from gradicon_fast import ops

    defined = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("gradicon_fast::")}
    assert defined - {"built_with_cuda"} == set(ops.EXTENSION_OPS)
    assert set(ops.EXTENSION_OPS) <= set(op_registry.OPS)


def test_each_fused_backend_has_one_module_of_wrappers():
    from gradicon_fast import backend_registry, ops

    assert backend_registry.fused_ops("cpu") is ops and backend_registry.fused_ops("cuda") is ops
    with pytest.raises(ValueError, match="no fused ops"):
        backend_registry.fused_ops("torch")
