"""The effect of the U-Net settings on registrations: float32 against gradicon_fast's defaults (or others).

    python -m benchmarks.precision_accuracy --trained          # trained weights, 48³, 3 held-out pairs
    python -m benchmarks.precision_accuracy                    # random weights, 96³, 16 steps
    python -m benchmarks.precision_accuracy --size 64 --steps 4 --settings default,bfloat16

With ``--trained`` (or ``--weights FILE``) the standard 4-step network has trained weights: those of
:mod:`benchmarks.trained_weights` (trained on the first call, ``--train-minutes`` on one thread, then
cached in ``benchmarks/.cache/``), or a :func:`gradicon_fast.nn.save_model` file of the standard
network. The pairs are ``--pairs`` known-deformation pairs the training never saw
(:func:`benchmarks.trained_weights.held_out_pair`, the training's size and spacing, up to 15 mm
displacement), and instance optimisation uses the product's learning rate (2e-5) unless ``--lr``
says otherwise. Results: a Markdown table and ``benchmarks/results/<device>-precision-trained.json``.

Without them, a synthetic pair with a known smooth deformation
(:func:`gradicon_fast.data.blob_pair.make_synthetic_pair`, ``--spacing`` mm voxels, up to 15 mm
displacement, 300 landmarks) is registered by the standard network with random weights (fixed
seed; its zero-initialised last layers drawn small and non-zero, so that every step moves points)
and ``--lr`` 5e-4 by default. Results: ``benchmarks/results/<device>-precision.json``.

Each pair is registered once per setting from the same weights, by the forward network (0 steps)
and after ``--steps`` Adam instance-optimisation steps (``gradicon_fast.train.instance_optimize``).
Reported per setting: the landmark error and the dense error against the true deformation (mm),
and the difference of the transform from the float32 one (mm; mean and maximum over the fixed grid
and at the landmarks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import environment
from .report import RESULTS_DIR
from .whole_step import SETTINGS

REFERENCE = "float32"
PRODUCT_LR = 2e-5          # instance optimisation's learning rate in gradicon_fast.train.instance_optimize
RANDOM_WEIGHTS_LR = 5e-4   # large enough that the random network registers the pair


def _random_model(shape, seed: int):
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


def mapped_landmarks_mm(chain, pair) -> np.ndarray:
    """φ_AB at the fixed landmarks, in mm along the image axes ((N, d))."""
    from gradicon_fast import functional as gfn

    scale = pair.geometry.map_scale
    x = torch.as_tensor(pair.landmarks_fixed / scale, dtype=torch.float32).T[None]  # (1, d, N)
    y = gfn.transform_points([c.detach() for c in chain], x)[0].T.double().numpy()
    return y * scale * np.asarray(pair.geometry.spacing)


def compare(result, reference, pair) -> dict:
    """One registration scored against the truth and against the float32 one (``reference``, a dict
    of this function's ``_fields``; None for the float32 registration itself)."""
    from gradicon_fast.data.known_pair import dense_error_mm, landmark_error_mm

    displacement = result.displacement("AB")
    landmarks = mapped_landmarks_mm(result.chain_AB, pair)
    errors = landmark_error_mm(result.chain_AB, pair)
    row = {"landmark_error_mm_mean": float(np.mean(errors)), "landmark_error_mm_max": float(np.max(errors)),
           "dense_error_mm_mean": float(np.mean(dense_error_mm(displacement, pair)))}
    if reference is not None:
        extent_mm = torch.tensor([(s - 1) * sp for s, sp in zip(displacement.shape[2:], pair.geometry.spacing)])
        grid = ((displacement - reference["displacement"]) * extent_mm.reshape(1, -1, 1, 1, 1)).norm(dim=1)
        at_landmarks = np.linalg.norm(landmarks - reference["landmarks"], axis=1)
        row.update(difference_mm_max=float(grid.max()), difference_mm_mean=float(grid.mean()),
                   landmark_difference_mm_max=float(at_landmarks.max()),
                   landmark_difference_mm_mean=float(at_landmarks.mean()))
    return row, {"displacement": displacement, "landmarks": landmarks}


def measure_pair(make_model, pair, settings, steps_list, lr: float, log=print) -> dict:
    """{"<k> steps": {setting: row}} for one pair; ``make_model(setting)`` gives a fresh configured model."""
    results = {}
    for steps in steps_list:
        reference = None
        for setting in [REFERENCE] + [s for s in settings if s != REFERENCE]:
            model = make_model(setting)
            start = time.perf_counter()
            result = _register(model, pair, steps, lr)
            seconds = time.perf_counter() - start
            row, fields = compare(result, reference, pair)
            if setting == REFERENCE:
                reference = fields
                row.update(difference_mm_max=0.0, difference_mm_mean=0.0,
                           landmark_difference_mm_max=0.0, landmark_difference_mm_mean=0.0)
            row["seconds"] = seconds
            results.setdefault(f"{steps} steps", {})[setting] = row
            log(f"{steps:>3} steps  {setting:<20}" + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    return results


def summarize(per_pair: list[dict]) -> dict:
    """Over pairs: maxima of the maxima, means of the means (``seconds`` summed)."""
    summary = {}
    for phase in per_pair[0]:
        for setting in per_pair[0][phase]:
            rows = [p[phase][setting] for p in per_pair]
            summary.setdefault(phase, {})[setting] = {
                key: (float(np.max([r[key] for r in rows])) if key.endswith("_max") else
                      float(np.sum([r[key] for r in rows])) if key == "seconds" else
                      float(np.mean([r[key] for r in rows])))
                for key in rows[0]}
    return summary


def markdown_table(summary: dict, identity_error_mm: float | None = None) -> str:
    """The summary as a Markdown table, one row per (phase, setting)."""
    lines = ["| registration | setting | landmark error mean / max (mm) | difference from float32, grid "
             "mean / max (mm) | at landmarks mean / max (mm) |", "|---|---|---:|---:|---:|"]
    if identity_error_mm is not None:
        lines.append(f"| none (identity) | | {identity_error_mm:.3f} | | |")
    for phase, rows in summary.items():
        name = "forward network" if phase == "0 steps" else f"{phase.split()[0]} instance-optimisation steps"
        for setting, r in rows.items():
            lines.append(f"| {name} | {setting} | {r['landmark_error_mm_mean']:.3f} / {r['landmark_error_mm_max']:.3f}"
                         f" | {r['difference_mm_mean']:.4f} / {r['difference_mm_max']:.4f}"
                         f" | {r['landmark_difference_mm_mean']:.4f} / {r['landmark_difference_mm_max']:.4f} |")
    return "\n".join(lines)


def run(args) -> dict:
    """Random weights on one pair (the default)."""
    from gradicon_fast.data.blob_pair import make_synthetic_pair

    shape = (args.size,) * 3
    pair = make_synthetic_pair(shape, spacing=args.spacing, max_displacement_mm=15.0, seed=args.seed)
    make_model = lambda setting: _random_model(shape, args.seed).configure(**SETTINGS[setting])  # noqa: E731
    return measure_pair(make_model, pair, args.settings, (0, args.steps), args.lr)


def _training_summary(record: dict) -> dict:
    """A training record without its loss curve (first and last 25 steps' mean loss instead), with the
    records of the weights it continued from."""
    from . import trained_weights as tw

    summary = {k: v for k, v in record.items() if k != "losses"}
    losses = np.asarray(record["losses"])
    window = min(25, len(losses))
    summary.update(loss_first_mean=float(losses[:window, 0].mean()), loss_last_mean=float(losses[-window:, 0].mean()),
                   loss_window_steps=window)
    init = record.get("init")
    if init and Path(init).with_suffix(".json").exists():
        summary["continued_from"] = _training_summary(tw.training_record(Path(init)))
    return summary


def run_trained(args) -> dict:
    """Trained weights on ``args.pairs`` held-out pairs: per pair, the summary and the training record."""
    from gradicon_fast.data.known_pair import landmark_error_mm
    from gradicon_fast.nn import load_model

    from . import trained_weights as tw

    if args.weights:
        weights = Path(args.weights)
        record = tw.training_record(weights) if weights.with_suffix(".json").exists() else None
    else:
        weights = tw.cached_weights(args.train_size, args.train_spacing, args.train_minutes, args.train_lr,
                                    args.seed)
        record = tw.training_record(weights)
    torch.set_num_threads(args.threads)
    model0 = load_model(weights)
    size = int(model0.config["input_shape"][0])
    spacing = record["spacing_mm"] if record else args.spacing
    pairs = [tw.held_out_pair(size, spacing, seed) for seed in range(args.pairs)]
    identity = [float(np.mean(landmark_error_mm(None, p))) for p in pairs]
    per_pair = []
    for seed, pair in enumerate(pairs):
        print(f"held-out pair {seed}: landmark error {identity[seed]:.3f} mm before registration", flush=True)
        make_model = lambda setting: load_model(weights).configure(**SETTINGS[setting])  # noqa: E731
        per_pair.append(measure_pair(make_model, pair, args.settings, (0, args.steps), args.lr,
                                     log=lambda line: print(line, flush=True)))
    summary = summarize(per_pair)
    training = _training_summary(record) if record else None
    return {"weights": str(weights), "size": size, "spacing_mm": spacing, "pair_seeds": list(range(args.pairs)),
            "identity_landmark_error_mm": identity, "training": training, "per_pair": per_pair,
            "summary": summary, "table": markdown_table(summary, float(np.mean(identity)))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=96, help="cubic side, random weights (default 96; >= 65 for the "
                                                        "official layout)")
    p.add_argument("--spacing", type=float, default=2.0, help="voxel spacing in mm (default 2; trained weights: "
                                                              "that of the training)")
    p.add_argument("--steps", type=int, default=16, help="instance-optimisation steps (default 16)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate (default {PRODUCT_LR:g} with trained weights, {RANDOM_WEIGHTS_LR:g} "
                        "with random ones)")
    p.add_argument("--settings", default="default", help=f"comma list of {', '.join(SETTINGS)} (default: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None)
    trained = p.add_argument_group("trained weights")
    trained.add_argument("--trained", action="store_true", help="use the weights of benchmarks.trained_weights")
    trained.add_argument("--weights", default=None, help="a save_model file of the standard network (its training record, if any, "
                         "is the .json beside it)")
    trained.add_argument("--pairs", type=int, default=3, help="held-out pairs (default 3)")
    trained.add_argument("--train-minutes", type=float, default=22.0, help="training time if not cached (default 22)")
    trained.add_argument("--train-size", type=int, default=48, help="training size (default 48)")
    trained.add_argument("--train-spacing", type=float, default=4.0, help="training spacing in mm (default 4)")
    trained.add_argument("--train-lr", type=float, default=2e-4, help="training learning rate (default 2e-4)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown or args.steps < 1 or args.size < 16 or args.pairs < 1:
        p.error(f"unknown settings {unknown} (choose from {', '.join(SETTINGS)})" if unknown
                else "--steps and --pairs must be >= 1 and --size >= 16")
    trained = args.trained or args.weights is not None
    if args.lr is None:
        args.lr = PRODUCT_LR if trained else RANDOM_WEIGHTS_LR
    torch.set_num_threads(args.threads)
    env = environment.describe("cpu")
    out = {"benchmark": "precision_accuracy_trained" if trained else "precision_accuracy",
           "device": env["device_name"], "environment": env,
           "config": {k: v for k, v in vars(args).items() if k != "output"}}
    out["results"] = run_trained(args) if trained else run(args)
    if trained:
        print(out["results"]["table"])
    suffix = "precision-trained" if trained else "precision"
    output = args.output or RESULTS_DIR / f"{out['device']}-{suffix}.json"
    with open(output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
