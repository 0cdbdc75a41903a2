"""Initial alignment (``register_images(init=...)``) on synthetic pairs with known transforms.

Cases, built from the demo's pair (gradicon_fast.demo.make_synthetic_pair: a smooth deformation of
at most ``--max-displacement`` mm) by gradicon_fast.data.scans:

* ``same-space``  the pair as it is (the images overlap; the true transform is the deformation alone);
* ``far``         the moving image's origin moved ``--shift`` mm away (the boxes are disjoint);
* ``far-affine``  also rotated by ``--angle`` degrees and scaled by ``--scale`` (an inter-patient pair).

For each init mode: the landmark error (mm, mean / max) of the alignment alone and of the whole
registration (forward field; inverse field for the reverse direction), the fold percentage and the
time. ``none`` on a disjoint pair is reported as a failure (the images do not overlap).

``--compare-affine`` instead compares ways to fit the affine stage, from the same start and schedule:
the package's symmetric fit (the fixed image compared through the exact inverse), a one-directional
classical fit (moving∘A against fixed only) and a GradICON-regularised pair (two independent affines
A, B with ``λ‖J(A∘B) - I‖²``, which for affine maps is ``λ‖M_A M_B - I‖²``): landmark error of A
(fixed→moving) and of the inverse direction, the inverse consistency ``|B(A(p)) - p|`` and the time.

    python benchmarks/alignment.py --size 64 --seeds 0 1 2
    python benchmarks/alignment.py --size 64 --seeds 0 1 2 --compare-affine
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

from gradicon_fast import io  # noqa: E402
from gradicon_fast import registration as R  # noqa: E402
from gradicon_fast import alignment as AL  # noqa: E402
from gradicon_fast.alignment import INIT_MODES, Affine, initial_alignment  # noqa: E402
from gradicon_fast.data.scans import ScanPair, displaced_pair  # noqa: E402
from gradicon_fast.demo import make_synthetic_pair  # noqa: E402


def cases(pair, args) -> dict[str, ScanPair]:
    g = pair.geometry
    fixed_mm = g.index_to_physical(pair.landmarks_fixed)
    moving_mm = g.index_to_physical(pair.landmarks_moving)
    shift = (args.shift, -0.5 * args.shift, 0.25 * args.shift)[:g.ndim]
    return {
        "same-space": ScanPair(pair.image("fixed"), pair.image("moving"), fixed_mm, moving_mm),
        "far": displaced_pair(pair, shift),
        "far-affine": displaced_pair(pair, shift, angle_deg=args.angle, scale=args.scale),
    }


def run_one(scans: ScanPair, init: str, settings: R.RegistrationSettings) -> dict:
    norm = lambda e: np.linalg.norm(e, axis=1)  # noqa: E731
    row = {"before_mean": float(norm(scans.errors(scans.landmarks_fixed)).mean())}
    affine, _ = initial_alignment(scans.fixed, scans.moving, init)
    aligned = norm(scans.errors(affine(scans.landmarks_fixed)))
    row.update(aligned_mean=float(aligned.mean()), aligned_max=float(aligned.max()))
    start = time.perf_counter()
    try:
        out = R.register_images(scans.fixed, scans.moving, intensity="none", settings=settings, init=init)
    except io.InputError as e:
        row.update(failed=str(e))
        return row
    after = norm(scans.errors(out.forward.transform_points(scans.landmarks_fixed)))
    back = norm(out.inverse.transform_points(scans.landmarks_moving) - scans.landmarks_fixed)
    row.update(after_mean=float(after.mean()), after_p90=float(np.percentile(after, 90)), after_max=float(after.max()),
               inverse_mean=float(back.mean()), folds=out.fold_percentage, seconds=time.perf_counter() - start)
    return row


def fit_affine_pair(fixed, moving, start: Affine, kind: str, lmbda: float = 1.0) -> tuple[Affine, Affine]:
    """(A fixed→moving, B moving→fixed) fitted by ``kind``: "forward" (classical, one direction) or
    "gradicon" (two affines, GradICON-regularised); same normalisation, schedule and LNCC as the package."""
    settings = AL.AffineSettings()
    f64 = torch.float64
    centres = [torch.as_tensor(AL.geometric_center(im.geometry), dtype=f64) for im in (fixed, moving)]
    half = float(max((np.asarray(fixed.geometry.shape) - 1) * np.asarray(fixed.geometry.spacing)) / 2)

    def params(a: Affine, c):
        m = torch.as_tensor(np.asarray(a.matrix), dtype=f64)
        return [m.clone().requires_grad_(True),
                ((m @ c + torch.as_tensor(a.offset, dtype=f64) - c) / half).requires_grad_(True)]

    def apply(points, m, t, c):
        return (points - c) @ m.T + c + half * t

    pa, pb = params(start, centres[0]), params(start.inverse(), centres[1])
    for size, iterations in settings.levels:
        f, m_ = AL._Sampler(fixed, size), AL._Sampler(moving, size)
        sim_f, sim_m = AL._similarity(settings.sigma, f.shape), AL._similarity(settings.sigma, m_.shape)
        optimiser = torch.optim.Adam(pa + pb, lr=settings.lr)
        for _ in range(iterations):
            optimiser.zero_grad(set_to_none=True)
            loss = sim_f(m_.sample(apply(f.points, *pa, centres[0]), f.shape), f.tensor)
            if kind == "gradicon":
                loss = loss + sim_m(f.sample(apply(m_.points, *pb, centres[1]), m_.shape), m_.tensor)
                loss = loss + lmbda * ((pa[0] @ pb[0] - torch.eye(fixed.ndim, dtype=f64)) ** 2).sum()
            loss.backward()
            optimiser.step()

    def to_affine(m, t, c):
        m = m.detach()
        return Affine(m.numpy().copy(), (c + half * t.detach() - m @ c).numpy().copy())

    a = to_affine(*pa, centres[0])
    b = to_affine(*pb, centres[1]) if kind == "gradicon" else a.inverse()
    return a, b


def compare_affine(scans: ScanPair) -> list[dict]:
    norm = lambda e: np.linalg.norm(e, axis=1)  # noqa: E731
    moments, _ = initial_alignment(scans.fixed, scans.moving, "moments")
    rows = []
    for kind in ("symmetric", "forward", "gradicon"):
        start = time.perf_counter()
        if kind == "symmetric":
            a, _ = AL.optimise_affine(scans.fixed, scans.moving, [moments])
            b = a.inverse()
        else:
            a, b = fit_affine_pair(scans.fixed, scans.moving, moments, kind)
        seconds = time.perf_counter() - start
        forward = norm(scans.errors(a(scans.landmarks_fixed)))
        backward = norm(b(scans.landmarks_moving) - scans.landmarks_fixed)
        rows.append(dict(kind=kind, forward=float(forward.mean()), backward=float(backward.mean()),
                         consistency=float(norm(b(a(scans.landmarks_fixed)) - scans.landmarks_fixed).mean()),
                         seconds=seconds))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/alignment.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="voxels per axis (default 64, a 300 mm field of view)")
    p.add_argument("--max-displacement", type=float, default=15.0)
    p.add_argument("--shift", type=float, default=600.0, help="origin shift of the moving image, mm (default 600)")
    p.add_argument("--angle", type=float, default=15.0)
    p.add_argument("--scale", type=float, default=1.15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--inits", default=",".join(INIT_MODES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, default=None, help="JSON file for the rows")
    p.add_argument("--compare-affine", action="store_true", help="compare ways to fit the affine stage")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = R.RegistrationSettings()
    rows = []
    if args.compare_affine:
        print("case        seed  fit         A error  B error  |B(A(p)) - p|     s   (mm, means)")
        for seed in args.seeds:
            pair = make_synthetic_pair((args.size,) * 3, 300 / (args.size - 1),
                                       max_displacement_mm=args.max_displacement, num_landmarks=200, seed=seed)
            for name, scans in cases(pair, args).items():
                if name == "far":
                    continue
                for row in compare_affine(scans):
                    rows.append(dict(case=name, seed=seed, **row))
                    print(f"{name:<11} {seed:>4}  {row['kind']:<10} {row['forward']:8.2f} {row['backward']:8.2f} "
                          f"{row['consistency']:12.3f} {row['seconds']:7.1f}", flush=True)
        if args.output:
            args.output.write_text(json.dumps(rows, indent=1))
        return 0
    print("case        init     seed  before   aligned (mean/max)   registered (mean/p90/max)  inverse  folds %   s")
    for seed in args.seeds:
        pair = make_synthetic_pair((args.size,) * 3, 300 / (args.size - 1), max_displacement_mm=args.max_displacement,
                                   num_landmarks=200, seed=seed)
        for name, scans in cases(pair, args).items():
            for init in args.inits.split(","):
                row = dict(case=name, init=init, seed=seed, **run_one(scans, init, settings))
                rows.append(row)
                head = (f"{name:<11} {init:<8} {seed:>4} {row['before_mean']:7.1f}  {row['aligned_mean']:8.2f} / "
                        f"{row['aligned_max']:6.2f}    ")
                if "failed" in row:
                    print(head + " fails: no overlap", flush=True)
                else:
                    print(head + f"  {row['after_mean']:6.2f} / {row['after_p90']:5.2f} / {row['after_max']:5.2f}   "
                          f"{row['inverse_mean']:6.2f}  {row['folds']:7.4f} {row['seconds']:5.1f}", flush=True)
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
