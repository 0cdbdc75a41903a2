"""torchrun data parallelism (gloo on CPUs): ranks stay identical and match one process.

BatchNorm: the U-Nets normalise with the statistics of each forward's micro-batch. PyTorch's
SyncBatchNorm runs on GPUs only, so on CPUs every rank normalises its own micro-batch; a single
process on the same global batch reproduces this when it processes the same micro-batches
separately, i.e. with gradient accumulation: 2 ranks × (batch 2, accumulate 1) ≡ 1 process ×
(batch 2, accumulate 2). The trainer's sampler and per-micro-batch seeds (augmentation, penalty
noise) make the micro-batches identical, so parameters agree up to float rounding (DDP averages
gradients by all-reduce, accumulation sums them in another order).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gradicon_fast.nn as gnn
from gradicon_fast.data import SyntheticPairDataset
from gradicon_fast.train import TrainConfig, Trainer
from gradicon_fast.train.trainer import PLAIN_EXECUTION

REPO = Path(__file__).resolve().parents[1]
SHAPE = (24, 16)


def make_model():
    torch.manual_seed(0)
    return gnn.standard_network(SHAPE, width=0.25)


def make_config(**kw):
    # On the CPU (gloo) whatever the machine has: two ranks would need two GPUs.
    base = dict(steps=4, batch_size=2, lr=1e-3, seed=7, progress=False, tensorboard=False, checkpoint_every=2,
                device="cpu", **PLAIN_EXECUTION)  # float32: compared bit for bit
    base.update(kw)
    return TrainConfig(**base)


def make_dataset():
    return SyntheticPairDataset(12, SHAPE, seed=3)


SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_train_distributed import make_model, make_config, make_dataset
    from gradicon_fast.train import Trainer, cleanup
    out = sys.argv[1]
    trainer = Trainer(make_model(), make_dataset(), out + "/ddp", make_config())
    assert trainer.dist.world_size == 2 and trainer.ddp is not None
    assert torch.distributed.get_backend() == "gloo"
    rows = trainer.fit()
    params = {{n: p.detach().clone() for n, p in trainer.model.named_parameters()}}
    torch.save({{"params": params, "rows": rows}}, f"{{out}}/rank{{trainer.dist.rank}}.pt")
    cleanup(trainer.dist)
""")


def test_torchrun_two_ranks_match_single_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), f"{name} differs between ranks"
    assert ranks[0]["rows"] == ranks[1]["rows"] or all(
        a["total"] == b["total"] for a, b in zip(ranks[0]["rows"], ranks[1]["rows"]))
    assert (tmp_path / "ddp" / "checkpoints" / "checkpoint_00000004.pt").exists()  # written by rank 0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Trainer(make_model(), make_dataset(), tmp_path / "single", make_config(accumulate=2))
        rows = single.fit()
    finally:
        torch.set_num_threads(threads)
    initial = dict(make_model().named_parameters())
    moved = worst = 0.0
    for name, p in single.model.named_parameters():
        q = ranks[0]["params"][name]
        worst = max(worst, (p.detach() - q).abs().max().item())
        assert torch.allclose(p.detach(), q, rtol=1e-4, atol=1e-6), \
            f"{name}: max difference {(p.detach() - q).abs().max().item():.3g}"
        moved = max(moved, (p.detach() - initial[name]).abs().max().item())
    assert moved > 1e-3  # training did change the parameters
    print(f"DDP vs single process: max parameter difference {worst:.3g} (parameters moved up to {moved:.3g})")
    for a, b in zip(rows, ranks[0]["rows"]):
        assert a["total"] == pytest.approx(b["total"], rel=1e-5)


def test_more_local_ranks_than_gpus_is_a_clear_error(monkeypatch):
    from gradicon_fast.train.distributed import init_distributed

    monkeypatch.setenv("LOCAL_RANK", "100")  # device indices are 8-bit in torch
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match=r"cuda:100 does not exist.*LOCAL_RANK=100.*CUDA device"):
        init_distributed("cuda")
