"""Dice, folds and landmark mTRE (voxel ↔ [0, 1] conventions, mm with the moving spacing)."""

import math

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast.evaluation import (dice, dice_per_label, evaluate_labels, initial_mtre, landmark_errors,
                                      map_landmarks, mtre, unit_to_voxel, voxel_to_unit)
from gradicon_fast.nn import RegistrationResult


def constant_result(shape, shift_AB, batch=1):
    """A result whose φ_AB is the translation x ↦ x + shift ([0, 1] units), φ_BA its inverse."""
    d = len(shape)
    t = torch.tensor(shift_AB, dtype=torch.float32).view(1, d, *([1] * d))
    field = t.expand(batch, d, *shape).clone()
    return RegistrationResult([field], [-field], tuple(shape))


def test_dice_per_label():
    a = torch.tensor([[[0, 1, 1, 2], [0, 1, 2, 2]]]).unsqueeze(1)
    b = torch.tensor([[[0, 1, 2, 2], [0, 0, 2, 2]]]).unsqueeze(1)
    per = dice_per_label(a, b, labels=3)
    assert per.shape == (1, 3)
    assert per[0, 0] == pytest.approx(2 * 1 / (3 + 1))
    assert per[0, 1] == pytest.approx(2 * 3 / (3 + 4))
    assert math.isnan(per[0, 2])  # label 3 absent from both
    assert dice(a, b, labels=3)[0] == pytest.approx((0.5 + 6 / 7) / 2)
    assert dice(a, b)[0] == pytest.approx((0.5 + 6 / 7) / 2)  # default labels 1..max
    assert torch.allclose(dice(a, a), torch.ones(1, dtype=torch.float64))


def test_evaluate_labels_identity_and_shift():
    labels = torch.zeros(1, 1, 20, 16, dtype=torch.long)
    labels[:, :, 5:12, 4:10] = 1
    labels[:, :, 12:16, 4:10] = 2
    identity = constant_result((20, 16), (0.0, 0.0))
    scores = evaluate_labels(identity, labels, labels)
    assert scores["dice"][0] == 1 and scores["dice_initial"][0] == 1 and scores["fold_percentage"] == 0
    # B is A shifted by +3 voxels along axis 0: A ∘ φ_AB = B needs φ_AB(x) = x - 3 voxels
    moved = torch.roll(labels, 3, dims=2)
    result = constant_result((20, 16), (-3 / 19, 0.0))
    scores = evaluate_labels(result, labels, moved)
    assert scores["dice"][0] == pytest.approx(1.0)
    assert scores["dice_initial"][0] < 0.7


def test_voxel_unit_round_trip():
    p = torch.tensor([[0.0, 0.0, 0.0], [9.0, 4.0, 19.0], [4.5, 2.0, 1.0]])
    u = voxel_to_unit(p, (10, 5, 20))
    assert torch.allclose(u[1], torch.ones(3, dtype=torch.float64))
    assert torch.allclose(unit_to_voxel(u, (10, 5, 20)), p.double())


def test_mtre_uses_fixed_and_moving_geometry():
    # network grid 12³, fixed original 40x30x20, moving original 50x30x20 with spacing (2, 1, 3) mm
    fixed_shape, moving_shape, spacing = (40, 30, 20), (50, 30, 20), (2.0, 1.0, 3.0)
    fixed = torch.tensor([[10.0, 5.0, 3.0], [39.0, 29.0, 19.0], [0.0, 12.0, 7.0]])
    shift = (0.1, -0.05, 0.0)
    result = constant_result((12, 12, 12), shift)
    # where φ_AB sends the fixed landmarks, in moving voxels
    expected = (fixed.double() / torch.tensor([39.0, 29.0, 19.0]) + torch.tensor(shift, dtype=torch.float64)) \
        * torch.tensor([49.0, 29.0, 19.0])
    mapped = map_landmarks(result, fixed, fixed_shape=fixed_shape, moving_shape=moving_shape)
    # the second landmark is pushed past the border along axis 0; the map itself is not clamped
    assert torch.allclose(mapped, expected, atol=1e-4)
    kw = dict(fixed_shape=fixed_shape, moving_shape=moving_shape, moving_spacing=spacing)
    assert mtre(result, fixed, expected, **kw) == pytest.approx(0, abs=1e-4)
    # one moving voxel off along each axis in turn: 2 mm, 1 mm, 3 mm
    off = expected.clone()
    off[0, 0] += 1
    off[1, 1] -= 1
    off[2, 2] += 1
    errors = landmark_errors(result, fixed, off, **kw)
    assert torch.allclose(errors, torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64), atol=1e-3)
    # identity transform: fixed voxels scaled into the moving grid
    ident = constant_result((12, 12, 12), (0.0, 0.0, 0.0))
    assert initial_mtre(fixed, off, **kw) == pytest.approx(mtre(ident, fixed, off, **kw), abs=1e-4)


def test_mtre_batch_index_and_2d():
    result = constant_result((8, 8), (0.0, 0.25), batch=2)
    result.chain_AB[0][1] = 0  # second pair: identity
    fixed = torch.tensor([[2.0, 2.0]])
    kw = dict(fixed_shape=(9, 9), moving_shape=(9, 9), moving_spacing=(1.0, 0.5))
    assert mtre(result, fixed, fixed, batch_index=0, **kw) == pytest.approx(2 * 0.5, abs=1e-5)
    assert mtre(result, fixed, fixed, batch_index=1, **kw) == pytest.approx(0, abs=1e-6)


def test_fold_percentage_of_folding_map():
    shape = (16, 16)
    field = torch.zeros(1, 2, *shape)
    field[0, 0, 6:10] = torch.linspace(0.0, -0.5, 4).view(4, 1)  # axis 0 runs backwards there: folds
    result = RegistrationResult([field], [field], shape)
    assert result.fold_percentage() > 0
    assert result.fold_percentage() == gf.fold_percentage(gf.compose([field], shape) + gf.identity_map(shape))
