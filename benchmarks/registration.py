"""Model-free registration of a synthetic pair with a known deformation: accuracy, folds and time,
with the fused ops (backend ``cpu``) and with the PyTorch reference ops (backend ``torch``).

The pair is the demo's (gradicon_fast.demo.make_synthetic_pair): a textured body with labelled
organs, and the same image pulled back through a smooth random deformation of at most
``--max-displacement`` mm, so the true transform is known at every voxel. Reported per backend:
landmark error (mean / 90th percentile / max, mm) before and after, Dice before and after, the fold
percentage of the full-resolution map, the wall time and the process CPU time of the registration.

    python benchmarks/registration.py                        # 150³ at 2 mm, 20 mm, backends cpu and torch
    python benchmarks/registration.py --size 96 --backends cpu --threads 1 --noise 0.05

Results are printed as a table and written to ``benchmarks/results/registration_<device>.json``
(``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gradicon_fast as gf  # noqa: E402
from gradicon_fast import registration as R  # noqa: E402
from gradicon_fast.demo import dice, landmark_error_mm, make_synthetic_pair  # noqa: E402


def run_one(pair, backend: str, settings: R.RegistrationSettings) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    result = R.register(pair.fixed, pair.moving, settings=settings, backend=backend)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    shape = pair.geometry.shape
    phi = gf.identity_map(shape) + gf.compose(result.chain_AB, shape)
    err = landmark_error_mm(result.chain_AB, pair)
    warped_labels = gf.warp(pair.moving_labels, result.chain_AB, mode="nearest")
    return {
        "backend": backend, "wall_s": wall, "cpu_s": cpu,
        "landmark_error_mm": float(err.mean()), "landmark_error_p90_mm": float(np.percentile(err, 90)),
        "landmark_error_max_mm": float(err.max()),
        "dice": dice(warped_labels, pair.fixed_labels, pair.num_labels),
        "fold_percentage": float(gf.fold_percentage(phi)),
        "jacobian_min": float(gf.jacobian_determinant(phi).min()),
        "final_loss": result.loss_history[-1][1],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/registration.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=150, help="voxels per axis (default 150)")
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2)")
    p.add_argument("--max-displacement", type=float, default=20.0, help="largest true displacement, mm (default 20)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise added to each image (intensities in [0, 1])")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="pairs to build (default: seed 0)")
    p.add_argument("--backends", default="cpu,torch", help="comma-separated backends (default cpu,torch)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--lmbda", type=float, default=None)
    p.add_argument("--iterations", type=int, nargs="+", default=None, help="Adam steps per level")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    settings = R.RegistrationSettings()
    if args.lmbda is not None:
        settings.lmbda = args.lmbda
    if args.iterations:
        settings.levels = tuple(R.Level(lv.image_scale, lv.field_scale, n)
                                for lv, n in zip(settings.levels, args.iterations))
    rows = []
    print(f"# model-free registration, {args.size}³ at {args.spacing} mm, deformation ≤ {args.max_displacement} mm, "
          f"noise {args.noise}; {settings.describe()}; threads {torch.get_num_threads()}", flush=True)
    print(f"{'seed':>4} {'backend':>7} {'TRE before':>10} {'TRE after':>9} {'p90':>6} {'max':>6} {'Dice':>13} "
          f"{'folds %':>8} {'wall s':>7} {'cpu s':>7}", flush=True)
    for seed in args.seeds:
        start = time.perf_counter()
        pair = make_synthetic_pair((args.size,) * 3, args.spacing, max_displacement_mm=args.max_displacement,
                                   noise=args.noise, seed=seed)
        built = time.perf_counter() - start
        before = landmark_error_mm(None, pair)
        dice_before = dice(pair.moving_labels, pair.fixed_labels, pair.num_labels)
        for backend in backends:
            if not gf.backends().get(backend, False):
                print(f"{seed:>4} {backend:>7} (not available)", flush=True)
                continue
            row = run_one(pair, backend, settings)
            row.update(seed=seed, landmark_error_before_mm=float(before.mean()), dice_before=dice_before,
                       pair_seconds=built, max_true_displacement_mm=pair.max_displacement_mm)
            rows.append(row)
            print(f"{seed:>4} {backend:>7} {row['landmark_error_before_mm']:>10.2f} {row['landmark_error_mm']:>9.2f} "
                  f"{row['landmark_error_p90_mm']:>6.2f} {row['landmark_error_max_mm']:>6.2f} "
                  f"{dice_before:>6.3f}→{row['dice']:.3f} {row['fold_percentage']:>8.4f} {row['wall_s']:>7.1f} "
                  f"{row['cpu_s']:>7.1f}", flush=True)
    out = args.output or ROOT / "benchmarks" / "results" / "registration_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": "registration", "size": args.size, "spacing_mm": args.spacing,
        "max_displacement_mm": args.max_displacement, "noise": args.noise, "settings": settings.as_dict(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
