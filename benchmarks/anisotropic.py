"""Registration of anisotropic scans: the loss grid near-isotropic in millimetres, against the loss grid
that keeps the image's voxel aspect (``RegistrationSettings(physical_grid=False)``, the grid chosen by
voxel count alone).

The scans are simulated from the demo's isotropic pair (gradicon_fast.demo.make_synthetic_pair, a
smooth known deformation of at most ``--max-displacement`` mm) by gradicon_fast.data.scans.thick_slice_pair:
both images re-acquired with thick slices (each axis's voxel size is also its slice thickness), over
the same physical box, so every landmark's true position is known in mm. Cases:

* ``ct``   0.6 x 0.6 x 5 mm (thick axial slices, axis 2);
* ``mri``  4 x 0.9 x 0.9 mm (thick sagittal slices, axis 0);
* ``iso``  the isotropic source itself (both grids are then the same: a control).

Reported per case and grid: the landmark error along the slice axis and overall (mean / max, mm),
the fold percentage, the loss grid and the time; ``register_images(init="none")`` so that only the
loss grid differs.

    python benchmarks/anisotropic.py --fov 200 --source-spacing 1.25 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradicon_fast import registration as R  # noqa: E402
from gradicon_fast.data.scans import ScanPair, thick_slice_pair  # noqa: E402
from gradicon_fast.demo import make_synthetic_pair  # noqa: E402

CASES = {"ct": (0.6, 0.6, 5.0), "mri": (4.0, 0.9, 0.9), "iso": None}


def run_one(scans: ScanPair, physical: bool, settings: R.RegistrationSettings) -> dict:
    settings = R.RegistrationSettings(**{**settings.as_dict(), "levels": settings.levels, "physical_grid": physical})
    start = time.perf_counter()
    out = R.register_images(scans.fixed, scans.moving, intensity="none", settings=settings, init="none",
                            warn=lambda message: None)
    seconds = time.perf_counter() - start
    axis = int(np.argmax(scans.fixed.geometry.spacing))
    before = scans.errors(scans.landmarks_fixed)
    after = scans.errors(out.forward.transform_points(scans.landmarks_fixed))
    return {
        "loss_grid": out.details["loss_shape"], "slice_axis": axis, "seconds": seconds, "folds": out.fold_percentage,
        "before_axis_mean": float(np.abs(before[:, axis]).mean()), "before_mean": float(np.linalg.norm(before, axis=1).mean()),
        "axis_mean": float(np.abs(after[:, axis]).mean()), "axis_max": float(np.abs(after[:, axis]).max()),
        "mean": float(np.linalg.norm(after, axis=1).mean()), "max": float(np.linalg.norm(after, axis=1).max()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/anisotropic.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--fov", type=float, default=200.0, help="field of view, mm (default 200)")
    p.add_argument("--source-spacing", type=float, default=1.25, help="isotropic voxel of the source pair, mm")
    p.add_argument("--max-displacement", type=float, default=15.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--max-size", type=int, default=80)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = R.RegistrationSettings(max_size=args.max_size)
    n = int(round(args.fov / args.source_spacing)) + 1
    rows = []
    print("case  grid      seed  loss grid     slice axis: before  mean / max   overall: before  mean / max   "
          "folds %      s")
    for seed in args.seeds:
        pair = make_synthetic_pair((n,) * 3, args.fov / (n - 1), max_displacement_mm=args.max_displacement,
                                   num_landmarks=300, seed=seed)
        for case in args.cases.split(","):
            spacing = CASES[case]
            if spacing is None:
                g = pair.geometry
                scans = ScanPair(pair.image("fixed"), pair.image("moving"), g.index_to_physical(pair.landmarks_fixed),
                                 g.index_to_physical(pair.landmarks_moving))
            else:
                scans = thick_slice_pair(pair, spacing)
            for physical in (False, True):
                row = dict(case=case, grid="mm" if physical else "voxels", seed=seed, spacing=spacing,
                           **run_one(scans, physical, settings))
                rows.append(row)
                print(f"{case:<5} {row['grid']:<7} {seed:>4}  {'x'.join(map(str, row['loss_grid'])):<12}  "
                      f"{row['before_axis_mean']:13.2f}  {row['axis_mean']:5.2f} / {row['axis_max']:5.2f}  "
                      f"{row['before_mean']:14.2f}  {row['mean']:5.2f} / {row['max']:5.2f}  {row['folds']:8.4f} "
                      f"{row['seconds']:6.1f}", flush=True)
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
