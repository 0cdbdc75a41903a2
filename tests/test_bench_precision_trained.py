"""benchmarks/precision_accuracy.py and benchmarks/trained_weights.py: the transform difference in mm,
the summary over pairs, and the separation of training and held-out pairs (no training, no timings)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import precision_accuracy, trained_weights  # noqa: E402
from gradicon_fast.data.blob_pair import make_synthetic_pair  # noqa: E402
from gradicon_fast.nn import RegistrationResult  # noqa: E402

SHAPE = (12, 14, 16)
SPACING = 2.5


def _result(displacement):
    return RegistrationResult([displacement], [-displacement], SHAPE)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [0.01, -0.03])
def test_a_constant_shift_differs_from_the_reference_by_its_length_in_mm(axis, shift):
    pair = make_synthetic_pair(SHAPE, spacing=SPACING, max_displacement_mm=3.0, num_landmarks=20, seed=1)
    _, reference = precision_accuracy.compare(_result(pair.displacement.clone()), None, pair)
    moved = pair.displacement.clone()
    moved[:, axis] += shift
    row, _ = precision_accuracy.compare(_result(moved), reference, pair)
    expected_mm = abs(shift) * (SHAPE[axis] - 1) * SPACING
    for key in ("difference_mm_max", "difference_mm_mean", "landmark_difference_mm_max",
                "landmark_difference_mm_mean"):
        assert row[key] == pytest.approx(expected_mm, rel=1e-4), key


def test_the_true_transform_has_no_landmark_or_dense_error():
    pair = make_synthetic_pair(SHAPE, spacing=SPACING, max_displacement_mm=3.0, num_landmarks=20, seed=2)
    row, _ = precision_accuracy.compare(_result(pair.displacement.clone()), None, pair)
    assert row["landmark_error_mm_max"] < 1e-4 and row["dense_error_mm_mean"] < 1e-6
    assert "difference_mm_max" not in row


def test_summary_takes_maxima_of_maxima_means_of_means_and_sums_seconds():
    rng = np.random.default_rng(0)
    keys = ("landmark_error_mm_mean", "landmark_error_mm_max", "difference_mm_max", "seconds")
    per_pair = [{"0 steps": {s: {k: float(rng.random()) for k in keys} for s in ("float32", "default")}}
                for _ in range(3)]
    summary = precision_accuracy.summarize(per_pair)
    for setting in ("float32", "default"):
        values = {k: [p["0 steps"][setting][k] for p in per_pair] for k in keys}
        got = summary["0 steps"][setting]
        assert got["landmark_error_mm_mean"] == pytest.approx(np.mean(values["landmark_error_mm_mean"]))
        assert got["landmark_error_mm_max"] == max(values["landmark_error_mm_max"])
        assert got["difference_mm_max"] == max(values["difference_mm_max"])
        assert got["seconds"] == pytest.approx(sum(values["seconds"]))


def test_held_out_pairs_are_never_training_pairs():
    with pytest.raises(ValueError, match="held-out"):
        trained_weights.held_out_pair(16, 4.0, trained_weights.TRAINING_SEEDS)
    held_out = trained_weights.held_out_pair(16, 4.0, 0)
    trained, displacement = trained_weights.training_pair(16, 4.0, 0, seed=0)
    low, high = trained_weights.DISPLACEMENT_RANGE_MM
    assert low <= displacement <= high
    assert not torch.equal(held_out.fixed, trained.fixed)


def test_parser_rejects_bad_counts():
    with pytest.raises(SystemExit):
        precision_accuracy.main(["--trained", "--pairs", "0"])
    with pytest.raises(SystemExit):
        precision_accuracy.main(["--settings", "nonsense"])


def test_warmup_rises_linearly_to_one_and_stays():
    factors = [trained_weights.warmup_factor(step, 4) for step in range(8)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4:] == [1.0] * 4
    assert trained_weights.warmup_factor(0, 0) == 1.0


def test_continuing_training_needs_an_output_file():
    with pytest.raises(SystemExit):
        trained_weights.main(["--init", "weights.pt", "--minutes", "1"])
