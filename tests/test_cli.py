"""The command line, run as users run it: ``python -m gradicon_fast ...`` in a subprocess.

Small NIfTI/NRRD files are written in tmp_path; every bad input must give a one-line error on
stderr, a non-zero exit status and no output file.
"""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from gradicon_fast import io
from gradicon_fast.demo import dice, make_synthetic_pair

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems on shared cores

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--iterations", "40", "30", "15", "--max-size", "32", "-q"]
DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def run_cli(*args, cwd=None, timeout=300):
    # one thread: these problems are tiny and the test machine's cores are shared (OpenMP stalls otherwise)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gradicon_fast", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


class InProcess:
    """``gradicon_fast.cli.main`` called in this process (for the many cheap cases), shaped like a
    CompletedProcess."""

    def __init__(self, capsys, *args):
        from gradicon_fast import cli

        try:
            self.returncode = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse
            self.returncode = e.code
        captured = capsys.readouterr()
        self.stdout, self.stderr = captured.out, captured.err


def one_line_error(proc, *phrases, status=None):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if status is not None:
        assert proc.returncode == status
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """A small synthetic 3D pair (fixed NIfTI, moving NRRD) on a permuted/flipped grid, with labels and masks."""
    folder = tmp_path_factory.mktemp("pair")
    pair = make_synthetic_pair((32, 32, 32), 6.0, max_displacement_mm=15.0, num_landmarks=50, seed=3)
    g = io.Geometry(pair.geometry.shape, (6.0, 5.5, 6.5), (100.0, -50.0, 20.0), DIRECTION)
    files = {}
    for name, suffix in (("fixed", ".nii.gz"), ("moving", ".nrrd"), ("fixed_labels", ".nii.gz"),
                         ("moving_labels", ".nii.gz")):
        image = pair.image(name)
        files[name] = folder / f"{name}{suffix}"
        io.write_image(files[name], io.Image(image.array, g))
    mask = (pair.fixed_labels[0, 0].numpy() >= 0).astype(np.uint8)
    files["fixed_mask"] = folder / "fixed_mask.nii.gz"
    io.write_image(files["fixed_mask"], io.Image(mask, g))
    files["empty_mask"] = folder / "empty_mask.nii.gz"
    io.write_image(files["empty_mask"], io.Image(np.zeros_like(mask), g))
    files["small_mask"] = folder / "small_mask.nii.gz"
    io.write_image(files["small_mask"], io.Image(np.ones((8, 8, 8), np.uint8), io.Geometry.isotropic((8, 8, 8))))
    files["image2d"] = folder / "image2d.nii.gz"
    io.write_image(files["image2d"], io.Image(np.random.default_rng(0).random((32, 32)).astype(np.float32),
                                              io.Geometry.isotropic((32, 32))))
    files["garbage"] = folder / "garbage.nii.gz"
    files["garbage"].write_bytes(b"\x1f\x8b this is not a NIfTI file")
    return files


@pytest.fixture(scope="module")
def registered(pair_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("registered")
    proc = run_cli("register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                   "--warped-out", out / "warped.nii.gz", "--transform-out", out / "transform.nii.gz",
                   "--inverse-transform-out", out / "inverse.h5", *FAST)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def files_in(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# ------------------------------------------------------------------------------------------------
# Help and normal runs
# ------------------------------------------------------------------------------------------------


def test_help_of_every_subcommand(capsys):
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("register", "warp", "jacobian", "train", "demo", "bench"):
        assert command in top.stdout
    for command in ("register", "warp", "jacobian", "train", "demo"):
        proc = InProcess(capsys, command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: gradicon-fast {command}")
    assert "--io-iterations" in InProcess(capsys, "register", "--help").stdout


def test_register_writes_outputs_on_the_fixed_grid(pair_files, registered):
    out, proc = registered
    assert "folds:" in proc.stdout
    assert files_in(out) == ["inverse.h5", "transform.nii.gz", "warped.nii.gz"]
    fixed = io.read_image(pair_files["fixed"])
    warped = io.read_image(out / "warped.nii.gz")
    assert warped.geometry.same_grid(fixed.geometry)
    moving_on_fixed = io.read_image(pair_files["moving"]).array  # same grid in this test
    before = np.mean((moving_on_fixed - fixed.array) ** 2)
    after = np.mean((warped.array - fixed.array) ** 2)
    assert after < 0.5 * before, (before, after)
    n = nib.load(out / "transform.nii.gz")
    assert n.shape == (*fixed.shape, 1, 3) and int(n.header["intent_code"]) == 1007
    # the ITK transform file holds the inverse on the moving image's grid
    tx = io.read_transform(out / "inverse.h5")
    assert isinstance(tx, sitk.DisplacementFieldTransform)


def test_exported_transform_is_what_sitk_applies(pair_files, registered):
    out, _ = registered
    fixed = sitk.ReadImage(str(pair_files["fixed"]))
    moving = sitk.Cast(sitk.ReadImage(str(pair_files["moving"])), sitk.sitkFloat32)
    field = sitk.ReadImage(str(out / "transform.nii.gz"))
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    theirs = np.transpose(sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, -1.0)))
    ours = io.read_image(out / "warped.nii.gz").array
    inside = theirs != -1.0
    assert inside.mean() > 0.9
    assert np.abs(theirs - ours)[inside].max() < 1e-3


def test_warp_reads_back_our_transforms(pair_files, registered, tmp_path, capsys):
    out, _ = registered
    proc = run_cli("warp", "--moving", pair_files["moving"], "--transform", out / "transform.nii.gz",
                   "--reference", pair_files["fixed"], "--out", tmp_path / "w.nrrd", "-q")
    assert proc.returncode == 0, proc.stderr
    again = io.read_image(tmp_path / "w.nrrd")
    assert np.allclose(again.array, io.read_image(out / "warped.nii.gz").array, atol=1e-4)

    proc = InProcess(capsys, "warp", "--moving", pair_files["moving_labels"], "--transform", out / "transform.nii.gz",
                     "--reference", pair_files["fixed"], "--out", tmp_path / "labels.nii.gz", "--nearest", "-q")
    assert proc.returncode == 0, proc.stderr
    warped_labels = io.read_image(tmp_path / "labels.nii.gz", dtype=None).array
    assert np.issubdtype(warped_labels.dtype, np.integer)
    fixed_labels = io.read_image(pair_files["fixed_labels"], dtype=None).array
    moving_labels = io.read_image(pair_files["moving_labels"], dtype=None).array
    import torch

    before = dice(torch.as_tensor(moving_labels), torch.as_tensor(fixed_labels), 5)
    after = dice(torch.as_tensor(warped_labels), torch.as_tensor(fixed_labels), 5)
    assert after > before + 0.05, (before, after)

    # the inverse (.h5, on the moving grid) brings the fixed image back onto the moving grid
    proc = run_cli("warp", "--moving", pair_files["fixed"], "--transform", out / "inverse.h5",
                   "--reference", pair_files["moving"], "--out", tmp_path / "back.mha", "-q")
    assert proc.returncode == 0, proc.stderr
    back = io.read_image(tmp_path / "back.mha").array
    moving = io.read_image(pair_files["moving"]).array
    fixed = io.read_image(pair_files["fixed"]).array
    assert np.mean((back - moving) ** 2) < 0.5 * np.mean((fixed - moving) ** 2)


def test_jacobian_reports_folds_and_writes_the_determinant(registered, tmp_path, capsys):
    out, _ = registered
    for transform in ("transform.nii.gz", "inverse.h5"):
        args = ("jacobian", "--transform", out / transform, "--out", tmp_path / "jac.nii.gz", "-q")
        proc = run_cli(*args) if transform.endswith(".nii.gz") else InProcess(capsys, *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("folds:")
        percent = float(proc.stdout.split()[1])
        assert 0 <= percent < 1
        jac = io.read_image(tmp_path / "jac.nii.gz")
        assert jac.shape == (31, 31, 31)
        assert 0.2 < float(np.median(jac.array)) < 5


def test_register_with_masks_and_explicit_intensity(pair_files, tmp_path):
    proc = run_cli("register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                   "--fixed-mask", pair_files["fixed_mask"], "--intensity", "minmax",
                   "--transform-out", tmp_path / "t.mha", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert files_in(tmp_path) == ["t.mha"]


def test_bench_delegates_to_the_benchmark_runner(tmp_path, monkeypatch, capsys):
    from gradicon_fast import cli

    monkeypatch.setattr(cli, "_benchmark_root", lambda: None)
    assert cli.main(["bench"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "benchmarks/__main__.py" in err[0]
    if not (ROOT / "benchmarks" / "__main__.py").is_file():
        pytest.skip("the benchmark runner is not in this checkout")
    proc = run_cli("bench", "--help", cwd=tmp_path)  # found through the source checkout
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero status, no output left behind
# ------------------------------------------------------------------------------------------------

BAD_REGISTER = {
    "missing_fixed": (lambda f: ["--fixed", f["fixed"].parent / "nope.nii.gz", "--moving", f["moving"]],
                      ["fixed image", "does not exist"]),
    "unreadable_moving": (lambda f: ["--fixed", f["fixed"], "--moving", f["garbage"]],
                          ["cannot read moving image", "garbage.nii.gz"]),
    "2d_against_3d": (lambda f: ["--fixed", f["fixed"], "--moving", f["image2d"]], ["3D", "2D"]),
    "empty_mask": (lambda f: ["--fixed", f["fixed"], "--moving", f["moving"], "--fixed-mask", f["empty_mask"]],
                   ["fixed mask", "empty"]),
    "mismatched_mask": (lambda f: ["--fixed", f["fixed"], "--moving", f["moving"], "--moving-mask", f["small_mask"]],
                        ["moving mask", "shape"]),
}


@pytest.mark.parametrize("case", sorted(BAD_REGISTER))
def test_register_bad_input(case, pair_files, tmp_path):
    make_args, phrases = BAD_REGISTER[case]
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("register", *make_args(pair_files), "--warped-out", out / "w.nii.gz",
                   "--transform-out", out / "t.nii.gz", "-q")
    one_line_error(proc, *phrases, status=1)
    assert files_in(out) == []


def test_unknown_option_and_missing_arguments(pair_files, tmp_path, capsys):
    line = one_line_error(run_cli("register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                                  "--frobnicate", "3"), "--frobnicate", status=2)
    assert "unrecognized arguments" in line
    one_line_error(InProcess(capsys, "warp", "--moving", pair_files["moving"]), "required", status=2)
    one_line_error(InProcess(capsys, "no-such-command"), "invalid choice", status=2)
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(InProcess(capsys, "register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                             "--io-iterations", "5", "--warped-out", out / "w.nii.gz"), "--model", status=2)
    one_line_error(InProcess(capsys, "register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                             "--iterations", "5", "--warped-out", out / "w.nii.gz"), "--iterations", status=2)
    one_line_error(InProcess(capsys, "register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"]),
                   "no output requested", status=2)
    one_line_error(InProcess(capsys, "register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                             "--model", pair_files["garbage"], "--warped-out", out / "w.nii.gz"),
                   "model checkpoint", status=1)
    assert files_in(out) == []


def test_bad_output_paths_fail_before_registering(pair_files, tmp_path, capsys):
    proc = InProcess(capsys, "register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                   "--warped-out", tmp_path / "w.png")
    one_line_error(proc, "unsupported file type", "--warped-out")
    proc = InProcess(capsys, "register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                   "--transform-out", tmp_path / "missing_dir" / "t.nii.gz")
    one_line_error(proc, "does not exist")
    assert files_in(tmp_path) == []


def test_warp_and_jacobian_bad_input(pair_files, registered, tmp_path, capsys):
    out, _ = registered
    proc = run_cli("warp", "--moving", pair_files["moving"], "--transform", tmp_path / "none.nii.gz",
                   "--reference", pair_files["fixed"], "--out", tmp_path / "w.nii.gz")
    one_line_error(proc, "transform", "does not exist")
    proc = InProcess(capsys, "warp", "--moving", pair_files["image2d"], "--transform", out / "transform.nii.gz",
                   "--reference", pair_files["fixed"], "--out", tmp_path / "w.nii.gz")
    one_line_error(proc, "2D", "3D")
    proc = InProcess(capsys, "jacobian", "--transform", pair_files["fixed"], "--out", tmp_path / "j.nii.gz")
    one_line_error(proc, "not a displacement field")
    proc = InProcess(capsys, "jacobian", "--transform", pair_files["garbage"])
    one_line_error(proc, "cannot read transform")
    assert files_in(tmp_path) == []


def test_train_bad_input(tmp_path, capsys):
    one_line_error(run_cli("train", "--config", "lung"), "--data", status=2)
    one_line_error(InProcess(capsys, "train", "--config", "brain", "--data", tmp_path / "nowhere"), "not a folder")
    (tmp_path / "empty").mkdir()
    one_line_error(InProcess(capsys, "train", "--config", "knee", "--data", tmp_path / "empty"), "no volumes")
    one_line_error(InProcess(capsys, "train", "--config", "liver", "--data", tmp_path), "invalid choice", status=2)


# ------------------------------------------------------------------------------------------------
# The network layer: register --model (instance optimisation) and train
# ------------------------------------------------------------------------------------------------


def test_register_with_a_model_checkpoint(pair_files, tmp_path):
    nn = pytest.importorskip("gradicon_fast.nn")
    model = nn.standard_network((24, 24, 24), width=0.125)
    nn.save_model(model, tmp_path / "model.pt")
    proc = run_cli("register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                   "--model", tmp_path / "model.pt", "--io-iterations", "3",
                   "--transform-out", tmp_path / "t.h5", "--warped-out", tmp_path / "w.nii.gz", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "network + 3 instance-optimisation steps" in proc.stdout
    field = io.read_displacement_field(tmp_path / "t.h5")
    assert field.geometry.same_grid(io.read_image(pair_files["fixed"]).geometry)
    assert np.isfinite(field.vectors).all()


def test_train_delegates_to_the_network_layer(tmp_path, capsys):
    pytest.importorskip("gradicon_fast.train")
    proc = InProcess(capsys, "train", "--config", "synthetic2d", "--shape", "32", "32", "--width", "0.125",
                     "--pairs", "4", "--steps-stage1", "2", "--steps-stage2", "1", "--out", tmp_path / "run",
                     "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "stage2" / "model.pt").is_file()
    # the trained model registers 2D images through the command line's model path
    nn = pytest.importorskip("gradicon_fast.nn")
    assert nn.load_model(tmp_path / "run" / "stage2" / "model.pt").input_shape == (32, 32)


def test_register_and_warp_2d(tmp_path, capsys):
    pair = make_synthetic_pair((64, 48), 4.0, max_displacement_mm=10.0, num_landmarks=50, seed=7)
    g = io.Geometry((64, 48), (4.0, 3.5), (-20.0, 10.0), (0.0, -1.0, 1.0, 0.0))
    for name in ("fixed", "moving", "moving_labels"):
        io.write_image(tmp_path / f"{name}.nrrd", io.Image(pair.image(name).array, g))
    proc = InProcess(capsys, "register", "--fixed", tmp_path / "fixed.nrrd", "--moving", tmp_path / "moving.nrrd",
                     "--transform-out", tmp_path / "t.nii.gz", "--warped-out", tmp_path / "w.nrrd", "-q")
    assert proc.returncode == 0, proc.stderr
    proc = InProcess(capsys, "warp", "--moving", tmp_path / "moving_labels.nrrd", "--transform", tmp_path / "t.nii.gz",
                     "--reference", tmp_path / "fixed.nrrd", "--out", tmp_path / "l.nrrd", "--nearest", "-q")
    assert proc.returncode == 0, proc.stderr
    import torch

    labels = torch.as_tensor(io.read_image(tmp_path / "l.nrrd", dtype=None).array.astype(np.int64))
    fixed_labels = torch.as_tensor(pair.image("fixed_labels").array.astype(np.int64))
    moving_labels = torch.as_tensor(pair.image("moving_labels").array.astype(np.int64))
    assert dice(labels, fixed_labels, 5) > dice(moving_labels, fixed_labels, 5)
    proc = InProcess(capsys, "jacobian", "--transform", tmp_path / "t.nii.gz")
    assert proc.returncode == 0 and proc.stdout.startswith("folds: 0.0000 %")
