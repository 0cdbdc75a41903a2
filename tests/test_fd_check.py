"""The test suite's own instruments: the seed of the `rng` fixture, and fd_check's float32 check of
the finite-difference GradICON (it must pass the float32 reference and fail realistic bugs)."""

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import reference as R

from conftest import SEED_VARIABLE, drawn_seed, smooth_field
from fd_check import check_fd, fd_kink_entries


def test_seed_variable_forces_the_seed(monkeypatch):
    monkeypatch.setenv(SEED_VARIABLE, "3943008167")
    assert drawn_seed() == 3943008167
    monkeypatch.setenv(SEED_VARIABLE, "seven")
    with pytest.raises(pytest.UsageError, match=SEED_VARIABLE):
        drawn_seed()
    monkeypatch.delenv(SEED_VARIABLE)
    assert len({drawn_seed() for _ in range(4)}) > 1  # fresh bits otherwise


def test_kink_entries_are_the_inner_corners_of_points_on_a_grid_line():
    """One point whose outer field is sampled exactly on one of its grid lines: the corners of the
    inner field's cell around it are marked, nothing of the outer field; shifted off the line by
    far more than float32 rounding, nothing is marked."""
    outer = torch.zeros(1, 2, 5, 5, dtype=torch.float64)  # grid lines at multiples of 1/4
    inner = torch.zeros(1, 2, 4, 4, dtype=torch.float64)  # lines at multiples of 1/3
    inner[:, 0] = 0.05                                     # moves the points by 0.05 along axis 0
    for x0, marked in ((0.45, True), (0.4, False)):        # 0.45 + 0.05 = 0.5 lies on a line of outer
        points = torch.tensor([[[x0], [0.6]]], dtype=torch.float64)
        outer_mask, inner_mask = fd_kink_entries([outer], [inner], points, delta=1e-3)
        assert not outer_mask.any()
        expected = torch.zeros(1, 4, 4, dtype=torch.bool)
        if marked:
            expected[0, 1:3, 1:3] = True  # the cell of (0.45, 0.6): rows 1-2, columns 1-2
        assert torch.equal(inner_mask, expected)


def _fd_penalty(fields, shape, noise, axes):
    """The finite-difference GradICON (one direction, stride 1) summed over ``axes`` only."""
    points = R.loss_points(shape, 1, noise, 1 / shape[-1])
    error = points - R.transform_points(fields, points)
    total = 0
    for k in axes:
        shifted = points.clone()
        shifted[:, k] += 1e-3
        total = total + torch.mean(((error - (shifted - R.transform_points(fields, shifted))) / 1e-3) ** 2)
    return total


@pytest.mark.parametrize("bug", [None, "corner weight", "dropped axis"])
def test_check_fd_passes_the_float32_reference_and_fails_bugs(rng, bug):
    d, shape = 3, (9, 8, 10)
    fields = [smooth_field(rng, 1, s, 0.08, torch.float32, control=4).requires_grad_()
              for s in ((7, 9, 8), (10, 8, 9), (6, 7, 5))]
    noise = torch.randn(1, d, *shape, generator=rng)
    loss = _fd_penalty(fields, shape, noise, range(d - 1) if bug == "dropped axis" else range(d))
    grads = list(torch.autograd.grad(loss, fields))
    if bug == "corner weight":  # every other entry along the last axis 0.5 % off
        grads = [g * (1 + 0.005 * (torch.arange(g.shape[-1]) % 2)) for g in grads]
    assert torch.allclose(loss, gf.gradicon_loss(fields[:2], fields[2:], shape=shape, noise=noise, backend="torch")
                          ) or bug == "dropped axis"
    if bug is None:
        check_fd((loss, grads), fields, "float32 reference", n_ab=2, shape=shape, noise=noise)
    else:
        with pytest.raises(AssertionError, match="float32 reference"):
            check_fd((loss, grads), fields, "float32 reference", n_ab=2, shape=shape, noise=noise)
