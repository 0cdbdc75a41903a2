"""Training within a memory budget: size strings, the candidates, the measured choice (probe steps in
fresh processes), nothing fitting, resuming with the saved choice, and ``gradicon-fast train --memory-budget``.

Budgets are derived from needs measured here, never written down, so that the tests hold on any machine.
"""

import subprocess
import sys
from pathlib import Path

import pytest

import gradicon_fast.nn as gnn
from gradicon_fast.data import SyntheticPairDataset
from gradicon_fast.train import MemoryBudgetError, TrainConfig, Trainer, choose_configuration, parse_size
from gradicon_fast.train.checkpoint import latest_checkpoint, load_checkpoint_file
from gradicon_fast.train.memory_budget import candidates, probe

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
# 40³ with narrow U-Nets and a batch of 4: the activations, which the candidates change, outweigh the
# weights, which they do not.
SHAPE, WIDTH, BATCH = (40, 40, 40), 0.25, 4


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


def test_candidates_keep_the_effective_batch_and_the_options_set():
    found = candidates(TrainConfig(batch_size=4))
    assert [(c.micro_batch, c.accumulate) for c in found[:3]] == [(4, 1), (2, 2), (1, 4)]
    assert found[0].setting.options == {"amp": False, "checkpoint_activations": False}  # fastest first
    assert found[-1].setting.options == {"amp": True, "checkpoint_activations": True}   # leanest last
    assert [c.setting.options["checkpoint_activations"] for c in found[::3]] == [False, "selective", True] * 2
    assert len(found) == 18
    assert {(c.micro_batch, c.accumulate) for c in candidates(TrainConfig(batch_size=2, accumulate=3))} \
        == {(2, 3), (1, 6)}
    # an option set away from its default stays as set
    defaults = TrainConfig()
    for amp in (False, True):
        if amp != defaults.amp:
            assert {c.setting.options["amp"] for c in candidates(TrainConfig(amp=amp))} == {amp}
    for mode in (False, "selective", True):
        if mode != defaults.checkpoint_activations:
            assert {c.setting.options["checkpoint_activations"] for c in
                    candidates(TrainConfig(checkpoint_activations=mode))} == {mode}


# ---- measured choices -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured():
    """The fastest candidate (float32, micro-batch 4) and the leanest (autocast + checkpointing,
    micro-batch 1 × 4 accumulated), measured with an ample budget."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = gnn.standard_network(SHAPE, width=WIDTH)
        config = TrainConfig(batch_size=BATCH, device="cpu")
        fast, lean = candidates(config)[0], candidates(config)[-1]
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
    assert (chosen.batch_size, chosen.accumulate, chosen.amp, chosen.checkpoint_activations) == (1, BATCH, True, True)
    assert chosen.memory_choice["budget_bytes"] == budget
    assert chosen.memory_choice["need_bytes"] == choice.probes[1].need_bytes
    assert "micro-batch 1 x 4 accumulated" in choice.describe(config)


def test_nothing_fits_names_the_budget_and_the_smallest_need(measured):
    model, config, fast, lean, first, leanest = measured
    budget = int(leanest.need_bytes * 0.6)
    with pytest.raises(MemoryBudgetError) as error:
        choose_configuration(model, budget, config, candidates_to_try=[lean])
    message = str(error.value)
    assert f"{budget / 1e9:.2f} GB" in message or f"{budget / 1e6:.1f} MB" in message
    assert "smallest measured need is" in message and "autocast + activation checkpointing" in message


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
    assert "memory budget 1000.00 GB: chose float32, micro-batch 2 x 1 accumulated" in capsys.readouterr().out
    saved = load_checkpoint_file(latest_checkpoint(tmp_path / "checkpoints"))["train_config"]
    assert saved["memory_budget"] == "1TB" and saved["memory_choice"]["batch_size"] == 2

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
    proc = run_train("--memory-budget", "20GB", "--batch-size", "2", out=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "stage 2 (4 steps): memory budget 20.00 GB: chose float32, micro-batch 2 x 1 accumulated" in proc.stdout
    assert "stage 1 (3 steps): the same" in proc.stdout
    for stage in ("stage1", "stage2"):
        saved = load_checkpoint_file(latest_checkpoint(tmp_path / "run" / stage / "checkpoints"))["train_config"]
        assert saved["memory_budget"] == "20GB"
        assert saved["memory_choice"]["chosen"] == "float32, micro-batch 2 x 1 accumulated"
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
