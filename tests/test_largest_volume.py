"""benchmarks/largest_volume.py: the bisection that finds the largest fitting size (its measurements are
the memory probes that tests/test_memory_budget.py checks)."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.largest_volume import search  # noqa: E402


@pytest.mark.parametrize("largest_fitting", [160, 161, 175, 176, 191, 200, 239, 240, 255])
def test_search_finds_the_largest_multiple_that_fits(largest_fitting):
    measured = []

    def measure(size):
        measured.append(size)
        return {"size": size, "fits": size <= largest_fitting}

    largest, trials = search(measure, 160, 256, 16)
    assert largest == largest_fitting // 16 * 16
    assert [t["size"] for t in trials] == measured and len(measured) <= 2 + 3  # both ends, then bisection
    assert all(size % 16 == 0 for size in measured)


def test_search_reports_when_even_the_low_end_does_not_fit():
    assert search(lambda size: {"size": size, "fits": False}, 160, 256, 16) == (None, [{"size": 160, "fits": False}])


def test_search_takes_the_high_end_when_it_fits():
    largest, trials = search(lambda size: {"size": size, "fits": True}, 160, 256, 16)
    assert largest == 256 and [t["size"] for t in trials] == [160, 256]


def test_measured_settings_are_the_choosers_first_and_leanest(monkeypatch):
    """Where bfloat16 is native: fast_settings is --memory-budget's first candidate (the fast
    settings), gradicon_fast its leanest at large volumes (bfloat16 + full checkpointing)."""
    import gradicon_fast.train.memory_budget as memory_budget
    from benchmarks.largest_volume import GRADICON_FAST_SETTINGS
    from gradicon_fast.train import TrainConfig

    monkeypatch.setattr(memory_budget, "native_bfloat16", lambda device: True)
    settings = [s.options for s in memory_budget.settings_for(TrainConfig(device="cpu"))]
    assert GRADICON_FAST_SETTINGS["fast_settings"] == settings[0]
    leanest = GRADICON_FAST_SETTINGS["gradicon_fast"]
    assert leanest in settings and leanest["amp"] == "auto" and leanest["checkpoint_activations"] is True
