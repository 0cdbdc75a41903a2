"""Training loop: exact resume (in-process and after SIGKILL; bit for bit on the CPU), non-finite stop,
logs, sampler, augmentation, two-stage protocol, instance optimisation."""

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gradicon_fast as gf
import gradicon_fast.nn as gnn
from gradicon_fast.data import SyntheticPairDataset
from gradicon_fast.train import (NonFiniteGradientError, NonFiniteLossError, PairStreamSampler, TrainConfig, Trainer,
                                 augment_pair, instance_optimize, latest_checkpoint, list_checkpoints,
                                 random_signed_permutation, train_two_stage)
from gradicon_fast.train.trainer import PLAIN_EXECUTION

SHAPE = (24, 16)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, steps=4):
    torch.manual_seed(seed)
    return gnn.standard_network(SHAPE, steps=steps, width=0.25)


def tiny_config(**kw):
    """Plain float32 U-Nets (bit-exact float32 behaviour; the fast defaults: test_train_fast_defaults.py)."""
    base = dict(steps=6, batch_size=2, lr=1e-3, checkpoint_every=3, progress=False, tensorboard=False, seed=3,
                **PLAIN_EXECUTION)
    base.update(kw)
    return TrainConfig(**base)


def dataset():
    return SyntheticPairDataset(10, SHAPE, seed=4)


def losses(rows):
    return [(r["step"], r["total"], r["similarity"], r["regularization"]) for r in rows]


def assert_repeats(rows, reference, device):
    """The same losses as ``reference``: bit for bit on the CPU; on a GPU, where the kernels' atomic
    adds (and cuDNN) sum in a varying order so that even two uninterrupted runs differ in the last
    bits, to 1e-3 relative (or 5e-5 absolute: the small regularisation term differed by 2.7e-6, 0.23 %,
    after one resumed step on an H200)."""
    if device.type == "cpu":
        assert losses(rows) == losses(reference)
    else:
        assert [r[0] for r in losses(rows)] == [r[0] for r in losses(reference)]
        for got, want in zip(losses(rows), losses(reference)):
            assert got[1:] == pytest.approx(want[1:], rel=1e-3, abs=5e-5)


def read_csv(path):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    full = Trainer(tiny_model(), dataset(), tmp_path / "full", tiny_config())
    reference = full.fit()
    assert [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]

    first = Trainer(tiny_model(), dataset(), tmp_path / "cut", tiny_config(steps=3))
    first.fit()
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "checkpoint_00000003.pt"
    # A new process would build a fresh model: the checkpoint restores everything.
    resumed = Trainer(tiny_model(seed=99), dataset(), tmp_path / "cut", tiny_config())
    assert resumed.step == 3
    rows = resumed.fit()
    assert_repeats(rows, reference[3:], resumed.device)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b) if resumed.device.type == "cpu" else torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    logged = read_csv(tmp_path / "cut" / "log.csv")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "cut" / "model.pt").exists()


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_train_loop import tiny_model, tiny_config, dataset
    from gradicon_fast.train import Trainer
    Trainer(tiny_model(), dataset(), sys.argv[1], tiny_config(steps=int(sys.argv[2]), checkpoint_every=2)).fit()
""")


def test_resume_after_sigkill(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(REPO / "tests")))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(out), "1000"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(out / "checkpoints"):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    resumed_from = list_checkpoints(out / "checkpoints")[-1][0]
    assert resumed_from >= 2 and resumed_from % 2 == 0

    target = resumed_from + 3
    trainer = Trainer(tiny_model(seed=1), dataset(), out, tiny_config(steps=target, checkpoint_every=2))
    assert trainer.step == resumed_from
    rows = trainer.fit()
    reference = Trainer(tiny_model(), dataset(), tmp_path / "ref", tiny_config(steps=target)).fit()
    assert_repeats(rows, reference[resumed_from:], trainer.device)
    # rows a killed run logged past its checkpoint were dropped on resume
    assert [int(r["step"]) for r in read_csv(out / "log.csv")] == list(range(1, target + 1))


class NaNDataset(SyntheticPairDataset):
    def __getitem__(self, i):
        item = dict(super().__getitem__(i))
        item["image_A"] = item["image_A"] * float("nan")
        return item


def test_non_finite_similarity_stops_without_saving(tmp_path):
    trainer = Trainer(tiny_model(), NaNDataset(4, SHAPE), tmp_path, tiny_config(augment=False))
    with pytest.raises(NonFiniteLossError, match=r"step 1: similarity"):
        trainer.fit()
    assert list_checkpoints(tmp_path / "checkpoints") == []
    assert not (tmp_path / "model.pt").exists()


def test_non_finite_regularization_is_named(tmp_path, monkeypatch):
    trainer = Trainer(tiny_model(), dataset(), tmp_path, tiny_config(steps=4, checkpoint_every=2))
    original = gnn.GradICON.regularization
    calls = {"n": 0}

    def flaky(self, result, **kw):
        calls["n"] += 1
        value = original(self, result, **kw)
        return value * float("inf") if calls["n"] == 3 else value

    monkeypatch.setattr(gnn.GradICON, "regularization", flaky)
    with pytest.raises(NonFiniteLossError, match=r"step 3: regularization") as info:
        trainer.fit()
    assert info.value.step == 3
    # the step-2 checkpoint is intact and loads
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert path.name == "checkpoint_00000002.pt"
    blob = torch.load(path, weights_only=False)
    assert blob["step"] == 2 and all(torch.isfinite(v).all() for v in blob["model"].values() if v.is_floating_point())


def test_logs_and_checkpoint_contents(tmp_path):
    trainer = Trainer(tiny_model(), dataset(), tmp_path, tiny_config(steps=4, checkpoint_every=1,
                                                                     keep_checkpoints=2, tensorboard=True,
                                                                     accumulate=2))
    rows = trainer.fit()
    assert len(rows) == 4 and all(set(r) >= {"total", "similarity", "regularization", "fold_percentage"}
                                  for r in rows)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 4]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    blob = torch.load(latest_checkpoint(tmp_path / "checkpoints"), weights_only=False)
    assert blob["step"] == 4 and blob["samples"] == 4 * 2 * 2
    assert set(blob["rng"]) >= {"python", "numpy", "torch"}
    assert blob["config"]["steps"] == 4 and "optimizer" in blob
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    loaded = gnn.load_model(latest_checkpoint(tmp_path / "checkpoints"))
    assert torch.equal(next(iter(loaded.state_dict().values())),  # load_model maps to the CPU
                       next(iter(trainer.model.state_dict().values())).cpu())


def test_sampler_shards_like_one_process_and_resumes():
    single = PairStreamSampler(7, 2, seed=1)
    it = iter(single)
    stream = [next(it) for _ in range(12)]
    ranks = [iter(PairStreamSampler(7, 2, rank=r, world_size=2, seed=1)) for r in range(2)]
    for j in range(6):
        assert next(ranks[0]) == stream[2 * j] and next(ranks[1]) == stream[2 * j + 1]
    resumed = iter(PairStreamSampler(7, 2, seed=1, start_sample=10))
    assert next(resumed) == stream[5]
    flat = [i for batch in stream for i in batch]
    assert sorted(flat[:7]) == list(range(7))  # one epoch is a permutation


def test_augmentation():
    g = torch.Generator().manual_seed(0)
    for d in (2, 3):
        m = random_signed_permutation(d, g)
        assert torch.equal(m.abs().sum(0), torch.ones(d)) and torch.equal(m.abs().sum(1), torch.ones(d))
    image = torch.rand(3, 1, 12, 10, 8)
    # without the affine part, A and B get the same signed permutation: equal inputs stay equal
    a, b = augment_pair(image, image.clone(), generator=g, affine_scale=0.0)
    assert torch.allclose(a, b)
    assert not torch.allclose(a, image)
    # a 2D flip of the first axis is exactly the flipped image
    flip = torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    from gradicon_fast.train import affine_displacement
    img2 = torch.rand(1, 1, 9, 7)
    field = affine_displacement(flip[None], torch.zeros(1, 2, dtype=torch.float64), (9, 7))
    assert torch.allclose(gf.warp(img2, [field]), img2.flip(2), atol=1e-5)
    # the small affine differs between A and B
    a, b = augment_pair(image, image.clone(), generator=g)
    assert not torch.allclose(a, b)


def test_two_stage_protocol_grows_the_trained_network(tmp_path):
    ds = dataset()
    model = train_two_stage(ds, tmp_path, SHAPE, stage1_steps=2, stage2_steps=0, config=tiny_config(), width=0.25)
    assert model.config["steps"] == 4
    stage1 = gnn.load_model(tmp_path / "stage1" / "model.pt")
    stage2 = gnn.load_model(tmp_path / "stage2" / "model.pt")
    assert stage1.config["steps"] == 3 and stage2.config["steps"] == 4
    s1 = stage1.regis_net.state_dict()
    s2 = stage2.regis_net.netPhi.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    fresh = tiny_model(steps=3).regis_net.state_dict()
    assert not all(torch.equal(fresh[k], s1[k]) for k in s1)  # stage 1 did train
    # resuming the two-stage run is a no-op once both stages are done
    again = train_two_stage(ds, tmp_path, SHAPE, stage1_steps=2, stage2_steps=0, config=tiny_config(), width=0.25)
    assert again.config["steps"] == 4


def test_instance_optimization_restores_weights():
    model = tiny_model()
    model.train()
    ds = dataset()
    pair = ds.batch([0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, history = instance_optimize(model, pair["image_A"], pair["image_B"], steps=5, lr=1e-3,
                                        generator=torch.Generator().manual_seed(0), return_losses=True)
    assert history[-1] < history[0]
    assert any(f.abs().max() > 0 for f in result.chain_AB)
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    def boom(*a, **kw):
        raise KeyboardInterrupt

    calls = {"n": 0}
    original = model.forward

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            boom()
        return original(*a, **kw)

    model.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        instance_optimize(model, pair["image_A"], pair["image_B"], steps=5, lr=1e-3)
    del model.forward
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def poison_gradients_under_autocast(model, always=False):
    """NaN gradients of one convolution weight whenever the U-Nets run under autocast (or always), with a
    finite loss: what bfloat16 convolutions on the CPU now and then give."""
    steps = gnn.displacement_fields(model)
    weight = next(p for p in model.parameters() if p.ndim == 4)
    weight.register_hook(lambda g: g * float("nan") if always or steps[0].amp_dtype is not None else g)


def test_a_step_with_nan_gradients_is_redone_in_float32(tmp_path):
    # every step's gradients are poisoned under autocast: each is redone in float32 with the same
    # micro-batches and seeds, so the run ends with the float32 run's weights and statistics, bit for bit
    poisoned = tiny_model()
    poison_gradients_under_autocast(poisoned)
    Trainer(poisoned, dataset(), tmp_path / "poisoned", tiny_config(steps=3, accumulate=2, amp=True)).fit()
    assert gnn.displacement_fields(poisoned)[0].amp_dtype is not None  # the run's bfloat16 setting restored
    plain = tiny_model()
    Trainer(plain, dataset(), tmp_path / "plain", tiny_config(steps=3, accumulate=2)).fit()
    want = plain.state_dict()
    for k, v in poisoned.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_gradients_that_stay_non_finite_stop_before_the_step(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, dataset(), tmp_path, tiny_config(steps=4, checkpoint_every=2))
    weight = next(p for p in model.parameters() if p.ndim == 4)
    calls = {"n": 0}

    def poison_from_third_step(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] > 2 * trainer.config.accumulate else grad

    weight.register_hook(poison_from_third_step)
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradients at step 3 .*weight") as info:
        trainer.fit()
    assert info.value.step == 3 and trainer.step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert path.name == "checkpoint_00000002.pt"
