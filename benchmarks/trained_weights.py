"""Trained weights of the standard 4-step network for the benchmarks that need a network that registers.

    python -m benchmarks.trained_weights                  # 48³, 22 minutes on one thread (GradICON only)
    python -m benchmarks.trained_weights --minutes 15 --lr 2e-5 --warmup 10 --supervised 1 \\
        --first-step 259 --init benchmarks/.cache/standard-48-4mm-22min-lr0.0002-seed0.pt \\
        --output benchmarks/.cache/standard-48-4mm-stage2-supervised-lr2e-05.pt   # continued

No published weights are downloaded: the standard network (:func:`gradicon_fast.nn.standard_network`,
float32) is trained here, briefly, with the GradICON objective and Adam on a stream of synthetic pairs
with known smooth deformations (:func:`gradicon_fast.data.blob_pair.make_synthetic_pair`, one new pair
per step, seeds from :data:`TRAINING_SEEDS` up, maximal displacement drawn between 4 and 20 mm). The
pairs of seeds below :data:`TRAINING_SEEDS` are never trained on: the benchmarks measure on them.
Every :data:`VALIDATION_EVERY` steps the landmark error of the network's registration (eval mode,
no instance optimisation) of one held-out pair is logged.

``--supervised W`` adds W times the squared error of φ_AB against the pair's known deformation;
``--init`` continues from earlier weights (a fresh Adam: give it a ``--warmup``). On a shared 2-core
machine, 259 steps of the similarity alone (22 minutes, lr 2e-4) and 365 more with the known
deformation (15 minutes, lr 2e-5; the two commands above) gave a lightly trained network: its
forward registration takes the three held-out pairs of ``benchmarks.precision_accuracy`` from
5.68 to 4.12 mm mean landmark error, while the logged validation pair stayed near its identity
error (4.72 mm; 4.45-4.99 mm during the second stage).

The weights (:func:`gradicon_fast.nn.save_model`) go to ``benchmarks/.cache/`` (not in git), next to a
``.json`` with the settings, the loss curve and the validation errors; :func:`cached_weights` finds
them again for the plain recipe's settings.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .environment import REPO_ROOT

CACHE_DIR = REPO_ROOT / "benchmarks" / ".cache"
TRAINING_SEEDS = 100_000      # training pairs use seeds from here up; held-out pairs use seeds below
VALIDATION_SEED = 99_999      # the pair whose landmark error is logged during training
VALIDATION_EVERY = 25
DISPLACEMENT_RANGE_MM = (4.0, 20.0)


def weights_path(size: int, spacing: float, minutes: float, lr: float, seed: int) -> Path:
    """Where the weights of these training settings are cached."""
    return CACHE_DIR / f"standard-{size}-{spacing:g}mm-{minutes:g}min-lr{lr:g}-seed{seed}.pt"


def held_out_pair(size: int, spacing: float, seed: int, max_displacement_mm: float = 15.0):
    """A known-deformation pair the training never sees (``seed`` < :data:`TRAINING_SEEDS`)."""
    from gradicon_fast.data.blob_pair import make_synthetic_pair

    if not 0 <= seed < TRAINING_SEEDS:
        raise ValueError(f"held-out pairs have seeds in [0, {TRAINING_SEEDS}), got {seed}")
    return make_synthetic_pair((size,) * 3, spacing=spacing, max_displacement_mm=max_displacement_mm, seed=seed)


def training_pair(size: int, spacing: float, step: int, seed: int):
    """The pair of training step ``step`` (0-based), its maximal displacement drawn from the step's seed."""
    from gradicon_fast.data.blob_pair import make_synthetic_pair

    pair_seed = TRAINING_SEEDS + seed * 1_000_003 + step
    low, high = DISPLACEMENT_RANGE_MM
    displacement = low + (high - low) * random.Random(pair_seed).random()
    pair = make_synthetic_pair((size,) * 3, spacing=spacing, max_displacement_mm=displacement, seed=pair_seed)
    return pair, displacement


def registration_error_mm(model, pair) -> float:
    """Mean landmark error (mm) of the network's registration of ``pair`` (eval mode, no tuning)."""
    from gradicon_fast.data.known_pair import landmark_error_mm

    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = model.register(pair.moving, pair.fixed)
    model.train(was_training)
    return float(np.mean(landmark_error_mm(result.chain_AB, pair)))


def warmup_factor(step: int, warmup: int) -> float:
    """The learning rate's factor at (0-based) ``step``: linear from 1/warmup to 1 over ``warmup`` steps.
    Adam's first steps move every weight by about the learning rate, whatever its gradient; a warmup
    keeps them from throwing a network that already registers far off."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


def supervised_objective(model, pair, noise: torch.Generator, weight: float):
    """GradICON's objective on (moving, fixed) plus ``weight`` times the mean squared distance (in voxels²)
    between the network's φ_AB and the pair's true one: a direct signal, meant to teach a network in
    fewer steps than the similarity alone. Returns (total, similarity)."""
    import gradicon_fast as gf
    from gradicon_fast.nn import RegistrationResult

    moving, fixed = pair.moving, pair.fixed
    result = model.register(moving, fixed)
    chain_AB = [f.float() for f in result.chain_AB]
    chain_BA = [f.float() for f in result.chain_BA]
    similarity = (model.similarity(gf.warp(moving, chain_AB), fixed, None)
                  + model.similarity(gf.warp(fixed, chain_BA), moving, None))
    regularization = model.regularization(RegistrationResult(chain_AB, chain_BA, model.input_shape),
                                          generator=noise)
    voxels = torch.tensor([s - 1 for s in model.input_shape], dtype=torch.float32).view(1, -1, 1, 1, 1)
    error = ((gf.compose(chain_AB, model.input_shape) - pair.displacement) * voxels).square().sum(1).mean()
    return model.lmbda * regularization + similarity + weight * error, similarity


def train(size: int, spacing: float, minutes: float, lr: float, seed: int, *, max_steps: int | None = None,
          init=None, warmup: int = 0, first_step: int = 0, supervised: float = 0.0,
          log=lambda line: print(line, flush=True)) -> tuple[torch.nn.Module, dict]:
    """The standard network trained for ``minutes`` (or ``max_steps``) on one thread; (model, record).

    ``init``: a weight file to continue from (a fresh Adam, so give it a ``warmup``); its training
    pairs continue at ``first_step``, so that no pair is seen twice. ``supervised`` > 0 adds the
    known deformation to the objective (:func:`supervised_objective`)."""
    import gradicon_fast.nn as gnn
    from gradicon_fast.data.known_pair import landmark_error_mm

    torch.manual_seed(seed)
    model = gnn.standard_network((size,) * 3) if init is None else gnn.load_model(init)
    if tuple(model.config["input_shape"]) != (size,) * 3:
        raise ValueError(f"{init} is a network for {model.config['input_shape']}, not {size}³")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup))
    noise = torch.Generator().manual_seed(seed)
    validation = held_out_pair(size, spacing, VALIDATION_SEED)
    identity_error = float(np.mean(landmark_error_mm(None, validation)))
    record = {"size": size, "spacing_mm": spacing, "minutes": minutes, "lr": lr, "seed": seed, "warmup": warmup,
              "supervised": supervised,
              "init": None if init is None else str(init), "first_step": first_step,
              "displacement_range_mm": list(DISPLACEMENT_RANGE_MM), "losses": [],
              "validation": {"seed": VALIDATION_SEED, "identity_error_mm": identity_error, "steps": [],
                             "error_mm": []}}
    log(f"validation pair: landmark error {identity_error:.3f} mm before registration")
    start = time.perf_counter()
    step = 0
    while time.perf_counter() - start < minutes * 60 and (max_steps is None or step < max_steps):
        pair, _ = training_pair(size, spacing, first_step + step, seed)
        optimizer.zero_grad(set_to_none=True)
        if supervised > 0:
            total, similarity = supervised_objective(model, pair, noise, supervised)
        else:  # both orders: the objective is symmetric, the pairs' deformations are not
            moving, fixed = (pair.moving, pair.fixed) if step % 2 == 0 else (pair.fixed, pair.moving)
            total, similarity = model(moving, fixed, generator=noise)[:2]
        if not torch.isfinite(total):
            raise FloatingPointError(f"training: non-finite loss at step {step}")
        total.backward()
        optimizer.step()
        schedule.step()
        step += 1
        record["losses"].append([float(total.detach()), float(similarity.detach())])
        if step % VALIDATION_EVERY == 0:
            error = registration_error_mm(model, validation)
            record["validation"]["steps"].append(step)
            record["validation"]["error_mm"].append(error)
            recent = np.mean([total for total, _ in record["losses"][-VALIDATION_EVERY:]])
            log(f"step {step:5d}  {time.perf_counter() - start:7.0f} s  loss {recent:.4f}  "
                f"validation landmark error {error:.3f} mm")
    record["steps"] = step
    record["seconds"] = time.perf_counter() - start
    return model, record


def cached_weights(size: int, spacing: float, minutes: float, lr: float, seed: int, *,
                   log=lambda line: print(line, flush=True)) -> Path:
    """The weights of these settings, trained (and cached) on the first call."""
    from gradicon_fast.nn import save_model

    path = weights_path(size, spacing, minutes, lr, seed)
    if path.exists() and path.with_suffix(".json").exists():
        return path
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one thread, as the recorded minutes assume
    try:
        model, record = train(size, spacing, minutes, lr, seed, log=log)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return path


def training_record(path: Path) -> dict:
    """The ``.json`` written next to cached weights."""
    return json.loads(Path(path).with_suffix(".json").read_text())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trained_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=48, help="cubic side (default 48)")
    p.add_argument("--spacing", type=float, default=4.0, help="voxel spacing in mm (default 4)")
    p.add_argument("--minutes", type=float, default=22.0, help="training time on one thread (default 22)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="weight file (default: the cache path of these settings)")
    p.add_argument("--init", default=None, help="continue from this weight file (a fresh Adam; needs --output)")
    p.add_argument("--warmup", type=int, default=0, help="linear learning-rate warmup, in steps (default 0)")
    p.add_argument("--supervised", type=float, default=0.0,
                   help="weight of the known deformation's squared error (voxels²) in the objective (default 0)")
    p.add_argument("--first-step", type=int, default=0,
                   help="index of the first training pair (continuing: the steps already trained)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.size < 16 or args.minutes <= 0 or args.lr <= 0 or args.warmup < 0 or args.first_step < 0:
        p.error("--size must be >= 16, --minutes and --lr > 0, --warmup and --first-step >= 0")
    if (args.init or args.warmup or args.first_step or args.supervised) and args.output is None:
        p.error("--init, --warmup, --first-step and --supervised need --output (the cache holds the plain "
                "recipe only)")
    if args.supervised < 0:
        p.error("--supervised must be >= 0")
    if args.output is None:
        path = cached_weights(args.size, args.spacing, args.minutes, args.lr, args.seed)
    else:
        from gradicon_fast.nn import save_model

        torch.set_num_threads(1)
        model, record = train(args.size, args.spacing, args.minutes, args.lr, args.seed, init=args.init,
                              warmup=args.warmup, first_step=args.first_step, supervised=args.supervised)
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, path)
        path.with_suffix(".json").write_text(json.dumps(record, indent=1))
    record = training_record(path)
    print(f"weights: {path} ({record['steps']} steps, {record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
