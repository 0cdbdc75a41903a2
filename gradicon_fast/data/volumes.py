"""Datasets of registration pairs over a folder (or list) of NIfTI / NRRD / MetaImage volumes.

Volumes are read with ``gradicon_fast.io.read_image`` when that module is available; otherwise a
minimal private reader is used (nibabel for .nii/.nii.gz, SimpleITK for .nrrd/.nhdr/.mha/.mhd).
Either way arrays are indexed in ITK/NIfTI index order (i, j, k) (nibabel's ``get_fdata()``
order, the reverse of ``sitk.GetArrayFromImage``), and ``spacing`` follows that order.

Intensity presets (docs/conventions.md §5):

- ``"lung_ct"``: HU clipped to [-1000, 0], scaled to [0, 1], multiplied by the lung mask when given;
- ``"mri"``: the (0.5, 99.5) percentiles (``percentiles=``) mapped to 0 and 1, clipped;
- ``"minmax"``: min/max to [0, 1]; ``"none"``: unchanged.

Then the volume is resized to the network's shape by (bi/tri)linear interpolation with
``align_corners=True``: the first and last voxel centres stay where they are, which is the [0, 1]
coordinate convention of the maps (docs/conventions.md §1), so a transform computed at the network's shape
applies unchanged to the original volume. Label maps are resized with nearest-neighbour sampling.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import functional as gf

Tensor = torch.Tensor

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PRESETS = ("lung_ct", "mri", "minmax", "none")


def _suffix(path) -> str:
    name = os.fspath(path).lower()
    for s in VOLUME_SUFFIXES:
        if name.endswith(s):
            return s
    return Path(name).suffix


def _read_private(path) -> tuple[np.ndarray, tuple[float, ...]]:
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        img = nib.load(os.fspath(path))
        array = np.asarray(img.dataobj, dtype=np.float32)
        array = np.squeeze(array, axis=tuple(range(3, array.ndim))) if array.ndim > 3 else array
        spacing = tuple(float(z) for z in img.header.get_zooms()[:array.ndim])
        return array, spacing
    if suffix in (".nrrd", ".nhdr", ".mha", ".mhd"):
        import SimpleITK as sitk

        img = sitk.ReadImage(os.fspath(path))
        array = np.transpose(sitk.GetArrayFromImage(img)).astype(np.float32)
        return array, tuple(float(s) for s in img.GetSpacing())
    raise ValueError(f"{path}: unsupported volume format (expected one of {', '.join(VOLUME_SUFFIXES)})")


def read_volume(path) -> tuple[np.ndarray, tuple[float, ...]]:
    """(array float32 indexed (i, j, k), spacing in mm per axis) of a NIfTI/NRRD/MetaImage file."""
    try:
        from ..io import read_image  # the I/O module's reader, when present
    except ImportError:
        return _read_private(path)
    image = read_image(path)
    return np.asarray(image.array, dtype=np.float32), tuple(float(s) for s in image.geometry.spacing)


def normalize(volume, preset: str = "mri", *, mask=None, percentiles: Sequence[float] = (0.5, 99.5),
              hu_window: Sequence[float] = (-1000.0, 0.0)) -> Tensor:
    """Intensity preset applied to a volume (array or tensor); returns a float32 tensor of the same shape."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {preset!r}")
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32) if not isinstance(volume, Tensor) else volume).float()
    if preset == "lung_ct":
        lo, hi = (float(v) for v in hu_window)
        x = (x.clamp(lo, hi) - lo) / (hi - lo)
        if mask is not None:
            x = x * (torch.as_tensor(np.asarray(mask)) > 0).float()
        return x
    if preset == "none":
        return x
    if preset == "mri":
        values = x[torch.as_tensor(np.asarray(mask)) > 0] if mask is not None else x.flatten()
        q = torch.quantile(values.double()[:: max(1, values.numel() // 2_000_000)],
                           torch.tensor([p / 100 for p in percentiles], dtype=torch.float64))
        lo, hi = float(q[0]), float(q[1])
    else:
        lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return torch.zeros_like(x)
    return ((x - lo) / (hi - lo)).clamp(0, 1)


def resize(volume: Tensor, shape: Sequence[int], *, labels: bool = False) -> Tensor:
    """Resize a (*S), (C, *S) or (B, C, *S) tensor to spatial ``shape``: linear, align-corners (nearest
    at the same voxel-centre positions for ``labels``)."""
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    x = volume
    extra = d + 2 - x.ndim
    for _ in range(extra):
        x = x.unsqueeze(0)
    if tuple(x.shape[2:]) != shape:
        if labels:
            x = _nearest_resize(x.float(), shape)
        else:
            mode = "bilinear" if d == 2 else "trilinear"
            x = F.interpolate(x.float(), size=shape, mode=mode, align_corners=True)
    for _ in range(extra):
        x = x.squeeze(0)
    return x.to(volume.dtype) if labels else x


def _nearest_resize(x: Tensor, shape) -> Tensor:
    # Sample at the voxel centres of the new grid in [0, 1] coordinates (align-corners), nearest voxel.
    d = len(shape)
    return gf.warp(x, [torch.zeros((1, d, *shape), dtype=x.dtype)], shape=shape, mode="nearest")


def load_volume(path, *, preset: str = "mri", shape: Sequence[int] | None = None, mask_path=None,
                percentiles: Sequence[float] = (0.5, 99.5)) -> tuple[Tensor, dict]:
    """Read, normalise and resize one volume: ``(tensor (1, *shape), meta)`` with meta
    ``{"path", "original_shape", "spacing"}``."""
    array, spacing = read_volume(path)
    mask = read_volume(mask_path)[0] > 0 if mask_path is not None else None
    if mask is not None and mask.shape != array.shape:
        raise ValueError(f"mask {mask_path} has shape {mask.shape} but its image {path} has {array.shape}")
    x = normalize(array, preset, mask=mask, percentiles=percentiles)
    if shape is not None:
        x = resize(x, shape)
    return x.unsqueeze(0), {"path": os.fspath(path), "original_shape": tuple(array.shape), "spacing": spacing}


def list_volumes(folder, pattern: str | None = None) -> list[Path]:
    """The volume files in ``folder`` (sorted), optionally filtered by a glob ``pattern``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = folder.glob(pattern) if pattern else folder.iterdir()
    return sorted(p for p in files if p.is_file() and _suffix(p) in VOLUME_SUFFIXES)


_DEFAULT_SUBJECT_RE = re.compile(r"^(.*?)[_\-.](?:[^_\-.]+)$")


def default_subject(path) -> str:
    """Subject id of a file: its name without extension, minus a last ``_token`` (``case01_insp`` → ``case01``)."""
    name = Path(path).name
    suffix = _suffix(path)
    stem = name[: len(name) - len(suffix)] if suffix and name.lower().endswith(suffix) else Path(name).stem
    m = _DEFAULT_SUBJECT_RE.match(stem)
    return m.group(1) if m else stem


def _resolve_companion(spec, path: Path):
    """A mask/label file for ``path`` from ``spec``: None, a dict, a callable or a folder (same file name)."""
    if spec is None:
        return None
    if callable(spec):
        return spec(path)
    if isinstance(spec, dict):
        return spec.get(path, spec.get(os.fspath(path), spec.get(path.name)))
    candidate = Path(spec) / path.name
    return candidate if candidate.exists() else None


class VolumePairDataset(Dataset):
    """Registration pairs over volumes, each item ``{"image_A", "image_B"}`` (1, *shape) float32
    (plus ``"labels_A"``/``"labels_B"`` int64 when ``labels`` is given, and ``"index_A"``/``"index_B"``).

    - ``volumes``: a folder (all NIfTI/NRRD/MetaImage files in it, sorted; ``pattern`` filters by
      glob) or a list of paths.
    - ``pairs``: ``"inter"`` — every ordered pair of volumes from different subjects;
      ``"intra"`` — every ordered pair of different volumes of the same subject; or an explicit
      list of pairs (indices into the volume list, or paths). Random pairs come from shuffling
      this list (the training sampler does).
    - ``subject``: volume path → subject id (default :func:`default_subject`; with ``"inter"``
      and no ``subject`` every volume is its own subject).
    - ``masks`` / ``labels``: None, a dict path → file, a callable, or a folder holding files of
      the same names. Masks multiply ``lung_ct`` images; labels are resized nearest.
    - ``cache``: keep preprocessed volumes in memory (per process / data-loader worker).
    """

    def __init__(self, volumes, shape: Sequence[int], *, preset: str = "mri", pairs="inter",
                 subject: Callable | None = None, masks=None, labels=None, pattern: str | None = None,
                 percentiles: Sequence[float] = (0.5, 99.5), cache: bool = False):
        if isinstance(volumes, (str, os.PathLike)):
            self.paths = list_volumes(volumes, pattern)
        else:
            self.paths = [Path(p) for p in volumes]
        if not self.paths:
            raise ValueError(f"no volumes found in {volumes!r}")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {preset!r}")
        self.shape = tuple(int(s) for s in shape)
        self.preset = preset
        self.percentiles = tuple(percentiles)
        self.masks = masks
        self.labels = labels
        self.pairs = self._make_pairs(pairs, subject)
        if not self.pairs:
            raise ValueError(f"no {pairs!r} pairs among {len(self.paths)} volumes (check the subject ids)")
        self._cache: dict | None = {} if cache else None

    def _make_pairs(self, pairs, subject) -> list[tuple[int, int]]:
        n = len(self.paths)
        if isinstance(pairs, str):
            if pairs not in ("inter", "intra"):
                raise ValueError(f"pairs must be 'inter', 'intra' or a list of pairs, got {pairs!r}")
            if subject is None:
                ids = [default_subject(p) for p in self.paths] if pairs == "intra" else list(range(n))
            else:
                ids = [subject(p) for p in self.paths]
            same = pairs == "intra"
            return [(i, j) for i, j in itertools.permutations(range(n), 2) if (ids[i] == ids[j]) == same]
        index = {os.fspath(p): i for i, p in enumerate(self.paths)}
        out = []
        for a, b in pairs:
            out.append(tuple(int(x) if isinstance(x, (int, np.integer)) else index[os.fspath(Path(x))]
                             for x in (a, b)))
        return out

    def __len__(self) -> int:
        return len(self.pairs)

    def volume(self, i: int) -> dict:
        """Preprocessed volume ``i``: ``{"image": (1, *shape), "labels": (1, *shape) | None, "meta": ...}``."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        path = self.paths[i]
        mask_path = _resolve_companion(self.masks, path) if self.preset == "lung_ct" else None
        image, meta = load_volume(path, preset=self.preset, shape=self.shape, mask_path=mask_path,
                                  percentiles=self.percentiles)
        labels = None
        label_path = _resolve_companion(self.labels, path)
        if label_path is not None:
            labels = resize(torch.as_tensor(np.rint(read_volume(label_path)[0])).long(), self.shape, labels=True)
            labels = labels.unsqueeze(0)
        item = {"image": image, "labels": labels, "meta": meta}
        if self._cache is not None:
            self._cache[i] = item
        return item

    def __getitem__(self, index: int) -> dict:
        a, b = self.pairs[index]
        va, vb = self.volume(a), self.volume(b)
        out = {"image_A": va["image"], "image_B": vb["image"], "index_A": a, "index_B": b}
        if va["labels"] is not None and vb["labels"] is not None:
            out["labels_A"], out["labels_B"] = va["labels"], vb["labels"]
        return out
