"""Volume datasets (NIfTI / NRRD), intensity presets, resizing, pair lists, synthetic pairs."""

import numpy as np
import pytest
import torch

from gradicon_fast.data import (SyntheticPairDataset, VolumePairDataset, default_subject, load_volume, normalize,
                                read_volume, resize, synthetic_pair)

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")


def write_nifti(path, array, spacing=(1.0, 1.0, 1.0)):
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))


def write_nrrd(path, array, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array)))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def test_nifti_and_nrrd_read_in_the_same_index_order(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(7, 5, 4)).astype(np.float32)
    write_nifti(tmp_path / "a.nii.gz", array, (2.0, 1.5, 3.0))
    write_nrrd(tmp_path / "a.nrrd", array, (2.0, 1.5, 3.0))
    from gradicon_fast.data.volumes import _read_private  # the fallback when gradicon_fast.io is absent

    for reader in (read_volume, _read_private):
        for name in ("a.nii.gz", "a.nrrd"):
            data, spacing = reader(tmp_path / name)
            assert data.shape == (7, 5, 4)
            assert np.allclose(data, array, atol=1e-6)
            assert np.allclose(spacing, (2.0, 1.5, 3.0))


def test_presets():
    hu = torch.tensor([[-2000.0, -1000.0, -500.0], [0.0, 300.0, -250.0]])
    out = normalize(hu, "lung_ct")
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.5], [1.0, 1.0, 0.75]]))
    mask = np.array([[1, 1, 1], [0, 1, 1]])
    assert torch.allclose(normalize(hu, "lung_ct", mask=mask), out * torch.as_tensor(mask).float())
    x = torch.arange(1000.0)
    mri = normalize(x, "mri")
    assert mri.min() == 0 and mri.max() == 1
    lo, hi = np.percentile(np.arange(1000.0), [0.5, 99.5])
    assert mri[500] == pytest.approx((500 - lo) / (hi - lo), rel=1e-5)
    assert torch.allclose(normalize(x, "mri", percentiles=(0, 100)), x / 999)
    assert torch.equal(normalize(x, "none"), x)
    with pytest.raises(ValueError):
        normalize(x, "bogus")


def test_resize_keeps_corner_voxels_and_labels():
    x = torch.rand(9, 7, 5)
    y = resize(x, (17, 13, 9))
    assert y.shape == (17, 13, 9)
    for corner in [(0, 0, 0), (-1, -1, -1), (0, -1, 0), (-1, 0, -1)]:
        assert y[corner] == pytest.approx(float(x[corner]), abs=1e-6)  # align-corners
    labels = torch.randint(0, 5, (1, 9, 7, 5))
    r = resize(labels, (4, 3, 2), labels=True)
    assert r.dtype == torch.int64 and r.shape == (1, 4, 3, 2)
    assert set(r.unique().tolist()) <= set(labels.unique().tolist())
    assert r[0, 0, 0, 0] == labels[0, 0, 0, 0] and r[0, -1, -1, -1] == labels[0, -1, -1, -1]


def _make_folder(tmp_path):
    rng = np.random.default_rng(1)
    names = ["case01_insp", "case01_exp", "case02_insp", "case02_exp", "case03_insp"]
    masks = tmp_path / "masks"
    labels = tmp_path / "labels"
    masks.mkdir()
    labels.mkdir()
    for i, name in enumerate(names):
        array = rng.uniform(-1200, 200, size=(10, 8, 6)).astype(np.float32)
        suffix = ".nrrd" if i == 4 else ".nii.gz"
        (write_nrrd if suffix == ".nrrd" else write_nifti)(tmp_path / f"{name}{suffix}", array)
        mask = np.zeros((10, 8, 6), np.uint8)
        mask[2:8, 2:6, 1:5] = 1
        write_nifti(masks / f"{name}{suffix}", mask) if suffix == ".nii.gz" else write_nrrd(masks / f"{name}{suffix}", mask)
        lab = (mask * (1 + (np.arange(10) >= 5)[:, None, None])).astype(np.uint8)
        write_nifti(labels / f"{name}{suffix}", lab) if suffix == ".nii.gz" else write_nrrd(labels / f"{name}{suffix}", lab)
    return names


def test_volume_pair_dataset(tmp_path):
    _make_folder(tmp_path)
    assert default_subject(tmp_path / "case01_insp.nii.gz") == "case01"
    intra = VolumePairDataset(tmp_path, (8, 8, 8), preset="lung_ct", pairs="intra", masks=tmp_path / "masks",
                              labels=tmp_path / "labels", cache=True)
    assert len(intra.paths) == 5
    assert len(intra) == 4  # case01 and case02, both orders; case03 has one volume
    item = intra[0]
    assert item["image_A"].shape == (1, 8, 8, 8) and item["image_A"].dtype == torch.float32
    assert 0 <= item["image_A"].min() and item["image_A"].max() <= 1
    assert default_subject(intra.paths[item["index_A"]]) == default_subject(intra.paths[item["index_B"]])
    assert item["labels_A"].dtype == torch.int64 and set(item["labels_A"].unique().tolist()) == {0, 1, 2}
    # the lung mask zeroes everything outside it (at the corners of the resized volume)
    assert item["image_A"][0, 0, 0, 0] == 0 and item["image_A"][0, -1, -1, -1] == 0

    inter = VolumePairDataset(tmp_path, (6, 6, 6), preset="mri", pairs="inter",
                              subject=lambda p: default_subject(p))
    assert len(inter) == 5 * 4 - 4
    assert all(default_subject(inter.paths[a]) != default_subject(inter.paths[b]) for a, b in inter.pairs)
    every = VolumePairDataset(tmp_path, (6, 6, 6), pairs="inter")
    assert len(every) == 20
    explicit = VolumePairDataset(sorted(tmp_path.glob("case0[12]*")), (6, 6, 6),
                                 pairs=[(0, 1), (tmp_path / "case02_exp.nii.gz", tmp_path / "case01_exp.nii.gz")])
    assert explicit.pairs[1] == (2, 0)
    batch = torch.utils.data.default_collate([inter[0], inter[1]])
    assert batch["image_A"].shape == (2, 1, 6, 6, 6)


def test_load_volume_meta(tmp_path):
    array = np.random.default_rng(2).uniform(0, 100, size=(12, 10, 6)).astype(np.float32)
    write_nifti(tmp_path / "v.nii", array, (0.5, 0.5, 2.0))
    x, meta = load_volume(tmp_path / "v.nii", preset="minmax", shape=(6, 5, 3))
    assert x.shape == (1, 6, 5, 3)
    assert meta["original_shape"] == (12, 10, 6) and np.allclose(meta["spacing"], (0.5, 0.5, 2.0))


@pytest.mark.parametrize("shape", [(40, 32), (16, 12, 10)])
def test_synthetic_pairs_are_seeded(shape):
    a = synthetic_pair(shape, seed=3)
    b = synthetic_pair(shape, seed=3)
    c = synthetic_pair(shape, seed=4)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["image_A"], c["image_A"])
    assert a["image_A"].shape == (1, *shape) and a["labels_A"].dtype == torch.int64
    assert set(a["labels_A"].unique().tolist()) <= {0, 1, 2, 3, 4} and a["labels_A"].max() > 0
    assert not torch.equal(a["labels_A"], a["labels_B"])  # two different deformations
    # labels mark the foreground of the image
    fg = a["labels_A"] > 0
    assert a["image_A"][fg].mean() > 0.2 > a["image_A"][~fg].abs().mean()
    ds = SyntheticPairDataset(3, shape, seed=5)
    assert torch.equal(ds[1]["image_B"], SyntheticPairDataset(3, shape, seed=5)[1]["image_B"])
    assert ds.batch([0, 2])["labels_A"].shape == (2, 1, *shape)
