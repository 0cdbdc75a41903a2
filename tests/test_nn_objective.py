"""The GradICON objective through the fused ops equals the same objective through the reference."""

import pytest
import torch

import gradicon_fast as gf
import gradicon_fast.nn as gnn
from gradicon_fast.nn.similarity import gaussian_blur, gaussian_taps, lncc_loss, mse_loss, squared_lncc_loss

from conftest import requires_cpu_kernels


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed_network(shape, *, seed=0, std=0.01, **kwargs):
    """A standard network whose zero-initialised last layers are made random, so fields are not zero."""
    torch.manual_seed(seed)
    model = gnn.standard_network(shape, **kwargs)
    with torch.no_grad():
        for step in gnn.displacement_fields(model):
            step.net.lastConv.weight.normal_(0, std)
            step.net.lastConv.bias.normal_(0, std)
    return model


def analytic_available() -> bool:
    field = torch.zeros(1, 2, 4, 4)
    try:
        gf.gradicon_loss([field], [field], shape=(4, 4), mode="analytic", backend="cpu")
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def _loss_and_grads(model, A, B, noise, backend):
    model.backend = backend
    model.zero_grad(set_to_none=True)
    terms = model(A, B, noise=noise)
    terms.total.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return terms, grads


@requires_cpu_kernels
@pytest.mark.parametrize("shape, regularizer", [
    ((48, 40), "gradicon"),
    ((48, 40), "gradicon_dense"),
    ((48, 40), "icon"),
    ((48, 40), "gradicon_analytic"),
    ((24, 20, 16), "gradicon"),
])
def test_fused_objective_matches_reference(shape, regularizer):
    if regularizer == "gradicon_analytic" and not analytic_available():
        pytest.skip("analytic GradICON is not available in this build")
    model = perturbed_network(shape, regularizer=regularizer)
    g = torch.Generator().manual_seed(1)
    A = torch.rand((2, 1, *shape), generator=g)
    B = torch.rand((2, 1, *shape), generator=g)
    noise = torch.randn(model.noise_shape(), generator=g)

    fused, grads_fused = _loss_and_grads(model, A, B, noise, "cpu")
    ref, grads_ref = _loss_and_grads(model, A, B, noise, "torch")

    assert fused.regularization > 1e-4, "the perturbed network should produce non-trivial fields"
    for name in ("total", "similarity", "regularization"):
        a, b = getattr(fused, name), getattr(ref, name)
        assert torch.allclose(a, b, rtol=1e-5, atol=0), f"{name}: fused {a.item()} vs reference {b.item()}"
    assert fused.fold_percentage == ref.fold_percentage
    # The finite-difference penalty divides float32 differences by δ = 1e-3, so its gradient agrees
    # between backends to ~1e-5 only (the ops alone differ by ~3e-5 here); through the network: ~1e-4.
    rel = (grads_fused - grads_ref).norm() / grads_ref.norm()
    assert rel < 1e-3, f"gradients differ: relative error {rel.item():.3g}"


@requires_cpu_kernels
def test_generator_makes_penalty_reproducible():
    model = perturbed_network((32, 24), width=0.25)
    A, B = torch.rand(1, 1, 32, 24), torch.rand(1, 1, 32, 24)
    model.backend = "cpu"
    a = model(A, B, generator=torch.Generator().manual_seed(5)).regularization
    b = model(A, B, generator=torch.Generator().manual_seed(5)).regularization
    c = model(A, B, generator=torch.Generator().manual_seed(6)).regularization
    assert a == b and a != c


def test_objective_terms_and_regularizers():
    shape = (32, 24)
    A, B = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    for regularizer in gnn.REGULARIZERS:
        if regularizer == "gradicon_analytic" and not analytic_available():
            continue  # analytic GradICON not available in this build
        model = perturbed_network(shape, width=0.25, regularizer=regularizer, lmbda=2.0)
        terms = model(A, B, generator=torch.Generator().manual_seed(0))
        assert isinstance(terms, gnn.LossTerms)
        assert torch.allclose(terms.total, 2.0 * terms.regularization + terms.similarity)
        assert terms.regularization > 0 and torch.isfinite(terms.total)
        assert not terms.fold_percentage.requires_grad


def test_similarity_is_symmetric_sum_of_both_directions():
    shape = (32, 24)
    model = perturbed_network(shape, width=0.25, similarity="mse")
    A, B = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    terms = model(A, B, generator=torch.Generator().manual_seed(0))
    result = model.register(A, B)
    expected = mse_loss(result.warp(A), B) + mse_loss(result.warp(B, "BA"), A)
    assert torch.allclose(terms.similarity, expected, rtol=1e-6)


def test_input_shape_is_checked():
    model = gnn.standard_network((32, 24), width=0.25)
    with pytest.raises(ValueError, match="input shape"):
        model(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    assert model.input_shape == (32, 24)
    assert model.noise_shape() == (1, 2, 16, 12)
    assert gnn.standard_network((32, 24), regularizer="gradicon_dense", width=0.25).noise_shape() == (1, 2, 32, 24)


# ---- similarity (docs/conventions.md §3) -------------------------------------------------------------------


def test_gaussian_taps():
    taps = gaussian_taps(5)
    assert taps.numel() == 21 and abs(float(taps.sum()) - 1) < 1e-6
    x = torch.arange(21.0) - 10
    w = torch.exp(-x ** 2 / 50)
    assert torch.allclose(taps, w / w.sum())


def test_blur_is_separable_zero_padded_same_size():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 11, 9, 7, generator=g)
    sigma = 1
    taps = gaussian_taps(sigma).double()
    kernel = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
    expected = torch.nn.functional.conv3d(x.double(), kernel[None, None], padding=2)
    out = gaussian_blur(x, sigma)
    assert out.shape == x.shape
    assert torch.allclose(out.double(), expected, atol=1e-6)


def test_lncc_values():
    g = torch.Generator().manual_seed(0)
    I = torch.rand(2, 1, 24, 20, generator=g)
    assert lncc_loss(I, I, 2) < 1e-3
    assert lncc_loss(I, 3 * I, 2) < 1e-3  # invariant to intensity scaling (zero padding breaks offsets at the border)
    assert lncc_loss(I, -I, 2) > 1.99
    assert squared_lncc_loss(I, -I, 2) < 1e-3
    J = torch.rand(2, 1, 24, 20, generator=g)
    assert 0.5 < lncc_loss(I, J, 2) < 1.5
    assert torch.allclose(mse_loss(I, J), ((I - J) ** 2).mean())
