"""The built-in demo: register a brain to a deformed, re-shaded, noisy copy of itself and score the result.

``gradicon-fast demo`` (also ``python -m gradicon_fast demo``, ``make demo``) registers the MNI
ICBM152 brain template (:mod:`gradicon_fast.data.mni_pair`: the template files that the nilearn
wheel bundles; ``make setup`` installs it) to the same brain under a known smooth deformation with a
bias field and Rician noise, model-free (:func:`gradicon_fast.registration.register`). Because the
true transform is known it prints Dice per tissue before and after, the error against the true
deformation in millimetres, the folds and the time, and writes a figure (:mod:`gradicon_fast.demo_figure`),
``metrics.json``, the images and the transform (NIfTI). ``synthetic=True`` (``--synthetic``) runs
the same on the synthetic organs pair of :mod:`gradicon_fast.data.blob_pair` instead.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from . import functional as gfn
from . import reference
# the pairs and their scores, importable from here as before
from .data.blob_pair import make_synthetic_pair
from .data.known_pair import SyntheticPair, dense_error_mm, dice, landmark_error_mm
from .demo_figure import save_figure
from .evaluation import dice_per_label

__all__ = ["SyntheticPair", "dense_error_mm", "dice", "landmark_error_mm", "make_synthetic_pair", "run_demo",
           "save_figure"]

DEFAULT_SIZE = {"anatomy": 96, "synthetic": 128}


def _describe_grid(geometry) -> str:
    spacing = geometry.spacing
    isotropic = max(spacing) - min(spacing) < 1e-6
    size = f"{spacing[0]:.2f} mm" if isotropic else "×".join(f"{s:.2f}" for s in spacing) + " mm"
    return f"{'×'.join(map(str, geometry.shape))} voxels of {size}"


def _build_pair(synthetic: bool, size: int, seed: int) -> tuple[SyntheticPair, str, str]:
    """The pair, a sentence describing it, and the data's attribution (empty for the synthetic pair)."""
    from . import io

    if synthetic:
        if size < 16:
            raise io.InputError(f"--size must be at least 16, got {size}")
        spacing = 300.0 / size
        pair = make_synthetic_pair((size,) * 3, spacing, max_displacement_mm=15.0, seed=seed)
        return pair, (f"synthetic organs, {_describe_grid(pair.geometry)}; moving = fixed under a known deformation "
                      f"(≤ {pair.max_displacement_mm:.1f} mm)"), ""
    from .data import mni_pair

    if size < 16:
        raise io.InputError(f"--size must be at least 16, got {size}")
    pair = mni_pair.make_mni_pair(size, seed=seed)
    low, high = pair.info["bias_range"]
    return pair, (f"MNI ICBM152 brain template, {_describe_grid(pair.geometry)}; moving = the template under a known "
                  f"deformation (≤ {pair.max_displacement_mm:.1f} mm), bias field ×{low:.2f}–{high:.2f}, Rician "
                  f"noise σ = {pair.info['rician_sigma']:g}"), mni_pair.ATTRIBUTION


def _per_label(scores: torch.Tensor, names: list[str]) -> dict:
    return {name: float(s) for name, s in zip(names, scores[0])}


def run_demo(out_dir: str = "demo_output", *, size: int | None = None, seed: int = 0, backend: str | None = None,
             progress: bool = True, quiet: bool = False, settings=None, synthetic: bool = False) -> dict:
    """Build the pair (the brain template, ``size`` voxels along its longest axis, default 96; with
    ``synthetic``, the organs pair of ``size``³ voxels over 300 mm, default 128), register it
    model-free and report. Returns the metrics (also saved as ``metrics.json`` beside ``demo.png`` and
    the NIfTI files in ``out_dir``; nothing is written if anything fails)."""
    from . import io
    from .registration import RegistrationSettings, register

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    size = size or DEFAULT_SIZE["synthetic" if synthetic else "anatomy"]
    start = time.perf_counter()
    pair, description, attribution = _build_pair(synthetic, size, seed)
    built = time.perf_counter() - start
    say(f"pair: {description}")
    settings = settings or RegistrationSettings()
    say(f"registering (model-free: loss grid ≤ {settings.max_size} voxels per axis, {settings.describe()}) ...")
    result = register(pair.fixed, pair.moving, settings=settings, spacing=pair.geometry.spacing, backend=backend,
                      progress=progress)
    shape = pair.geometry.shape
    disp = gfn.compose(result.chain_AB, shape, backend=backend)
    phi = reference.identity_map(shape) + disp
    warped = gfn.warp(pair.moving, result.chain_AB, backend=backend)
    warped_labels = gfn.warp(pair.moving_labels, result.chain_AB, mode="nearest", backend=backend)
    ideal_labels = gfn.warp(pair.moving_labels, [pair.displacement], mode="nearest", backend="torch")
    jacobian = gfn.jacobian_determinant(phi)
    names = pair.names()
    dice_scores = {when: dice_per_label(labels, pair.fixed_labels, pair.num_labels)
                   for when, labels in (("before", pair.moving_labels), ("after", warped_labels),
                                        ("true_transform", ideal_labels))}
    error_before, error_after = dense_error_mm(None, pair), dense_error_mm(disp, pair)
    folds = int((jacobian <= 0).sum())
    metrics = {
        "pair": description, "shape": list(shape), "spacing_mm": list(pair.geometry.spacing),
        "max_true_displacement_mm": pair.max_displacement_mm,
        "dice": {when: _per_label(s, names) for when, s in dice_scores.items()},
        "dice_mean": {when: float(torch.nanmean(s)) for when, s in dice_scores.items()},
        "error_mm": {when: {"mean": float(e.mean()), "p90": float(np.percentile(e, 90)), "max": float(e.max())}
                     for when, e in (("before", error_before), ("after", error_after))},
        "error_region_voxels": int(error_after.size),
        "folds": folds, "fold_percentage": 100.0 * folds / jacobian.numel(),
        "jacobian_min": float(jacobian.min()), "jacobian_max": float(jacobian.max()),
        "registration_seconds": result.seconds, "pair_seconds": built,
        "backend": backend or "auto", "threads": torch.get_num_threads(), "settings": settings.as_dict(),
        "data": attribution or "synthetic (built at run time)",
    }
    _report(metrics, names, print)
    field_ = io.DisplacementField.from_map_displacement(disp, pair.geometry)
    with io.output_group():  # all the demo's files, or none
        _write_outputs(out_dir, pair, warped, field_, phi, jacobian, metrics, attribution)
    metrics["total_seconds"] = time.perf_counter() - start
    print(f"wrote {os.path.join(out_dir, 'demo.png')}, metrics.json and the images/transform (NIfTI) to {out_dir}/ "
          f"({metrics['total_seconds']:.0f} s in all)")
    if attribution:
        say(attribution)
    return metrics


def _report(metrics: dict, names: list[str], say) -> None:
    dice_ = metrics["dice"]
    width = max(len(n) for n in names + ["mean"])
    say(f"Dice{'':{width - 2}}before  after   (true transform)")
    for name in names:
        say(f"  {name:{width}}  {dice_['before'][name]:.3f}   {dice_['after'][name]:.3f}   "
            f"({dice_['true_transform'][name]:.3f})")
    mean = metrics["dice_mean"]
    say(f"  {'mean':{width}}  {mean['before']:.3f}   {mean['after']:.3f}   ({mean['true_transform']:.3f})")
    before, after = metrics["error_mm"]["before"], metrics["error_mm"]["after"]
    say(f"error against the true deformation ({metrics['error_region_voxels']} voxels): mean {before['mean']:.2f} -> "
        f"{after['mean']:.2f} mm, 90th percentile {before['p90']:.2f} -> {after['p90']:.2f} mm, max "
        f"{before['max']:.2f} -> {after['max']:.2f} mm")
    say(f"folds: {metrics['folds']} cells ({metrics['fold_percentage']:.4f} %); Jacobian determinant "
        f"{metrics['jacobian_min']:.3f} .. {metrics['jacobian_max']:.3f}")
    say(f"time: {metrics['registration_seconds']:.1f} s registration ({metrics['pair_seconds']:.1f} s to build the "
        f"pair, {metrics['threads']} threads)")


def _title(metrics: dict, names: list[str]) -> str:
    dice_ = metrics["dice"]
    tissues = ", ".join(f"{name} {dice_['before'][name]:.2f}→{dice_['after'][name]:.2f}" for name in names)
    error = metrics["error_mm"]
    return (f"{metrics['pair']}\nDice {tissues}   ·   error vs true deformation {error['before']['mean']:.2f} → "
            f"{error['after']['mean']:.2f} mm (mean)   ·   folds {metrics['folds']} "
            f"({metrics['fold_percentage']:.3f} %)   ·   {metrics['registration_seconds']:.0f} s")


def _write_text(path: str, text: str) -> None:
    from .io import atomic_output

    with atomic_output(path, what="notice") as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def _write_outputs(out_dir, pair, warped, field_, phi, jacobian, metrics, attribution) -> None:
    from . import io
    from .io.output import write_json

    os.makedirs(out_dir, exist_ok=True)
    io.write_image(os.path.join(out_dir, "fixed.nii.gz"), pair.image("fixed"))
    io.write_image(os.path.join(out_dir, "moving.nii.gz"), pair.image("moving"))
    # the written warped image is resampled as ITK/ANTs apply transform.nii.gz (0 outside the moving
    # image, docs/conventions.md §7); the figure shows the border-clamped warp the loss saw
    io.write_image(os.path.join(out_dir, "warped.nii.gz"), io.warp_image(pair.image("moving"), field_))
    io.write_image(os.path.join(out_dir, "fixed_labels.nii.gz"), pair.image("fixed_labels"))
    io.write_image(os.path.join(out_dir, "moving_labels.nii.gz"), pair.image("moving_labels"))
    io.write_displacement_field(os.path.join(out_dir, "transform.nii.gz"), field_)
    save_figure(os.path.join(out_dir, "demo.png"), pair, warped, phi, jacobian, _title(metrics, pair.names()),
                footer=attribution)
    write_json(os.path.join(out_dir, "metrics.json"), metrics, what="metrics")
    if attribution:
        from .data.mni_pair import LICENCE

        _write_text(os.path.join(out_dir, "NOTICE.txt"), f"{attribution}\n\n{LICENCE}\n")
