"""Training within a memory budget: size strings, the candidates, the measured choice (probe steps in
fresh processes), nothing fitting, resuming with the saved choice, and ``gradicon-fast train --memory-budget``.

Budgets are derived from needs measured here, never written down, so that the tests hold on any machine.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import gradicon_fast.nn as gnn
from gradicon_fast.data import SyntheticPairDataset
from gradicon_fast.train import MemoryBudgetError, TrainConfig, Trainer, choose_configuration, parse_size
from gradicon_fast.train.checkpoint import latest_checkpoint, load_checkpoint_file
import gradicon_fast.train.memory_budget as memory_budget
from gradicon_fast.train.memory_budget import (FLOAT32_SETTINGS, Candidate, KNOBS, candidates, probe, resumed_configuration,
                                               settings_for)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
# 40³ with narrow U-Nets and a batch of 8: the activations, which the candidates change, outweigh the
# weights, which they do not.
SHAPE, WIDTH, BATCH = (40, 40, 40), 0.25, 8


# ---- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("20GB", 20 * 10 ** 9), ("20G", 20 * 2 ** 30), ("20GiB", 20 * 2 ** 30), ("512MiB", 512 * 2 ** 20),
    ("1.5G", int(1.5 * 2 ** 30)), ("1.5gb", 1_500_000_000), (" 100 kB ", 100_000), ("800000B", 800_000),
    ("2T", 2 * 2 ** 40), (12345, 12345),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, phrase", [
    ("20", "needs a unit"), ("lots", "not a size"), ("-1GB", "not a size"), ("0GB", "more than 0"),
    ("1e3GB", "not a size"), ("20XB", "not a size"), ("", "not a size"), ("nanG", "not a size"),
    (1.5, "must be a size"), (True, "must be a size"), (0, "more than 0"),
])
def test_parse_size_refuses_nonsense(text, phrase):
    with pytest.raises(MemoryBudgetError, match=phrase):
        parse_size(text)


# ---- candidates -----------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["native-bfloat16", "no-native-bfloat16"])
def native(request, monkeypatch):
    """Candidates as on a device with and without native bfloat16 (the probes themselves resolve
    amp="auto" on the real hardware)."""
    monkeypatch.setattr(memory_budget, "native_bfloat16", lambda device: request.param)
    return request.param


def options(found):
    return [c.setting.options for c in found]


def test_candidates_fastest_first_then_micro_batches(native):
    found = candidates(TrainConfig(batch_size=4, device="cpu"))
    if native:  # the fast settings, full checkpointing, the float32 fallback
        table = [{"amp": "auto", "checkpoint_activations": "selective", "channels_last": True},
                 {"amp": "auto", "checkpoint_activations": True, "channels_last": True},
                 {"amp": False, "checkpoint_activations": True, "channels_last": False}]
    else:  # float32 in the usual layout: no, selective, then full recomputation
        table = [{"amp": False, "checkpoint_activations": mode, "channels_last": False}
                 for mode in (False, "selective", True)]
    assert options(found) == table * 3
    # every setting at the batch asked for before any smaller micro-batch; the effective batch kept
    assert [(c.micro_batch, c.accumulate) for c in found] == [(4, 1)] * 3 + [(2, 2)] * 3 + [(1, 4)] * 3
    assert {(c.micro_batch, c.accumulate) for c in candidates(TrainConfig(batch_size=2, accumulate=3))} \
        == {(2, 3), (1, 6)}
    assert found[0].describe(TrainConfig()) == (
        "bfloat16 autocast + selective checkpointing + channels-last, micro-batch 4 x 1 accumulated" if native
        else "float32, micro-batch 4 x 1 accumulated")


def test_first_candidate_on_native_bfloat16_is_the_fast_defaults(monkeypatch):
    """What the trainer makes of the first candidate is what gradicon_fast.nn.fast_defaults sets."""
    monkeypatch.setattr(memory_budget, "native_bfloat16", lambda device: True)
    config = TrainConfig(batch_size=2, device="cpu", tensorboard=False, progress=False)
    trainer = Trainer(gnn.standard_network((16, 16), width=0.125), None, "/nonexistent-unused",
                      candidates(config)[0].apply(config))
    expected = gnn.fast_defaults(gnn.standard_network((16, 16), width=0.125))
    settings = lambda model: [(s.amp_dtype, s.checkpoint, s.channels_last) for s in gnn.displacement_fields(model)]
    assert settings(trainer.model) == settings(expected)


def test_options_set_away_from_their_defaults_are_kept(native):
    defaults = TrainConfig()
    for knob, values in KNOBS.items():
        for value in values:
            if value == getattr(defaults, knob) or (knob == "checkpoint_activations" and value == "full"):
                continue
            found = candidates(TrainConfig(**{knob: value}, device="cpu"))
            assert found and {repr(c.setting.options[knob]) for c in found} == {repr(value)}, (knob, value)
            assert len(found) == len({repr(c.setting.options) for c in found})  # no candidate twice
    # float32 asked for: the float32 settings, fastest first, even where bfloat16 is native
    if defaults.amp is not False:
        assert options(candidates(TrainConfig(amp=False, device="cpu"))) == [s.options for s in FLOAT32_SETTINGS]
    # autocast asked for where bfloat16 is native: no float32 fallback left to try
    if native:
        found = settings_for(TrainConfig(amp=True, device="cpu"))
        assert [s.options["checkpoint_activations"] for s in found] == ["selective", True]
        assert all(s.options["channels_last"] for s in found)


# ---- resuming a saved choice -----------------------------------------------------------------


def saved_choice(**changes):
    choice = {"budget_bytes": 10 ** 12, "chosen": "float32 + activation checkpointing, micro-batch 1 x 2 accumulated",
              "batch_size": 1, "accumulate": 2, "options": {"amp": False, "checkpoint_activations": True}}
    return {**choice, **changes}


def test_resumed_choice_applies_when_budget_and_batch_match():
    config = TrainConfig(batch_size=2, memory_budget="1TB", channels_last=True, amp="auto")
    resumed = resumed_configuration(config, saved_choice())
    # saved before channels-last was a candidate: the run resumes as it ran, in the usual layout
    assert (resumed.amp, resumed.checkpoint_activations, resumed.channels_last) == (False, True, False)
    assert (resumed.batch_size, resumed.accumulate, resumed.memory_choice) == (1, 2, saved_choice())
    new = saved_choice(options={"amp": "auto", "checkpoint_activations": "selective", "channels_last": True})
    assert resumed_configuration(config, new).channels_last is True
    # another budget or another effective batch: choose anew
    assert resumed_configuration(dataclasses.replace(config, memory_budget="2TB"), saved_choice()) is None
    assert resumed_configuration(dataclasses.replace(config, batch_size=3), saved_choice()) is None


def test_a_run_saved_with_an_older_choice_resumes_as_it_ran(tmp_path, monkeypatch, capsys):
    dataset = SyntheticPairDataset(4, (24, 16), seed=1)
    base = TrainConfig(steps=1, batch_size=2, lr=1e-3, tensorboard=False, memory_budget="1TB", device="cpu")
    older = saved_choice()  # as saved before channels-last was a candidate: no channels_last option
    Trainer(gnn.standard_network((24, 16), width=0.25), dataset, tmp_path,
            resumed_configuration(base, older)).fit()

    import gradicon_fast.train.trainer as trainer

    monkeypatch.setattr(trainer, "choose_configuration", lambda *a, **k: pytest.fail("probed again"))
    resumed = Trainer(gnn.standard_network((24, 16), width=0.25), dataset, tmp_path,
                      dataclasses.replace(base, steps=2, channels_last=True, amp="auto"))
    assert resumed.step == 1 and resumed.config.memory_choice == older
    assert (resumed.config.amp, resumed.config.checkpoint_activations, resumed.config.channels_last) == \
        (False, True, False)
    assert not any(s.channels_last for s in gnn.displacement_fields(resumed.model))
    assert f"{older['chosen']} (as chosen for the run being resumed)" in capsys.readouterr().out


@pytest.mark.parametrize("saved, phrase", [
    (saved_choice(options={"amp": False, "precision": "fp8"}), r"sets precision='fp8', which this version does not"),
    (saved_choice(options={"amp": "bf16"}), r"sets amp='bf16', which this version does not know"),
    (saved_choice(options={"checkpoint_activations": 2}), r"sets checkpoint_activations=2"),
    ({"chosen": "float32"}, r"cannot be read \(KeyError\('budget_bytes'\)\)"),
])
def test_unreadable_saved_choice_fails_clearly(saved, phrase):
    with pytest.raises(MemoryBudgetError, match=phrase):
        resumed_configuration(TrainConfig(batch_size=2, memory_budget="1TB"), saved)


# ---- measured choices -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured():
    """A large candidate (float32 without recomputation, micro-batch 4) and the last (full
    checkpointing, micro-batch 1 × 4 accumulated), measured with an ample budget. (The fast settings
    are already lean at this size: they would not separate from the last.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = gnn.standard_network(SHAPE, width=WIDTH)
        config = TrainConfig(batch_size=BATCH, device="cpu")
        fast, lean = Candidate(FLOAT32_SETTINGS[0], BATCH, 1), candidates(config)[-1]
        ample = parse_size("1TB")
        first = choose_configuration(model, ample, config, candidates_to_try=[fast, lean])
        leanest = probe(model, lean, config, ample)
    finally:
        torch.set_num_threads(threads)
    return model, config, fast, lean, first, leanest


def test_ample_budget_takes_the_fastest_after_one_probe(measured):
    model, config, fast, lean, first, leanest = measured
    assert first.candidate == fast and len(first.probes) == 1
    assert first.probe.need_bytes > 0 and leanest.fits
    assert leanest.need_bytes < 0.85 * first.probe.need_bytes, "the test's sizes should separate the candidates"


def test_smaller_budget_picks_the_cheaper_configuration(measured):
    model, config, fast, lean, first, leanest = measured
    budget = (first.probe.need_bytes + leanest.need_bytes) // 2
    choice = choose_configuration(model, budget, config, candidates_to_try=[fast, lean])
    assert choice.candidate == lean
    assert [p.fits for p in choice.probes] == [False, True]
    assert choice.probes[0].need_bytes > budget >= choice.probes[1].need_bytes
    chosen = choice.apply(config)
    assert (chosen.batch_size, chosen.accumulate) == (1, BATCH)
    assert {k: getattr(chosen, k) for k in KNOBS} == lean.setting.options
    assert chosen.memory_choice["budget_bytes"] == budget
    assert chosen.memory_choice["need_bytes"] == choice.probes[1].need_bytes
    assert f"micro-batch 1 x {BATCH} accumulated" in choice.describe(config)


def test_nothing_fits_names_the_budget_and_the_smallest_need(measured):
    model, config, fast, lean, first, leanest = measured
    budget = int(leanest.need_bytes * 0.6)
    with pytest.raises(MemoryBudgetError) as error:
        choose_configuration(model, budget, config, candidates_to_try=[lean])
    message = str(error.value)
    assert f"{budget / 1e9:.2f} GB" in message or f"{budget / 1e6:.1f} MB" in message
    assert "smallest measured need is" in message and lean.describe(config) in message


def test_a_probe_past_its_limit_is_stopped(measured):
    model, config, fast, lean, first, leanest = measured
    budget = leanest.need_bytes // 3  # the probe's limit, twice the budget, lies below its need
    result = probe(model, lean, config, budget)
    assert not result.fits and result.need_bytes is None and result.error == "stopped at the limit"
    assert budget < result.more_than_bytes < leanest.need_bytes
    assert result.need().startswith("more than ")


def test_budget_below_the_weights_fails_without_probing(monkeypatch):
    import gradicon_fast.train.memory_budget as memory_budget

    monkeypatch.setattr(memory_budget, "probe", lambda *a, **k: pytest.fail("probed"))
    with pytest.raises(MemoryBudgetError, match=r"budget 1MB \(1.0 MB\) is too small: the weights"):
        choose_configuration(gnn.standard_network((24, 16), width=0.25), "1MB", TrainConfig())


def test_trainer_records_the_choice_and_a_resumed_run_keeps_it(tmp_path, monkeypatch, capsys):
    dataset = SyntheticPairDataset(4, (24, 16), seed=1)
    config = TrainConfig(steps=1, batch_size=2, lr=1e-3, tensorboard=False, memory_budget="1TB", device="cpu")
    Trainer(gnn.standard_network((24, 16), width=0.25), dataset, tmp_path, config).fit()
    first = candidates(config)[0]
    assert f"memory budget 1000.00 GB: chose {first.describe(config)}" in capsys.readouterr().out
    saved = load_checkpoint_file(latest_checkpoint(tmp_path / "checkpoints"))["train_config"]
    assert saved["memory_budget"] == "1TB" and saved["memory_choice"]["batch_size"] == 2
    assert saved["memory_choice"]["options"] == first.setting.options
    assert {k: saved[k] for k in KNOBS} == first.setting.options

    import gradicon_fast.train.trainer as trainer

    monkeypatch.setattr(trainer, "choose_configuration", lambda *a, **k: pytest.fail("probed again"))
    resumed = Trainer(gnn.standard_network((24, 16), width=0.25), dataset, tmp_path,
                      TrainConfig(steps=2, batch_size=2, lr=1e-3, tensorboard=False, memory_budget="1TB",
                                  device="cpu"))
    assert resumed.step == 1 and resumed.config.memory_choice == saved["memory_choice"]
    assert "as chosen for the run being resumed" in capsys.readouterr().out


# ---- the command line -----------------------------------------------------------------------


def run_train(*args, out):
    command = [sys.executable, "-m", "gradicon_fast", "train", "--config", "synthetic2d", "--shape", "32", "32",
               "--width", "0.125", "--pairs", "4", "--steps-stage1", "2", "--steps-stage2", "1", "--device", "cpu",
               "--out", str(out), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_cli_memory_budget_end_to_end(tmp_path):
    """Without precision options the command line gets the chooser's first candidate (the fast
    settings where bfloat16 is native)."""
    proc = run_train("--memory-budget", "20GB", "--batch-size", "2", out=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    config = TrainConfig(batch_size=2, device="cpu")
    first = candidates(config)[0].describe(config)
    assert f"stage 2 (4 steps): memory budget 20.00 GB: chose {first}" in proc.stdout
    assert "stage 1 (3 steps): the same" in proc.stdout
    for stage in ("stage1", "stage2"):
        saved = load_checkpoint_file(latest_checkpoint(tmp_path / "run" / stage / "checkpoints"))["train_config"]
        assert saved["memory_budget"] == "20GB"
        assert saved["memory_choice"]["chosen"] == first
        assert saved["memory_choice"]["need_bytes"] > 0


@pytest.mark.parametrize("budget, phrase, status", [
    ("20", "needs a unit", 2), ("lots", "is not a size", 2), ("-3GB", "is not a size", 2),
    ("1MB", "too small: the weights, their gradients and Adam's two moments alone take", 1),
])
def test_cli_bad_or_too_small_budget(tmp_path, budget, phrase, status):
    proc = run_train(f"--memory-budget={budget}", out=tmp_path / "run")
    assert proc.returncode == status
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "--memory-budget" in lines[0] and phrase in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
