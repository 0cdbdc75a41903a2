"""``gradicon_fast.compat.icon.GradientICONSparse`` against ``icon_registration.losses.GradientICONSparse``.

Two copies of the same official network, one in each loss module, the same images and the same
seed: the same loss terms, maps, warped images and parameter gradients, and the same trajectory
over a few optimiser steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from icon_oracle import SHAPE_2D, icon, icon_losses, image_pair, official_network, official_noise, randomize

from gradicon_fast.compat import icon as compat

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems on shared cores

FIELDS = ("all_loss", "inverse_consistency_loss", "similarity_loss", "transform_magnitude", "flips")


def both_losses(network, shape, similarity, lmbda=1.5):
    """(official loss around a copy of ``network``, compat loss around ``network`` itself)."""
    official = icon_losses.GradientICONSparse(copy.deepcopy(network), similarity, lmbda=lmbda)
    drop_in = compat.GradientICONSparse(network, similarity, lmbda=lmbda)
    for loss in (official, drop_in):
        loss.assign_identity_map((1, 1) + tuple(shape))
    return official, drop_in


def gradients(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def assert_same_terms(got, expected, *, penalty_rtol=2e-3):
    assert type(got)._fields == type(expected)._fields == FIELDS
    torch.testing.assert_close(got.similarity_loss, expected.similarity_loss, rtol=1e-5, atol=1e-7)
    # the official finite differences (δ = 0.001) in float32: rounding of the points shows at ~1e-4
    torch.testing.assert_close(got.inverse_consistency_loss, expected.inverse_consistency_loss, rtol=penalty_rtol,
                               atol=1e-7)
    torch.testing.assert_close(got.all_loss, expected.all_loss, rtol=1e-4, atol=1e-7)
    # mean squared displacement: float32 maps that agree to ~1e-7 make ~1e-4 of it on small displacements
    torch.testing.assert_close(got.transform_magnitude, expected.transform_magnitude, rtol=1e-3, atol=1e-12)
    assert float(got.flips) == float(expected.flips)


def assert_same_gradients(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-3):
    """Gradients agree to ``tol`` of the largest one (entries near 0 included: biases before BatchNorm)."""
    assert expected.abs().max() > 0
    assert (got - expected).abs().max() <= tol * expected.abs().max()
    assert (got - expected).norm() <= tol * expected.norm()


@pytest.mark.parametrize("steps", [4, 3])
def test_same_terms_maps_and_gradients_as_the_official_loss(steps):
    torch.manual_seed(steps)
    network = randomize(official_network(2, steps), seed=steps)  # train mode: batch statistics
    official, drop_in = both_losses(network, SHAPE_2D, icon_losses.LNCC(sigma=5))
    image_A, image_B = image_pair(SHAPE_2D, batch=2, seed=1)

    torch.manual_seed(11)
    expected = official(image_A, image_B)
    torch.manual_seed(11)
    got = drop_in(image_A, image_B)
    assert expected.inverse_consistency_loss > 1e-4
    assert_same_terms(got, expected)
    for name in ("phi_AB_vectorfield", "phi_BA_vectorfield", "warped_image_A", "warped_image_B"):
        torch.testing.assert_close(getattr(drop_in, name), getattr(official, name), rtol=0, atol=1e-5)
    points = torch.rand((1, 2, 7, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(drop_in.phi_AB(points), official.phi_AB(points), rtol=0, atol=1e-5)
    for ours, theirs in zip(drop_in.regis_net.buffers(), official.regis_net.buffers()):  # BatchNorm statistics
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    got.all_loss.backward()
    expected.all_loss.backward()
    assert_same_gradients(gradients(drop_in.regis_net), gradients(official.regis_net))


def test_the_network_is_the_users_own():
    network = official_network(2, 3)
    drop_in = compat.GradientICONSparse(network, icon_losses.LNCC(sigma=5), lmbda=1.5)
    drop_in.assign_identity_map((1, 1) + SHAPE_2D)
    assert drop_in.regis_net is network
    assert [id(p) for p in drop_in.parameters()] == [id(p) for p in network.parameters()]
    reference = icon_losses.GradientICONSparse(official_network(2, 3), icon_losses.LNCC(sigma=5), lmbda=1.5)
    reference.assign_identity_map((1, 1) + SHAPE_2D)
    assert drop_in.state_dict().keys() == reference.state_dict().keys()  # checkpoints interchange
    # the network got its identity maps too, so that it runs on its own as in the official package
    assert network.identity_map.shape == (1, 2) + SHAPE_2D


def test_seeding_is_passing_the_official_noise():
    torch.manual_seed(0)
    network = randomize(official_network(2, 3), seed=0).eval()
    drop_in = compat.GradientICONSparse(network, icon_losses.LNCC(sigma=5), lmbda=1.5)
    drop_in.assign_identity_map((1, 1) + SHAPE_2D)
    image_A, image_B = image_pair(SHAPE_2D, batch=1, seed=2)
    with torch.no_grad():
        torch.manual_seed(5)
        seeded = drop_in(image_A, image_B)
        given = drop_in(image_A, image_B, noise=official_noise(SHAPE_2D, 5))
        other = drop_in(image_A, image_B, noise=official_noise(SHAPE_2D, 6))
    assert float(seeded.inverse_consistency_loss) == float(given.inverse_consistency_loss)
    assert float(other.inverse_consistency_loss) != float(given.inverse_consistency_loss)


def test_training_follows_the_official_trajectory():
    torch.manual_seed(1)
    network = randomize(official_network(2, 4), seed=1)
    official, drop_in = both_losses(network, SHAPE_2D, icon_losses.LNCC(sigma=5))
    image_A, image_B = image_pair(SHAPE_2D, batch=2, seed=3)
    # SGD: Adam's first steps are ±lr for every parameter, whatever the size of its gradient, so
    # rounding-level gradients (biases before BatchNorm) would make the copies differ by 2·lr at once.
    optimizers = [torch.optim.SGD(loss.regis_net.parameters(), lr=5e-3) for loss in (official, drop_in)]
    for step in range(3):
        terms = []
        for loss, optimizer in zip((official, drop_in), optimizers):
            optimizer.zero_grad()
            torch.manual_seed(100 + step)
            terms.append(loss(image_A, image_B))
            terms[-1].all_loss.backward()
        assert_same_terms(terms[1], terms[0])
        if step < 2:  # float32 differences grow along the way (~5x a step here): the last one is left out
            assert_same_gradients(gradients(drop_in.regis_net), gradients(official.regis_net), tol=2e-3)
        for optimizer in optimizers:
            optimizer.step()
    moved = max((a - b).abs().max() for a, b in zip(network.parameters(), randomize(official_network(2, 4), seed=1)
                                                    .parameters()))
    assert moved > 1e-3  # the steps changed the weights
    for ours, theirs in zip(drop_in.regis_net.parameters(), official.regis_net.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


class TinyField(nn.Module):
    """Any module ``net(moving, fixed)`` returning a displacement field: one convolution."""

    def __init__(self, dimension: int, seed: int):
        super().__init__()
        conv = nn.Conv2d if dimension == 2 else nn.Conv3d
        self.conv = conv(2, dimension, 3, padding=1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(0.2 * torch.randn(self.conv.weight.shape, generator=gen))

    def forward(self, moving, fixed):
        return 0.03 * torch.tanh(self.conv(torch.cat([moving, fixed], dim=1)))


# (The official LNCCOnlyInterpolated takes square roots of variances without clamping them at 0: NaN
# wherever rounding makes one negative, as on this 3D pair; it is tested in 2D.)
@pytest.mark.parametrize("shape, similarity", [((18, 13), "lncc"), ((18, 13), "lncc_only_interpolated"),
                                               ((18, 13), "ssd_only_interpolated"), ((14, 11, 17), "lncc"),
                                               ((14, 11, 17), "ssd_only_interpolated")])
def test_any_displacement_network_and_similarity(shape, similarity):
    d = len(shape)
    network = icon.TwoStepRegistration(
        icon.DownsampleRegistration(icon.FunctionFromVectorField(TinyField(d, 1)), dimension=d),
        icon.TwoStepRegistration(icon.FunctionFromVectorField(TinyField(d, 2)),
                                 icon.FunctionFromVectorField(TinyField(d, 3))))
    make = {"lncc": lambda: icon_losses.LNCC(sigma=2),
            "lncc_only_interpolated": lambda: icon_losses.LNCCOnlyInterpolated(sigma=2),
            "ssd_only_interpolated": lambda: icon_losses.SSDOnlyInterpolated()}[similarity]
    official, drop_in = both_losses(network, shape, make(), lmbda=0.7)
    image_A, image_B = image_pair(shape, batch=2, seed=4)
    torch.manual_seed(21)
    expected = official(image_A, image_B)
    torch.manual_seed(21)
    got = drop_in(image_A, image_B)
    assert_same_terms(got, expected)
    torch.testing.assert_close(drop_in.warped_image_A, official.warped_image_A, rtol=0, atol=1e-5)
    got.all_loss.backward()
    expected.all_loss.backward()
    assert_same_gradients(gradients(drop_in.regis_net), gradients(official.regis_net))


def test_misuse_is_named():
    image = torch.rand(1, 1, *SHAPE_2D)
    drop_in = compat.GradientICONSparse(official_network(2, 3), icon_losses.LNCC(sigma=5), lmbda=1.5)
    with pytest.raises(RuntimeError, match="assign_identity_map"):
        drop_in(image, image)
    drop_in.assign_identity_map((1, 1) + SHAPE_2D)
    with pytest.raises(ValueError, match=r"spatial shape \(20, 28\)"):
        drop_in(image[..., :-1], image[..., :-1])
    with pytest.raises(ValueError, match="input_shape"):
        drop_in.assign_identity_map((1, 1, 20))

    class Affine(nn.Module):
        def forward(self, moving, fixed):
            return torch.eye(2, 3).expand(moving.shape[0], 2, 3)

    affine = compat.GradientICONSparse(icon.FunctionFromMatrix(Affine()), icon_losses.LNCC(sigma=5), lmbda=1.5)
    affine.assign_identity_map((1, 1) + SHAPE_2D)
    with pytest.raises(TypeError, match="FunctionFromMatrix"):
        affine(image, image)


def test_the_official_training_loop_runs_it():
    """``icon_registration.train.train_datasets`` (the package's own loop) with the drop-in: same history."""
    from icon_registration.train import train_datasets

    torch.manual_seed(2)
    network = randomize(official_network(2, 3), seed=2)
    official, drop_in = both_losses(network, SHAPE_2D, icon_losses.LNCC(sigma=5))
    pairs = [image_pair(SHAPE_2D, batch=2, seed=s) for s in (5, 6)]
    histories = []
    for loss in (official, drop_in):
        optimizer = torch.optim.SGD(loss.regis_net.parameters(), lr=5e-3)
        torch.manual_seed(8)
        histories.append(train_datasets(loss, optimizer, [(a,) for a, _ in pairs], [(b,) for _, b in pairs],
                                        epochs=1))
    assert len(histories[1]) == 2
    for got, expected in zip(histories[1], histories[0]):
        assert type(got)._fields == FIELDS
        assert got.similarity_loss == pytest.approx(expected.similarity_loss, rel=1e-5)
        assert got.inverse_consistency_loss == pytest.approx(expected.inverse_consistency_loss, rel=2e-3)
        assert got.flips == expected.flips
