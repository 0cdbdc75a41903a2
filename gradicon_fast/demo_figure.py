"""The demo's figure: a registered pair with a known transform, in three named orientations.

One row per orientation (axial, coronal, sagittal; one row for a 2D pair), each slice through the
part of the image the true deformation moves most and labelled with its position in millimetres
(RAS, so MNI coordinates for the brain template). Columns: the fixed image, the moving image and the
warped moving image, each with the fixed image's label boundaries drawn over it (misplaced on the
moving image, in place on the warped one); the difference to the fixed image before and after
registration; the recovered deformation as a grid over the moving image; the Jacobian determinant
(diverging colours centred at 1, with folds where it is ≤ 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .data.known_pair import SyntheticPair

GRID_COLOUR = "#ffd21f"
OUTLINE_COLOUR = "#00e5ff"
ORIENTATIONS = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))  # RAS: normal, (across, up)
RAS_NAMES = "xyz"
RAS_EDGES = (("R", "L"), ("A", "P"), ("S", "I"))  # (positive, negative) end of each RAS axis


@dataclass
class Plane:
    """A slice of a 3D grid (or the whole 2D grid) shown with RAS coordinates increasing to the right and up."""

    name: str
    normal: int | None             # index axis across the slice (None: 2D)
    position: int                  # index along it
    axes: tuple[int, int]          # index axes shown across and up
    flips: tuple[bool, bool]       # whether each shown axis runs against its RAS direction
    edges: tuple[str, str, str, str] = ("", "", "", "")   # letters at the left, right, bottom and top

    def cut(self, volume: np.ndarray) -> np.ndarray:
        """``volume`` (the grid's shape, or one less per axis for cell values) as (across, up)."""
        if self.normal is not None:
            volume = np.take(volume, min(self.position, volume.shape[self.normal] - 1), axis=self.normal)
            kept = [k for k in range(3) if k != self.normal]
            volume = np.transpose(volume, [kept.index(a) for a in self.axes])
        for axis, flip in enumerate(self.flips):
            if flip:
                volume = np.flip(volume, axis)
        return volume


def _planes(pair: SyntheticPair) -> list[Plane]:
    """Three orthogonal planes through the region the true deformation moves most (one plane in 2D)."""
    geometry = pair.geometry
    if geometry.ndim == 2:
        m = geometry.affine_ras[:2, :2]
        return [Plane("2D image", None, 0, (0, 1), (bool(m[0, 0] < 0), bool(m[1, 1] < 0)))]
    ras = geometry.affine_ras[:3, :3]
    # the index axis that runs closest to each RAS axis, and whether it runs against it
    index_axis = [int(np.argmax(np.abs(ras[r]))) for r in range(3)]
    against = [bool(ras[r, index_axis[r]] < 0) for r in range(3)]
    moved = np.linalg.norm(pair.displacement[0].numpy() * geometry.map_scale.reshape(3, 1, 1, 1)
                           * np.reshape(geometry.spacing, (3, 1, 1, 1)), axis=0)
    region = pair.region.numpy() if pair.region is not None else np.ones(geometry.shape, bool)
    planes = []
    for name, normal_ras, shown_ras in ORIENTATIONS:
        normal = index_axis[normal_ras]
        others = tuple(k for k in range(3) if k != normal)
        profile = np.where(region, moved, 0).sum(axis=others)   # displacement summed over each slice
        inside = np.nonzero(region.any(axis=others))[0]
        lo, hi = (inside[0], inside[-1]) if len(inside) else (0, geometry.shape[normal] - 1)
        centre, half = (lo + hi) / 2, max((hi - lo) * 0.3, 1)    # the central 60 % of the region
        candidates = np.arange(int(np.ceil(centre - half)), int(np.floor(centre + half)) + 1)
        position = int(candidates[np.argmax(profile[candidates])])
        a, b = shown_ras
        edges = (RAS_EDGES[a][1], RAS_EDGES[a][0], RAS_EDGES[b][1], RAS_EDGES[b][0])
        planes.append(Plane(name, normal, position, (index_axis[a], index_axis[b]), (against[a], against[b]), edges))
    return planes


def _slice_label(pair: SyntheticPair, plane: Plane) -> str:
    if plane.normal is None:
        return plane.name
    centre = (np.asarray(pair.geometry.shape, dtype=np.float64) - 1) / 2
    centre[plane.normal] = plane.position
    ras = pair.geometry.affine_ras @ np.append(centre, 1.0)
    normal_ras = int(np.argmax(np.abs(pair.geometry.affine_ras[:3, plane.normal])))
    return f"{plane.name}\n{RAS_NAMES[normal_ras]} = {ras[normal_ras]:+.0f} mm"


def _grid_lines(ax, plane: Plane, phi: np.ndarray, scale: np.ndarray, step: int) -> None:
    """The fixed grid's lines every ``step`` voxels, drawn where φ puts them (in-plane components),
    in the (across, up) voxel coordinates of the plane."""
    coords = []
    for axis, flip in zip(plane.axes, plane.flips):
        c = plane.cut(phi[axis]) * scale[axis]
        coords.append(scale[axis] - c if flip else c)
    across, up = coords
    for i in range(0, across.shape[0], step):
        ax.plot(across[i, :], up[i, :], color=GRID_COLOUR, linewidth=0.9)
    for j in range(0, across.shape[1], step):
        ax.plot(across[:, j], up[:, j], color=GRID_COLOUR, linewidth=0.9)


def _edge_letters(ax, plane: Plane) -> None:
    style = dict(transform=ax.transAxes, color="white", fontsize=9, fontweight="bold")
    left, right, bottom, top = plane.edges
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)


def save_figure(path: str, pair: SyntheticPair, warped: torch.Tensor, phi: torch.Tensor, jacobian: torch.Tensor,
                title: str = "", footer: str = "") -> None:
    """Write the figure (PNG, crash-safely) for ``pair`` registered by ``phi`` (the recovered φ_AB as a
    map on the fixed grid, (1, d, *S)), ``warped`` (the moving image through it) and ``jacobian``
    (its determinant per cell, (1, *(S - 1)))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    from .io import atomic_output

    planes = _planes(pair)
    fixed = pair.fixed[0, 0].numpy()
    moving = pair.moving[0, 0].numpy()
    warped = warped[0, 0].detach().numpy()
    fixed_labels = pair.fixed_labels[0, 0].numpy()
    phi = phi[0].detach().numpy()
    jacobian = jacobian[0].detach().numpy()
    region = pair.region.numpy() if pair.region is not None else None
    scale = pair.geometry.map_scale
    spacing = pair.geometry.spacing
    bright = max(float(np.percentile(fixed, 99.5)), float(np.percentile(moving, 99.5))) or 1.0
    difference_range = 0.5 * bright
    shown_jacobian = np.concatenate([p.cut(jacobian).ravel() for p in planes])
    spread = max(0.25, float(np.ceil(np.abs(shown_jacobian - 1).max() * 10) / 10))
    jacobian_norm = TwoSlopeNorm(vcenter=1.0, vmin=min(1 - spread, 0.0 if shown_jacobian.min() <= 0 else 1 - spread),
                                 vmax=1 + spread)
    step = max(2, round(max(pair.geometry.shape) / 20))

    after = "(after; the shading left is\nthe bias field)" if "bias_range" in pair.info else "(after)"
    outlined = pair.outline_labels or range(1, pair.num_labels + 1)
    outline = ", ".join(pair.names()[label - 1] for label in outlined) if len(outlined) <= 2 else "labels"
    columns = [f"fixed\n(cyan: its {outline})", f"moving\n(cyan: the fixed {outline})",
               f"warped moving\n(cyan: the fixed {outline})", "moving − fixed\n(before)",
               f"warped − fixed\n{after}",
               f"recovered deformation\n(grid every {step} voxels, on moving)", "Jacobian determinant\nof φ"]
    fig, axes = plt.subplots(len(planes), len(columns), figsize=(2.55 * len(columns), 2.75 * len(planes) + 1.3),
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.01, hspace=0.01,
                                rect=(0, 0.025 if footer else 0, 1, 0.975 if footer else 1))
    for row, plane in enumerate(planes):
        across, up = plane.axes
        aspect = spacing[up] / spacing[across]

        def show(ax, volume, **kwargs):
            return ax.imshow(plane.cut(volume).T, origin="lower", aspect=aspect, interpolation="nearest", **kwargs)

        labels = plane.cut(fixed_labels)
        for col, volume in enumerate((fixed, moving, warped)):
            ax = axes[row, col]
            show(ax, volume, cmap="gray", vmin=0, vmax=bright)
            for label in outlined:
                if (labels == label).any():
                    ax.contour((labels == label).T.astype(float), levels=[0.5], colors=OUTLINE_COLOUR,
                               linewidths=0.7)
        for col, other in ((3, moving), (4, warped)):
            difference_image = show(axes[row, col], other - fixed, cmap="PuOr_r", vmin=-difference_range,
                                    vmax=difference_range)
        ax = axes[row, 5]
        show(ax, moving, cmap="gray", vmin=0, vmax=bright, alpha=0.75)
        _grid_lines(ax, plane, phi, scale, step)
        ax.set_xlim(-0.5, labels.shape[0] - 0.5)
        ax.set_ylim(-0.5, labels.shape[1] - 0.5)
        ax = axes[row, 6]
        jacobian_image = ax.imshow(plane.cut(jacobian).T, origin="lower", aspect=aspect, cmap="RdBu_r",
                                   norm=jacobian_norm, extent=(0, labels.shape[0] - 1, 0, labels.shape[1] - 1))
        if region is not None:  # outside the region the field only extrapolates: dimmed
            outside = plane.cut(~region).T.astype(float)
            ax.imshow(np.dstack([np.ones_like(outside)] * 3 + [0.55 * outside]), origin="lower", aspect=aspect,
                      interpolation="nearest")
            ax.contour(plane.cut(region).T.astype(float), levels=[0.5], colors="0.3", linewidths=0.7)
        ax.set_xlim(-0.5, labels.shape[0] - 0.5)
        ax.set_ylim(-0.5, labels.shape[1] - 0.5)
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col < 3 or col == 5:
                _edge_letters(ax, plane)
        axes[row, 0].set_ylabel(_slice_label(pair, plane), fontsize=11)
    for col, name in enumerate(columns):
        axes[0, col].set_title(name, fontsize=10)
    bar = fig.colorbar(difference_image, ax=axes[:, 3:5], orientation="horizontal", shrink=0.8, aspect=30)
    bar.set_label("intensity difference", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    bar = fig.colorbar(jacobian_image, ax=axes[:, 6], orientation="horizontal", shrink=0.95, aspect=15)
    bar.set_label("det ∇φ (1: volume kept, ≤ 0: fold)", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    if footer:
        fig.text(0.005, 0.002, footer, fontsize=6.5, color="0.3", ha="left", va="bottom", wrap=True)
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
