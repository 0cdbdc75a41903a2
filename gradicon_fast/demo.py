"""The built-in demo, and the synthetic image pairs it (and the tests) register.

``gradicon-fast demo`` (also ``python -m gradicon_fast demo``, ``make demo``) needs no data and no
network: it builds a 3D pair at run time — a textured "body" with labelled organs, and the same
image under a known smooth deformation — registers it model-free, prints Dice before and after,
the landmark error, the fold percentage and the time, and writes a PNG and a metrics JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import functional as gfn
from . import reference
from .io import Geometry, Image

# ------------------------------------------------------------------------------------------------
# Synthetic pair with a known deformation
# ------------------------------------------------------------------------------------------------


@dataclass
class SyntheticPair:
    """A fixed/moving pair with the exact transform between them.

    ``displacement`` is the true φ_AB (A = moving, B = fixed) as a displacement field in [0, 1] units
    on the fixed grid: the fixed point x corresponds to the moving point ``x + displacement(x)``, and
    ``fixed = moving ∘ φ_AB``. Landmarks are voxel positions (index units, (N, d)) in the fixed image
    and their exact images in the moving one. Both images share ``geometry``.
    """

    fixed: torch.Tensor           # (1, 1, *S), intensities in [0, 1]
    moving: torch.Tensor
    fixed_labels: torch.Tensor    # (1, 1, *S) float tensors holding label ids 0..L
    moving_labels: torch.Tensor
    displacement: torch.Tensor    # (1, d, *S), [0, 1] units
    landmarks_fixed: np.ndarray   # (N, d) index units
    landmarks_moving: np.ndarray
    geometry: Geometry
    num_labels: int
    max_displacement_mm: float = 0.0
    min_jacobian: float = 1.0
    info: dict = field(default_factory=dict)

    def image(self, which: str) -> Image:
        """``fixed``, ``moving``, ``fixed_labels`` or ``moving_labels`` as an :class:`Image`."""
        t = getattr(self, which)
        dtype = np.int16 if which.endswith("labels") else np.float32
        return Image.from_tensor(t, self.geometry, dtype=dtype)


def _smooth_noise(shape: Sequence[int], coarse: int, generator: torch.Generator) -> torch.Tensor:
    """Band-limited noise: a coarse random grid upsampled (trilinear), standardised."""
    d = len(shape)
    coarse_shape = [max(2, math.ceil(s / coarse)) for s in shape]
    n = torch.randn((1, 1, *coarse_shape), generator=generator)
    mode = "trilinear" if d == 3 else "bilinear"
    up = F.interpolate(n, size=tuple(shape), mode=mode, align_corners=True)
    up = up[0, 0]
    return (up - up.mean()) / up.std()


def _soft_ellipsoid(axes_mm: Sequence[torch.Tensor], centre, radii, edge_mm: float
                    ) -> tuple[tuple[slice, ...], torch.Tensor]:
    """Smooth indicator of an ellipsoid on its bounding box: (box slices, values ~1 inside, ~0 outside,
    with a transition ``edge_mm`` wide). ``axes_mm`` are the voxel positions along each axis."""
    box, coords = [], []
    for k, ax in enumerate(axes_mm):
        margin = radii[k] * 1.2 + 8 * edge_mm
        inside = torch.nonzero((ax >= centre[k] - margin) & (ax <= centre[k] + margin))[:, 0]
        lo, hi = (int(inside[0]), int(inside[-1]) + 1) if len(inside) else (0, 0)
        box.append(slice(lo, hi))
        coords.append(((ax[lo:hi] - centre[k]) / radii[k]) ** 2)
    r = coords[0]
    for c in coords[1:]:
        r = r[..., None] + c
    mean_radius = float(np.mean(radii))
    return tuple(box), torch.sigmoid((1 - r.sqrt()) * mean_radius / edge_mm)


def _gaussian_bump(axes_mm: Sequence[torch.Tensor], centre, width: float) -> torch.Tensor:
    """exp(-|x - c|² / 2w²) on the full grid, built from separable 1-D factors."""
    out = None
    for k, ax in enumerate(axes_mm):
        f = torch.exp(-((ax - float(centre[k])) ** 2) / (2 * width ** 2))
        out = f if out is None else out[..., None] * f
    return out


def make_synthetic_pair(shape: Sequence[int] = (96, 96, 96), spacing: float = 2.0, *, max_displacement_mm: float = 15.0,
                        num_labels: int = 5, num_landmarks: int = 300, noise: float = 0.0, seed: int = 0
                        ) -> SyntheticPair:
    """A synthetic pair of 2D or 3D images with a known smooth deformation (at most ``max_displacement_mm``).

    The moving image is a textured ellipsoidal "body" with ``num_labels`` ellipsoidal organs of distinct
    intensities and small bright blobs; the fixed image is the moving image pulled back through a
    smooth random displacement (a sum of Gaussian bumps, ~0.16 of the field of view wide), so the true
    transform is known exactly at every fixed voxel. ``noise`` adds independent Gaussian noise of that
    standard deviation to each image (intensities are in [0, 1]).
    """
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    if d not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 axes, got {shape}")
    g = torch.Generator().manual_seed(seed)
    rand = lambda *size: torch.rand(size, generator=g, dtype=torch.float64)  # noqa: E731
    extent = torch.tensor([(s - 1) * spacing for s in shape], dtype=torch.float64)
    axes = [torch.arange(s, dtype=torch.float32) * spacing for s in shape]
    centre = extent / 2

    # -- moving image and labels -----------------------------------------------------------------
    body_radii = (extent * 0.42).tolist()
    box, values = _soft_ellipsoid(axes, centre.tolist(), body_radii, edge_mm=2.0)
    body = torch.zeros(shape)
    body[box] = values
    texture = _smooth_noise(shape, 6, g)
    image = body * (0.30 + 0.06 * texture)
    labels = torch.zeros(shape, dtype=torch.float32)
    for label in range(1, num_labels + 1):
        for _ in range(100):
            radii = extent * (0.07 + 0.08 * rand(d))
            offset = (rand(d) - 0.5) * 2 * (torch.tensor(body_radii) - radii) * 0.6
            box, inside = _soft_ellipsoid(axes, (centre + offset).tolist(), radii.tolist(), edge_mm=1.5)
            if (labels[box][inside > 0.5] == 0).float().mean() > 0.8:  # mostly free space
                break
        level = 0.45 + 0.5 * (label - 1) / max(num_labels - 1, 1)
        inner = 0.04 * _smooth_noise(inside.shape, 3, g)
        image[box] = image[box] * (1 - inside) + inside * (level + inner)
        labels[box][inside > 0.5] = label
    # small bright blobs (vessel cross-sections, nodules): features for the similarity
    blobs = torch.zeros(shape)
    for _ in range(60 if d == 3 else 25):
        c = centre + (rand(d) - 0.5) * 2 * torch.tensor(body_radii) * 0.55
        box, values = _soft_ellipsoid(axes, c.tolist(), [3.0 * spacing] * d, edge_mm=1.0)
        blobs[box] = torch.maximum(blobs[box], values)
    image = torch.clamp(image + 0.25 * blobs * body, 0, 1).float()

    # -- the deformation: x (fixed) -> x + u(x) (moving), a sum of Gaussian bumps ----------------
    width = float(extent.mean()) * 0.16
    u_mm = torch.zeros((d, *shape), dtype=torch.float32)
    for _ in range(8):
        c = centre + (rand(d) - 0.5) * extent * 0.6
        a = rand(d) * 2 - 1
        bump = _gaussian_bump(axes, c, width)
        for k in range(d):
            u_mm[k] += float(a[k]) * bump
    magnitude = u_mm.norm(dim=0).max()
    u_mm *= max_displacement_mm / float(magnitude)
    disp = torch.stack([u_mm[k] / float(extent[k]) for k in range(d)])[None].contiguous()

    chain = [disp]
    fixed = gfn.warp(image[None, None], chain, backend="torch")
    fixed_labels = gfn.warp(labels[None, None], chain, mode="nearest", backend="torch")
    phi = reference.identity_map(shape) + disp
    min_jac = float(gfn.jacobian_determinant(phi).min())

    # -- landmarks: random voxels inside the fixed body --------------------------------------------
    body_fixed = gfn.warp(body[None, None], chain, backend="torch")[0, 0] > 0.9
    candidates = torch.nonzero(body_fixed)
    pick = torch.randperm(len(candidates), generator=g)[:num_landmarks]
    lm_fixed = candidates[pick].numpy().astype(np.float64)
    u_index = (disp[0] * torch.tensor([s - 1 for s in shape]).view(d, *([1] * d))).numpy()
    lm_moving = lm_fixed + np.stack([u_index[k][tuple(candidates[pick].T.numpy())] for k in range(d)], axis=1)

    moving = image[None, None]
    if noise > 0:
        fixed = fixed + noise * torch.randn(fixed.shape, generator=g)
        moving = moving + noise * torch.randn(moving.shape, generator=g)
    geometry = Geometry.isotropic(shape, spacing)
    return SyntheticPair(fixed.contiguous(), moving.contiguous(), fixed_labels.contiguous(),
                         labels[None, None].contiguous(), disp, lm_fixed, lm_moving, geometry, num_labels,
                         max_displacement_mm=float(u_mm.norm(dim=0).max()), min_jacobian=min_jac)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def dice(a: torch.Tensor, b: torch.Tensor, num_labels: int) -> float:
    """Mean Dice over labels 1..num_labels of two label maps (docs/conventions.md §4)."""
    scores = []
    for label in range(1, num_labels + 1):
        x, y = a == label, b == label
        total = int(x.sum()) + int(y.sum())
        if total:
            scores.append(2.0 * int((x & y).sum()) / total)
    return float(np.mean(scores)) if scores else float("nan")


def landmark_error_mm(chain: Sequence[torch.Tensor] | None, pair: SyntheticPair) -> np.ndarray:
    """Per-landmark distance (mm) between φ(fixed landmark) and the true moving landmark; φ = identity
    if ``chain`` is None."""
    scale = pair.geometry.map_scale
    if chain is None:
        mapped = pair.landmarks_fixed
    else:
        x = torch.as_tensor(pair.landmarks_fixed / scale, dtype=torch.float32).T[None]  # (1, d, N)
        y = gfn.transform_points([c.detach() for c in chain], x)[0].T.double().numpy()
        mapped = y * scale
    diff_mm = (mapped - pair.landmarks_moving) * np.asarray(pair.geometry.spacing)
    return np.linalg.norm(diff_mm, axis=1)


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------


def save_figure(path: str, pair: SyntheticPair, warped: torch.Tensor, phi: torch.Tensor, jacobian: torch.Tensor,
                title: str = "") -> None:
    """PNG of one slice (across the last axis, where the labels cover the most): fixed, moving, warped
    (with label outlines), the deformation grid (φ's in-plane components) and the Jacobian determinant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_output

    d = pair.geometry.ndim
    fixed_labels = pair.fixed_labels[0, 0].numpy()
    index = int(np.argmax((fixed_labels > 0).reshape(-1, fixed_labels.shape[-1]).sum(0))) if d == 3 else None

    def cut(volume: np.ndarray) -> np.ndarray:
        return volume[..., min(index, volume.shape[-1] - 1)] if d == 3 else volume

    fixed = cut(pair.fixed[0, 0].numpy())
    panels = [(fixed, cut(fixed_labels), "fixed (its labels outlined)"),
              (cut(pair.moving[0, 0].numpy()), cut(pair.moving_labels[0, 0].numpy()), "moving (its labels outlined)"),
              (cut(warped[0, 0].numpy()), cut(fixed_labels), "warped moving (fixed labels outlined)")]
    jac = cut(jacobian[0].numpy())
    grid_map = phi[0].numpy()
    if d == 3:
        grid_map = grid_map[:2, ..., index]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.4))
    for ax, (img, labels, name) in zip(axes[:3], panels):
        ax.imshow(img.T, cmap="gray", vmin=0, vmax=1, origin="lower")
        for label in range(1, pair.num_labels + 1):
            if (labels == label).any():
                ax.contour((labels == label).T.astype(float), levels=[0.5], colors=[plt.cm.tab10(label % 10)],
                           linewidths=0.8)
        ax.set_title(name)
    ax = axes[3]
    ax.imshow(fixed.T, cmap="gray", vmin=0, vmax=1, origin="lower", alpha=0.4)
    scale = np.array(fixed.shape, dtype=float) - 1
    step = max(1, fixed.shape[0] // 32)
    gx, gy = grid_map[0] * scale[0], grid_map[1] * scale[1]
    for i in range(0, gx.shape[0], step):
        ax.plot(gx[i, :], gy[i, :], color="tab:blue", linewidth=0.5)
    for j in range(0, gx.shape[1], step):
        ax.plot(gx[:, j], gy[:, j], color="tab:blue", linewidth=0.5)
    ax.set_xlim(0, scale[0])
    ax.set_ylim(0, scale[1])
    ax.set_aspect("equal")
    ax.set_title("deformation grid φ_AB (in-plane)")
    ax = axes[4]
    im = ax.imshow(jac.T, cmap="RdBu_r", vmin=0, vmax=2, origin="lower")
    ax.set_title("Jacobian determinant")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_output(path, what="figure", verify=_check_png_complete) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def _check_png_complete(path: str) -> None:
    """A PNG ends with its IEND chunk; a file cut short does not."""
    from .io.errors import IncompleteOutput

    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - 12, 0))
        if f.read() != b"\x00\x00\x00\x00IEND\xaeB`\x82":
            raise IncompleteOutput("the PNG file is incomplete")


def run_demo(out_dir: str = "demo_output", *, size: int = 128, seed: int = 0, backend: str | None = None,
             progress: bool = True, quiet: bool = False, settings=None) -> dict:
    """Build a synthetic 3D pair (``size``³ voxels of 300/size mm… i.e. a 300 mm field of view,
    deformation ≤ 15 mm), register it model-free and report. Returns the metrics dict (also saved as
    ``metrics.json`` beside ``demo.png`` and the NIfTI files in ``out_dir``)."""
    from . import io
    from .registration import RegistrationSettings, register

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if size < 16:
        raise io.InputError(f"--size must be at least 16, got {size}")
    os.makedirs(out_dir, exist_ok=True)
    spacing = 300.0 / size
    start = time.perf_counter()
    say(f"building a synthetic {size}³ pair ({spacing:.2f} mm voxels, deformation ≤ 15 mm) ...")
    pair = make_synthetic_pair((size,) * 3, spacing, max_displacement_mm=15.0, seed=seed)
    built = time.perf_counter() - start
    settings = settings or RegistrationSettings()
    say(f"registering (model-free: {settings.describe()}) ...")
    result = register(pair.fixed, pair.moving, settings=settings, backend=backend, progress=progress)
    shape = pair.geometry.shape
    disp = gfn.compose(result.chain_AB, shape, backend=backend)
    phi = reference.identity_map(shape) + disp
    warped = gfn.warp(pair.moving, result.chain_AB, backend=backend)
    warped_labels = gfn.warp(pair.moving_labels, result.chain_AB, mode="nearest", backend=backend)
    jacobian = gfn.jacobian_determinant(phi)
    folds = float(gfn.fold_percentage(phi))
    err0, err1 = landmark_error_mm(None, pair), landmark_error_mm(result.chain_AB, pair)
    metrics = {
        "shape": list(shape), "spacing_mm": spacing, "max_true_displacement_mm": pair.max_displacement_mm,
        "dice_before": dice(pair.moving_labels, pair.fixed_labels, pair.num_labels),
        "dice_after": dice(warped_labels, pair.fixed_labels, pair.num_labels),
        "landmark_error_mm_before": float(err0.mean()), "landmark_error_mm_after": float(err1.mean()),
        "landmark_error_mm_after_p90": float(np.percentile(err1, 90)),
        "fold_percentage": folds, "jacobian_min": float(jacobian.min()), "jacobian_max": float(jacobian.max()),
        "registration_seconds": result.seconds, "pair_seconds": built,
        "backend": backend or "auto", "threads": torch.get_num_threads(), "settings": settings.as_dict(),
    }
    say(f"Dice (mean over {pair.num_labels} labels): {metrics['dice_before']:.3f} before -> "
        f"{metrics['dice_after']:.3f} after")
    say(f"landmark error: {metrics['landmark_error_mm_before']:.2f} mm before -> "
        f"{metrics['landmark_error_mm_after']:.2f} mm after (mean of {len(err1)} landmarks)")
    say(f"folds: {folds:.4f} % of cells (Jacobian determinant {metrics['jacobian_min']:.3f} .. "
        f"{metrics['jacobian_max']:.3f})")
    say(f"time: {result.seconds:.1f} s registration ({built:.1f} s to build the pair)")

    field_ = io.DisplacementField.from_map_displacement(disp, pair.geometry)
    with io.output_group():  # all the demo's files, or none
        _write_outputs(out_dir, pair, warped, field_, phi, jacobian, metrics, folds, result.seconds)
    say(f"wrote {os.path.join(out_dir, 'demo.png')}, metrics.json and the images/transform (NIfTI) to {out_dir}/")
    return metrics


def _write_outputs(out_dir, pair, warped, field_, phi, jacobian, metrics, folds, seconds) -> None:
    from . import io
    from .io.output import write_json

    io.write_image(os.path.join(out_dir, "fixed.nii.gz"), pair.image("fixed"))
    io.write_image(os.path.join(out_dir, "moving.nii.gz"), pair.image("moving"))
    # the written warped image is resampled as ITK/ANTs apply transform.nii.gz (0 outside the moving
    # image, docs/conventions.md §7); the figure shows the border-clamped warp the loss saw
    io.write_image(os.path.join(out_dir, "warped.nii.gz"), io.warp_image(pair.image("moving"), field_))
    io.write_image(os.path.join(out_dir, "fixed_labels.nii.gz"), pair.image("fixed_labels"))
    io.write_image(os.path.join(out_dir, "moving_labels.nii.gz"), pair.image("moving_labels"))
    io.write_displacement_field(os.path.join(out_dir, "transform.nii.gz"), field_)
    title = (f"Dice {metrics['dice_before']:.3f} → {metrics['dice_after']:.3f}   landmark error "
             f"{metrics['landmark_error_mm_before']:.2f} → {metrics['landmark_error_mm_after']:.2f} mm   "
             f"folds {folds:.4f} %   {seconds:.1f} s")
    save_figure(os.path.join(out_dir, "demo.png"), pair, warped, phi, jacobian, title)
    write_json(os.path.join(out_dir, "metrics.json"), metrics, what="metrics")
