"""What ITK's NIfTI reader and writer do not say: a short write, and NaN or infinite voxels.

ITK's NIfTI writer ignores short writes, so a full disk leaves a truncated file and no error: the
written file is checked against the byte count its own header declares. ITK's NIfTI reader turns
NaN and infinite voxels into 0 without a word, so a float NIfTI file is read a second time (with
nibabel) to find them.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from .errors import IncompleteOutput
from .output import suffix_of


def _declared_bytes(header: bytes) -> int:
    """Header plus voxel bytes a NIfTI-1 or NIfTI-2 file declares (from its first 540 bytes)."""
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348 and len(header) >= 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if size == 540 and len(header) >= 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        raise IncompleteOutput("the NIfTI header is incomplete")
    voxels = int(np.prod([max(int(n), 1) for n in dims[1:1 + max(int(dims[0]), 0)]], dtype=np.int64))
    return max(offset, size) + voxels * bitpix // 8


def check_nifti_complete(path: str) -> None:
    """ITK's NIfTI writer ignores short writes (a full disk), so count what actually reached the file.
    For ``.nii.gz`` the whole gzip stream is read: that also checks its CRC and length."""
    if suffix_of(path) == ".nii.gz":
        try:
            with gzip.open(path, "rb") as f:
                header = f.read(540)
                length = len(header)
                while chunk := f.read(1 << 22):
                    length += len(chunk)
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            raise IncompleteOutput(f"the compressed stream is incomplete or damaged ({e})") from None
    else:
        with open(path, "rb") as f:
            header = f.read(540)
        length = os.path.getsize(path)
    expected = _declared_bytes(header)
    if length < expected:
        raise IncompleteOutput(f"the file is incomplete ({length} of {expected} bytes)")


def restore_nifti_nonfinite(path: str, array: np.ndarray) -> None:
    """Put back into ``array`` (ITK's voxels of the float NIfTI file ``path``, index order i, j[, k])
    the NaN and infinite values that ITK's reader replaced by 0."""
    import nibabel as nib

    if not np.issubdtype(array.dtype, np.floating):
        return
    try:
        image = nib.load(path)
        if image.get_data_dtype().kind != "f":
            return  # integer voxels cannot hold NaN (a scaling factor cannot make them non-finite)
        raw = np.asanyarray(image.dataobj)
    except Exception:  # nibabel cannot read what ITK could: keep ITK's voxels
        return
    if raw.size != array.size:
        return
    raw = raw.reshape(array.shape, order="F") if raw.shape != array.shape else raw
    bad = ~np.isfinite(raw)
    if bad.any():
        array[bad] = raw[bad]
