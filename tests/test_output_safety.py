"""Outputs are crash-safe, and bad inputs get messages that name the real problem.

Every writer (NIfTI, NRRD, MetaImage, HDF5 transform, PNG figure, JSON, checkpoint) is tried on a
really full filesystem (a small tmpfs filled to the last block: needs root, skipped otherwise) and
with injected faults (always run): a late ENOSPC, and a short write the writer does not report (what
ITK's NIfTI writer does on a full disk). Each must fail with one line naming the file and the cause,
and leave no file behind: no temporary file, no truncated target.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gradicon_fast import cli, io
from gradicon_fast import functional as gfn
from gradicon_fast import reference
from gradicon_fast.demo import make_synthetic_pair, save_figure
from gradicon_fast.io.output import write_json
from gradicon_fast.train.checkpoint import atomic_save, load_checkpoint_file

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# The writers, each given something large enough not to fit in a few pages
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def writers():
    rng = np.random.default_rng(0)
    geometry = io.Geometry((24, 24, 24), (1.0, 1.2, 1.5), (10.0, -5.0, 3.0), tuple(np.eye(3).ravel()))
    image = io.Image(rng.random(geometry.shape).astype(np.float32), geometry)
    field = io.DisplacementField(rng.normal(size=(*geometry.shape, 3)), geometry)
    pair = make_synthetic_pair((32, 32), 4.0, max_displacement_mm=8.0, seed=0)
    phi = reference.identity_map((32, 32))
    figure_args = (pair, pair.moving, phi, gfn.jacobian_determinant(phi))
    return {
        "image.nii.gz": lambda p: io.write_image(p, image),
        "image.nii": lambda p: io.write_image(p, image),
        "image.nrrd": lambda p: io.write_image(p, image),
        "image.mha": lambda p: io.write_image(p, image),
        "transform.nii.gz": lambda p: io.write_displacement_field(p, field),
        "transform.h5": lambda p: io.write_displacement_field(p, field),
        "figure.png": lambda p: save_figure(str(p), *figure_args, title="test"),
        "metrics.json": lambda p: write_json(p, {"values": rng.random(4000).tolist()}),
        "checkpoint.pt": lambda p: atomic_save({"weights": torch.randn(20000)}, p),
    }


FILES = ["image.nii.gz", "image.nii", "image.nrrd", "image.mha", "transform.nii.gz", "transform.h5", "figure.png",
         "metrics.json", "checkpoint.pt"]


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ------------------------------------------------------------------------------------------------
# A really full filesystem
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs whose every block is taken by ``filler``; unmounted afterwards."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.strip() or proc.returncode}")
    try:
        fd = os.open(mount_point / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError) as full:
                while os.write(fd, b"\0" * 4096):
                    pass
            assert full.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("name", FILES)
def test_full_disk_fails_cleanly(name, writers, full_disk, capfd):
    target = full_disk / name
    with pytest.raises(io.OutputError) as failure:
        writers[name](target)
    message = str(failure.value)
    assert f"cannot write {name.split('.')[0]}" in message or "cannot write output" in message, message
    assert f"{str(target)!r}: No space left on device" in message, message
    assert sorted(os.listdir(full_disk)) == ["filler"]  # no temporary file, no truncated target
    assert capfd.readouterr().err == ""  # HDF5's and ITK's diagnostics are held back


def _pair_files(folder: Path, shape=(32, 32)):
    pair = make_synthetic_pair(shape, 4.0, max_displacement_mm=8.0, seed=1)
    for name in ("fixed", "moving"):
        io.write_image(folder / f"{name}.nii.gz", pair.image(name))
    return folder / "fixed.nii.gz", folder / "moving.nii.gz"


FAST = ["--iterations", "2", "2", "2", "-q", "--threads", "1"]


def test_register_on_a_full_disk_exits_non_zero_and_writes_nothing(tmp_path, full_disk, capfd):
    fixed, moving = _pair_files(tmp_path)
    status = cli.main(["register", "--fixed", str(fixed), "--moving", str(moving), "--warped-out",
                       str(full_disk / "warped.nii.gz"), "--transform-out", str(full_disk / "transform.h5"), *FAST])
    line = one_line(capfd.readouterr().err)
    assert status == cli.EXIT_INPUT
    assert f"cannot write --warped-out file {str(full_disk / 'warped.nii.gz')!r}: No space left on device" in line, line
    assert sorted(os.listdir(full_disk)) == ["filler"]


def test_warp_on_a_full_disk_exits_non_zero_and_writes_nothing(tmp_path, full_disk, capfd):
    fixed, moving = _pair_files(tmp_path)
    geometry = io.read_image(fixed).geometry
    io.write_displacement_field(tmp_path / "t.nii.gz", io.DisplacementField(np.zeros((*geometry.shape, 2)), geometry))
    status = cli.main(["warp", "--moving", str(moving), "--transform", str(tmp_path / "t.nii.gz"), "--reference",
                       str(fixed), "--out", str(full_disk / "w.nrrd"), "-q"])
    line = one_line(capfd.readouterr().err)
    assert status == cli.EXIT_INPUT
    assert f"cannot write --out file {str(full_disk / 'w.nrrd')!r}: No space left on device" in line, line
    assert sorted(os.listdir(full_disk)) == ["filler"]


# ------------------------------------------------------------------------------------------------
# Injected faults (no mount needed)
# ------------------------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("name", FILES)
def test_late_enospc_fails_cleanly(name, writers, tmp_path, monkeypatch):
    """The disk fills while the file is flushed (fsync is where NFS and quotas report it)."""
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(io.OutputError) as failure:
        writers[name](tmp_path / name)
    assert str(failure.value) .endswith(f"{str(tmp_path / name)!r}: No space left on device"), failure.value
    assert os.listdir(tmp_path) == []


def _cut_in_half(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _short_writes(monkeypatch) -> None:
    """Every writer the package uses stops half-way through its file and says nothing."""
    import matplotlib.figure

    def after(write, path_of):
        def wrapped(*args, **kwargs):
            result = write(*args, **kwargs)
            _cut_in_half(path_of(*args))
            return result
        return wrapped

    monkeypatch.setattr(sitk, "WriteImage", after(sitk.WriteImage, lambda img, path, *a: path))
    monkeypatch.setattr(sitk, "WriteTransform", after(sitk.WriteTransform, lambda tx, path, *a: path))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        after(matplotlib.figure.Figure.savefig, lambda fig, path, *a: path))
    monkeypatch.setattr(torch, "save", after(torch.save, lambda obj, path, *a: path))
    monkeypatch.setattr(json, "dump", lambda obj, f, **kw: f.write(json.dumps(obj, **kw)[:100]))


@pytest.mark.parametrize("name", FILES)
def test_unreported_short_write_is_caught(name, writers, tmp_path, monkeypatch, capfd):
    _short_writes(monkeypatch)
    with pytest.raises(io.OutputError) as failure:
        writers[name](tmp_path / name)
    message = one_line(str(failure.value))
    assert message.startswith("cannot write ") and repr(str(tmp_path / name)) in message
    assert "incomplete" in message, message
    assert os.listdir(tmp_path) == []
    assert capfd.readouterr().err == ""


def test_failed_overwrite_keeps_the_previous_file(writers, tmp_path, monkeypatch):
    target = tmp_path / "image.nii.gz"
    target.write_bytes(b"previous result")
    _short_writes(monkeypatch)
    with pytest.raises(io.OutputError):
        writers["image.nii.gz"](target)
    assert target.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["image.nii.gz"]


def test_register_outputs_are_all_or_nothing(tmp_path, monkeypatch, capfd):
    """The warped image is written and checked first; when the transform then fails, it is not left
    behind claiming success."""
    fixed, moving = _pair_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()

    def hdf5_fails(*args):
        os.write(2, b"HDF5-DIAG: Error detected in HDF5 (1.14.0) thread 0:\n  #000: H5F.c line 1 ...\n" * 20)
        raise RuntimeError("Exception thrown in SimpleITK WriteTransform: itkHDF5TransformIO.cxx:462:\n"
                           "ITK ERROR: HDF5TransformIOTemplate(0x1): H5Fcreate failed")

    monkeypatch.setattr(sitk, "WriteTransform", hdf5_fails)
    status = cli.main(["register", "--fixed", str(fixed), "--moving", str(moving), "--warped-out",
                       str(out / "warped.nii.gz"), "--transform-out", str(out / "transform.h5"), *FAST])
    captured = capfd.readouterr()
    line = one_line(captured.err)
    assert status == cli.EXIT_INPUT
    assert f"cannot write --transform-out file {str(out / 'transform.h5')!r}: H5Fcreate failed" in line, line
    assert "HDF5-DIAG" not in captured.out + captured.err
    assert os.listdir(out) == []


def test_output_group_commits_together(tmp_path):
    with io.output_group():
        write_json(tmp_path / "a.json", [1])
        write_json(tmp_path / "b.json", [2])
        assert os.listdir(tmp_path) != [] and not (tmp_path / "a.json").exists()  # staged, not yet renamed
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]
    with pytest.raises(KeyError):
        with io.output_group():
            write_json(tmp_path / "c.json", [3])
            raise KeyError("something else went wrong")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]


def test_diagnostics_of_a_successful_write_are_not_swallowed(tmp_path, capfd):
    with io.atomic_output(tmp_path / "x.txt") as tmp:
        os.write(2, b"a warning from a native library\n")
        Path(tmp).write_text("content")
    assert capfd.readouterr().err == "a warning from a native library\n"
    assert (tmp_path / "x.txt").read_text() == "content"


# ------------------------------------------------------------------------------------------------
# Permissions follow the umask
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("name", FILES)
def test_outputs_respect_the_umask(name, umask, mode, writers, tmp_path):
    previous = os.umask(umask)
    try:
        writers[name](tmp_path / name)
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / name).st_mode & 0o777 == mode


# ------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------


def test_register_without_an_output_is_a_usage_error_before_any_work(tmp_path, capfd):
    status = cli.main(["register", "--fixed", str(tmp_path / "absent.nii.gz"), "--moving",
                       str(tmp_path / "absent.nii.gz")])
    line = one_line(capfd.readouterr().err)
    assert status == cli.EXIT_USAGE
    assert "no output requested" in line and "--warped-out" in line and "--transform-out" in line


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_nan_and_inf_voxels_are_read_as_such(suffix, tmp_path):
    """ITK's NIfTI reader turns them into 0; read_image puts them back so that they can be reported."""
    import nibabel as nib

    array = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    array[1, 2, 3], array[4, 5, 6], array[0, 0, 0] = np.nan, np.inf, -np.inf
    path = tmp_path / f"image{suffix}"
    if suffix == ".nrrd":
        io.write_image(path, io.Image(array, io.Geometry.isotropic(array.shape)))
    else:
        nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    read = io.read_image(path).array
    np.testing.assert_array_equal(read, array)


def _nan_image(folder: Path) -> Path:
    fixed, _ = _pair_files(folder)
    image = io.read_image(fixed)
    image.array[3:5, 3:5] = np.nan
    io.write_image(folder / "nan.nii.gz", image)
    return folder / "nan.nii.gz"


def test_nan_image_is_its_own_error(tmp_path, capfd):
    nan = _nan_image(tmp_path)
    status = cli.main(["register", "--fixed", str(tmp_path / "moving.nii.gz"), "--moving", str(nan),
                       "--warped-out", str(tmp_path / "w.nii.gz"), *FAST])
    line = one_line(capfd.readouterr().err)
    assert status == cli.EXIT_INPUT
    assert f"moving image {str(nan)!r} has 4 NaN or infinite voxel(s)" in line and "--nan-value" in line, line
    assert "constant" not in line
    assert not (tmp_path / "w.nii.gz").exists()


def test_nan_value_replaces_them(tmp_path, capfd):
    nan = _nan_image(tmp_path)
    status = cli.main(["register", "--fixed", str(nan), "--moving", str(tmp_path / "moving.nii.gz"),
                       "--nan-value", "0", "--warped-out", str(tmp_path / "w.nii.gz"), "--iterations", "2", "2", "2",
                       "--threads", "1"])
    captured = capfd.readouterr()
    assert status == 0, captured.err
    assert "fixed image: 4 NaN/infinite voxel(s) set to 0 (--nan-value)" in captured.out
    assert np.isfinite(io.read_image(tmp_path / "w.nii.gz").array).all()


def test_library_names_the_nan_image():
    image = io.Image(np.full((8, 8), np.nan, np.float32), io.Geometry.isotropic((8, 8)), path="scan.nii.gz")
    with pytest.raises(io.InputError, match=r"fixed image 'scan.nii.gz' has 64 NaN or infinite voxel\(s\) of 64"):
        io.check_finite(image, "fixed image")
    replaced, count = io.replace_nonfinite(image, -1.0)
    assert count == 64 and (replaced.array == -1).all() and np.isnan(image.array).all()


def _damaged_checkpoints(folder: Path) -> dict:
    atomic_save({"weights": torch.randn(1000)}, folder / "good.pt")
    good = (folder / "good.pt").read_bytes()
    files = {"truncated": good[: len(good) // 2], "random": np.random.default_rng(0).bytes(1000),
             "pickle cut short": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94K\x01"}
    for name, data in files.items():
        (folder / f"{name}.pt").write_bytes(data)
    return {name: folder / f"{name}.pt" for name in files}


def test_damaged_checkpoint_is_one_clear_line(tmp_path):
    for name, path in _damaged_checkpoints(tmp_path).items():
        with pytest.raises(io.InputError) as failure:
            load_checkpoint_file(path)
        assert str(failure.value) == (f"checkpoint {str(path)!r} is not a readable checkpoint (damaged or truncated, "
                                      f"or not a file saved by gradicon_fast)"), name


def test_damaged_model_file_through_the_cli(tmp_path, capfd):
    fixed, moving = _pair_files(tmp_path)
    path = _damaged_checkpoints(tmp_path)["truncated"]
    status = cli.main(["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(path),
                       "--warped-out", str(tmp_path / "w.nii.gz"), "-q"])
    line = one_line(capfd.readouterr().err)
    assert status == cli.EXIT_INPUT
    assert repr(str(path)) in line and "not a readable checkpoint" in line, line
    assert "Memo" not in line and "PytorchStreamReader" not in line
    assert not (tmp_path / "w.nii.gz").exists()


def test_the_cli_reports_an_output_failure_in_a_subprocess(tmp_path, full_disk):
    """As a user runs it: one line on stderr (no HDF5 diagnostics), exit status 1."""
    fixed, moving = _pair_files(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "gradicon_fast", "register", "--fixed", str(fixed), "--moving",
                           str(moving), "--transform-out", str(full_disk / "t.h5"), *FAST],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"{str(full_disk / 't.h5')!r}: No space left on device" in one_line(proc.stderr)
    assert sorted(os.listdir(full_disk)) == ["filler"]


# ------------------------------------------------------------------------------------------------
# A file size limit: the native writers fail for real, without root
# ------------------------------------------------------------------------------------------------

LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
sys.argv = ["gradicon-fast"] + sys.argv[1:]
runpy.run_module("gradicon_fast", run_name="__main__")
"""


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("volumes")
    pair = make_synthetic_pair((40, 40, 40), 4.0, max_displacement_mm=8.0, seed=1)
    for name in ("fixed", "moving"):
        io.write_image(folder / f"{name}.nii.gz", pair.image(name))
    io.write_displacement_field(folder / "identity.nii.gz",
                                io.DisplacementField(np.zeros((40, 40, 40, 3)), pair.geometry))
    return folder


@pytest.mark.parametrize("output", ["w.nii.gz", "w.nii", "w.nrrd", "w.mha", "t.h5"])
def test_file_size_limit_gives_one_line_and_status_1(output, volumes, tmp_path):
    """ITK's NIfTI writer stops at the limit without an error, HDF5 prints pages of diagnostics and
    crashes at exit: the command line still reports one line, exits with 1 and leaves nothing."""
    out = tmp_path / "out"
    out.mkdir()
    if output.endswith(".h5"):
        args = ["register", "--fixed", volumes / "fixed.nii.gz", "--moving", volumes / "moving.nii.gz",
                "--transform-out", out / output, "--iterations", "2", "2", "2", "-q"]
    else:
        args = ["warp", "--moving", volumes / "moving.nii.gz", "--transform", volumes / "identity.nii.gz",
                "--reference", volumes / "fixed.nii.gz", "--out", out / output, "-q"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", LIMITED, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert one_line(proc.stderr).endswith(f"{str(out / output)!r}: File too large"), proc.stderr
    assert os.listdir(out) == []


# ------------------------------------------------------------------------------------------------
# The training log
# ------------------------------------------------------------------------------------------------


def _tiny_trainer(out):
    import gradicon_fast.nn as gnn
    from gradicon_fast.data import SyntheticPairDataset
    from gradicon_fast.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model = gnn.standard_network((16, 16), steps=3, width=0.25)
    config = TrainConfig(steps=2, batch_size=1, progress=False, tensorboard=False, seed=0)
    return Trainer(model, SyntheticPairDataset(4, (16, 16), seed=0), out, config)


def test_resumed_log_drops_a_torn_row(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    header = "step,total,similarity,regularization,fold_percentage,lr,seconds\n"
    (tmp_path / "log.csv").write_text(header + "1,1,1,0,0,0.001,0.1\n2,1,1,0,0,0.001,0.1\n3,0.9,0.8")
    trainer.step = 3  # resumed from checkpoint 3; the crash tore step 3's row
    trainer._open_logs()
    trainer._close_logs()
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows == [header.strip(), "1,1,1,0,0,0.001,0.1", "2,1,1,0,0,0.001,0.1"]


def test_training_log_on_a_full_disk_is_one_line(tmp_path):
    trainer = _tiny_trainer(tmp_path)
    trainer._open_logs()
    try:
        trainer._csv_file.flush = _no_space
        with pytest.raises(io.OutputError, match=r"cannot write training log '.*log\.csv': No space left on device"):
            trainer._log({"step": 1, "total": 1, "similarity": 1, "regularization": 0, "fold_percentage": 0,
                          "lr": 0.001, "seconds": 0.1})
    finally:
        del trainer._csv_file.flush
        trainer._close_logs()


def test_resume_from_a_damaged_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    damaged = tmp_path / "checkpoints" / "checkpoint_00000002.pt"
    damaged.write_bytes(_damaged_checkpoints(tmp_path)["truncated"].read_bytes())
    with pytest.raises(io.InputError, match=rf"checkpoint '{damaged}' is not a readable checkpoint"):
        _tiny_trainer(tmp_path)
