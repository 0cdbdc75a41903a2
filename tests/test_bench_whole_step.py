"""benchmarks/whole_step.py: the schedule alternates the sides, the summary's ratios, argument errors (no timings)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import whole_step  # noqa: E402


def test_schedule_alternates_official_and_settings_reversing_each_round():
    runs = whole_step.schedule(["io", "train"], ["float32", "default"], rounds=2)
    assert runs[:3] == [("io", "official"), ("io", "float32"), ("io", "default")]
    assert runs[3:6] == [("train", "official"), ("train", "float32"), ("train", "default")]
    assert runs[6:9] == [("io", "default"), ("io", "float32"), ("io", "official")]
    assert len(runs) == 12


def test_summary_takes_medians_and_ratios_to_the_official():
    def run(setting, seconds, mb):
        return {"phase": "io", "setting": setting, "ok": True, "seconds": seconds, "cpu_seconds": seconds,
                "step_mb": mb, "peak_mb": mb + 100}

    runs = [run("official", 100, 8000), run("official", 120, 8000), run("default", 40, 2000),
            run("default", 60, 3000), {"phase": "io", "setting": "float32", "ok": False}]
    summary = whole_step.summarise(runs)["io"]
    assert summary["official"]["seconds"] == 110 and summary["official"]["speedup"] == 1
    assert summary["default"]["seconds"] == 50 and summary["default"]["speedup"] == pytest.approx(2.2)
    assert summary["default"]["memory_ratio"] == pytest.approx(2500 / 8000)
    assert summary["float32"]["runs"] == 0 and summary["float32"]["seconds"] is None
    assert "failed" in whole_step.table({"io": summary})


@pytest.mark.parametrize("argv, message", [(["--size", "32"], "--size must be >= 65"),
                                           (["--settings", "fast"], "unknown 'fast'"),
                                           (["--phases", "io,test"], "unknown 'test'"),
                                           (["--rounds", "0"], "must be >= 1")])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        whole_step.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_every_setting_is_a_configure_call():
    import gradicon_fast.nn as gnn

    model = gnn.standard_network((16, 16, 16), width=0.25)
    for settings in whole_step.SETTINGS.values():
        model.configure(**settings)
    fast = gnn.fast_defaults(gnn.standard_network((16, 16, 16), width=0.25))
    step = gnn.displacement_fields(fast)[0]
    assert whole_step.SETTINGS["default"] == dict(amp_dtype=step.amp_dtype, checkpoint=step.checkpoint,
                                                  channels_last=step.channels_last)
