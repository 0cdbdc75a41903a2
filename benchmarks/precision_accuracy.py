"""The effect of the U-Net settings on registrations: float32 against gradicon_fast's defaults (or others).

    python -m benchmarks.precision_accuracy                    # 96³, 16 instance-optimisation steps
    python -m benchmarks.precision_accuracy --size 64 --steps 4 --settings default,bfloat16

A synthetic pair with a known smooth deformation (:func:`gradicon_fast.data.blob_pair.make_synthetic_pair`,
2 mm voxels, up to 15 mm displacement, 300 landmarks) is registered by the standard 4-step network
(fixed seed; its zero-initialised last layers drawn small and non-zero, so that every step moves
points) with ``--steps`` Adam instance-optimisation steps (``gradicon_fast.train.instance_optimize``,
``--lr``), once per setting, from the same weights. Reported per setting: the landmark error and the
dense error against the true deformation (mm), and the difference of the transform from the
float32 one (mm, over the fixed grid and at the landmarks), for the forward registration before any
step and after the steps. Results: a table and ``benchmarks/results/<device>-precision.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from . import environment
from .report import RESULTS_DIR
from .whole_step import SETTINGS

REFERENCE = "float32"


def _model(shape, seed: int):
    import gradicon_fast.nn as gnn

    torch.manual_seed(seed)
    model = gnn.standard_network(shape)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lastConv" in name:
                p.copy_(1e-3 * torch.randn(p.shape, generator=gen))
    return model


def _register(model, pair, steps: int, lr: float):
    from gradicon_fast.train import instance_optimize

    moving, fixed = pair.moving, pair.fixed
    if steps == 0:
        with torch.no_grad():
            model.eval()
            return model.register(moving, fixed).detach()
    return instance_optimize(model, moving, fixed, steps=steps, lr=lr, generator=torch.Generator().manual_seed(0))


def run(args) -> dict:
    from gradicon_fast.data.blob_pair import make_synthetic_pair
    from gradicon_fast.data.known_pair import dense_error_mm, landmark_error_mm

    shape = (args.size,) * 3
    pair = make_synthetic_pair(shape, spacing=args.spacing, max_displacement_mm=15.0, seed=args.seed)
    extent_mm = torch.tensor([(s - 1) * args.spacing for s in shape]).reshape(1, 3, 1, 1, 1)
    results = {}
    for steps in (0, args.steps):
        fields = {}
        for setting in [REFERENCE] + [s for s in args.settings if s != REFERENCE]:
            model = _model(shape, args.seed).configure(**SETTINGS[setting])
            start = time.perf_counter()
            result = _register(model, pair, steps, args.lr)
            seconds = time.perf_counter() - start
            displacement = result.displacement("AB")
            fields[setting] = displacement
            landmarks = landmark_error_mm(result.chain_AB, pair)
            row = {"seconds": seconds, "landmark_error_mm_mean": float(np.mean(landmarks)),
                   "landmark_error_mm_max": float(np.max(landmarks)),
                   "dense_error_mm_mean": float(np.mean(dense_error_mm(displacement, pair)))}
            difference = ((displacement - fields[REFERENCE]) * extent_mm).norm(dim=1)
            row.update(difference_mm_max=float(difference.max()), difference_mm_mean=float(difference.mean()))
            results.setdefault(f"{steps} steps", {})[setting] = row
            print(f"{steps:>3} steps  {setting:<20}" + "  ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=96, help="cubic side (default 96; >= 65 for the official layout)")
    p.add_argument("--spacing", type=float, default=2.0, help="voxel spacing in mm (default 2)")
    p.add_argument("--steps", type=int, default=16, help="instance-optimisation steps (default 16)")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="Adam learning rate (default 5e-4: large enough that the random network registers the pair)")
    p.add_argument("--settings", default="default", help=f"comma list of {', '.join(SETTINGS)} (default: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown or args.steps < 1 or args.size < 16:
        p.error(f"unknown settings {unknown} (choose from {', '.join(SETTINGS)})" if unknown
                else "--steps must be >= 1 and --size >= 16")
    torch.set_num_threads(args.threads)
    env = environment.describe("cpu")
    out = {"benchmark": "precision_accuracy", "device": env["device_name"], "environment": env,
           "config": {k: v for k, v in vars(args).items() if k != "output"}, "results": run(args)}
    output = args.output or RESULTS_DIR / f"{out['device']}-precision.json"
    with open(output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
