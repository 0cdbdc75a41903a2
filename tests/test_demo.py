"""The demo (``gradicon-fast demo``): the brain-template pair and its known transform, the synthetic
pair, the figure's orientations, and a clear error when the template files are missing.

The template files come with the nilearn package (``make setup`` installs it with ``--no-deps``);
without it the tests that need them are skipped, the error path is tested either way.
"""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from gradicon_fast import functional as gfn
from gradicon_fast import io
from gradicon_fast.data import mni_pair
from gradicon_fast.data.blob_pair import make_synthetic_pair
from gradicon_fast.demo_figure import _planes, _slice_label

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems on shared cores

ROOT = Path(__file__).resolve().parent.parent


def _template_installed() -> bool:
    try:
        mni_pair.template_folder()
    except mni_pair.DemoDataMissing:
        return False
    return True


needs_template = pytest.mark.skipif(not _template_installed(),
                                    reason=f"the MNI template files are not installed ({mni_pair.INSTALL_HINT})")


def run_demo_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gradicon_fast", "demo", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def check_improves(metrics, tissues):
    assert list(metrics["dice"]["after"]) == list(tissues)
    assert metrics["dice_mean"]["after"] > metrics["dice_mean"]["before"]
    assert metrics["error_mm"]["after"]["mean"] < metrics["error_mm"]["before"]["mean"]


@needs_template
def test_brain_demo_writes_figure_metrics_and_attribution(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo_cli("--out", out, "--size", "32", "-q")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["NOTICE.txt", "demo.png", "fixed.nii.gz", "fixed_labels.nii.gz", "metrics.json", "moving.nii.gz",
                     "moving_labels.nii.gz", "transform.nii.gz", "warped.nii.gz"]
    metrics = json.loads((out / "metrics.json").read_text())
    check_improves(metrics, mni_pair.TISSUES)
    assert metrics["data"] == mni_pair.ATTRIBUTION
    notice = (out / "NOTICE.txt").read_text()
    assert "Louis Collins" in notice and "Permission to use" in notice
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "white matter" in proc.stdout and "error against the true deformation" in proc.stdout
    # the images are written on the template's physical grid (MNI millimetres, LPS)
    fixed = io.read_image(out / "fixed.nii.gz")
    assert np.allclose(fixed.geometry.direction, (-1, 0, 0, 0, -1, 0, 0, 0, 1))


@needs_template
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brain_pair_true_transform_maps_moving_onto_fixed(seed):
    """Without noise or bias, the moving image sampled through the pair's true φ_AB is the fixed image
    up to interpolation; a sign or axis-order mistake in φ_AB would make it worse than no transform."""
    pair = mni_pair.make_mni_pair(40, seed=seed, noise=0.0, bias=0.0)
    region = pair.region
    before = (pair.moving - pair.fixed)[0, 0][region].abs().mean()

    def mismatch(displacement):
        return (gfn.warp(pair.moving, [displacement], backend="torch") - pair.fixed)[0, 0][region].abs().mean()

    # 40 voxels (5 mm) along the longest axis: what is left is mostly interpolation (measured 0.51 of
    # `before` here, 0.21 at 96 voxels), while the opposite displacement is worse than none (1.6x)
    assert mismatch(pair.displacement) < 0.7 * before
    assert mismatch(-pair.displacement) > before
    # the largest true displacement in the brain: the requested 8 mm up to forward/inverse differences
    assert 0 < pair.min_jacobian and 7.2 < pair.max_displacement_mm < 8.8
    # landmarks: the true moving positions are the fixed ones moved by the displacement at those voxels
    index = tuple(pair.landmarks_fixed.astype(int).T)
    moved = np.stack([pair.displacement[0, k].numpy()[index] for k in range(3)], axis=1) * pair.geometry.map_scale
    assert np.allclose(pair.landmarks_fixed + moved, pair.landmarks_moving, atol=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_bump_field_inverse(seed):
    g = torch.Generator().manual_seed(seed)
    field = mni_pair._random_bumps(g, torch.zeros(3, dtype=torch.float64), torch.full((3,), 100.0,
                                   dtype=torch.float64), 6, 20.0)
    points = torch.rand((500, 3), generator=g, dtype=torch.float64) * 120 - 10
    field.vectors *= 6.0 / float(field(points).norm(dim=1).max())
    v = field.inverse_displacement(points)
    assert float((points + v + field(points + v) - points).abs().max()) < 1e-4
    assert float(v.abs().max()) > 1.0  # a real deformation, undone


def test_missing_template_gives_one_line_error_and_no_output(tmp_path, monkeypatch, capsys):
    from gradicon_fast import cli

    real_find_spec = importlib.util.find_spec

    def without_nilearn(found):
        return lambda name, *a: found if name == "nilearn" else real_find_spec(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", without_nilearn(None))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == cli.EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nilearn" in err and "--no-deps" in err and "--synthetic" in err
    assert not out.exists()

    # an installed nilearn without the files: the message names them
    empty = types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "nilearn")])
    monkeypatch.setattr(importlib.util, "find_spec", without_nilearn(empty))
    assert cli.main(["demo", "--out", str(out)]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert mni_pair.TEMPLATE_FILES["t1"] in err and not out.exists()


def test_synthetic_demo_writes_figure_and_metrics(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo_cli("--synthetic", "--out", out, "--size", "32", "-q")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "demo.png" in names and "metrics.json" in names and "NOTICE.txt" not in names
    metrics = json.loads((out / "metrics.json").read_text())
    check_improves(metrics, [f"organ {label}" for label in range(1, 6)])


def _pair_on(direction, shape=(20, 24, 28)):
    pair = make_synthetic_pair(shape, 5.0, max_displacement_mm=6.0, num_landmarks=5, seed=0)
    pair.geometry = io.Geometry(shape, (5.0,) * 3, (0.0,) * 3, direction)
    return pair


def test_figure_slices_follow_the_anatomical_axes():
    """Axial slices cut across the index axis that runs superior-inferior, whatever the voxel order,
    and the slice shows the patient's right on the right and superior/anterior at the top."""
    # index axes: 0 -> superior, 1 -> right, 2 -> posterior (LPS direction columns)
    direction = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)
    pair = _pair_on(direction.ravel())
    planes = {p.name: p for p in _planes(pair)}
    assert list(planes) == ["axial", "coronal", "sagittal"]
    assert planes["axial"].normal == 0 and planes["coronal"].normal == 2 and planes["sagittal"].normal == 1
    assert planes["axial"].axes == (1, 2) and planes["axial"].flips == (False, True)
    assert planes["coronal"].axes == (1, 0) and planes["coronal"].flips == (False, False)
    volume = np.zeros(pair.geometry.shape)
    volume[:, -1, :] = 1  # the patient's rightmost voxels
    axial = planes["axial"].cut(volume)
    assert axial.shape == (24, 28) and axial[-1].all() and not axial[:-1].any()
    volume = np.zeros(pair.geometry.shape)
    volume[:, :, 0] = 1  # the most anterior voxels (index 0 of the posterior-running axis)
    assert planes["axial"].cut(volume)[:, -1].all()
    label = _slice_label(pair, planes["axial"])
    assert label.startswith("axial\nz = ") and label.endswith(" mm")


@pytest.mark.parametrize("extra", [[], ["--synthetic"]])
def test_too_small_size_is_refused_before_anything_is_written(tmp_path, capsys, extra):
    from gradicon_fast import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--size", "8", *extra]) == cli.EXIT_INPUT
    assert "--size must be at least 16" in capsys.readouterr().err and not out.exists()
