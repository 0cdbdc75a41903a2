"""Atomic checkpoint files and RNG state capture for resumable training."""

from __future__ import annotations

import os
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")


def atomic_save(obj, path, *, what: str = "checkpoint") -> None:
    """``torch.save`` crash-safely (``gradicon_fast.io.atomic_output``): to a temporary file in the same
    folder, checked, flushed to disk, then renamed over ``path``. A reader (or a resume after a crash)
    sees the old file or the new one, never a partial one; a failure (a full disk) is one
    ``OutputError`` naming the file."""
    from ..io.output import atomic_output

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, what=what, verify=_check_zip_archive) as tmp:
        torch.save(obj, tmp)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _check_zip_archive(path: str) -> None:
    """torch.save writes a zip archive: its central directory, at the very end, must be readable."""
    from ..io.errors import IncompleteOutput

    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except zipfile.BadZipFile as e:
        raise IncompleteOutput(f"the file is incomplete ({e})") from None


def load_checkpoint_file(path, *, map_location="cpu", what: str = "checkpoint"):
    """``torch.load`` with one clear error for a file that is not a readable checkpoint (damaged,
    truncated, or not written by ``torch.save``), instead of the unpickler's internals."""
    from ..io.errors import InputError

    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise InputError(f"{what} {os.fspath(path)!r} does not exist") from None
    except (OSError, MemoryError):
        raise
    except Exception:  # UnpicklingError, RuntimeError (zip), EOFError, ValueError, KeyError, ...
        raise InputError(f"{what} {os.fspath(path)!r} is not a readable checkpoint (damaged or truncated, or not "
                         f"a file saved by gradicon_fast)") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured. The generator states must be CPU byte tensors: a checkpoint
    loaded with ``map_location`` set to a GPU holds them on that GPU, so they are moved back first."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in ``folder``, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def checkpoint_path(folder, step: int) -> Path:
    return Path(folder) / f"checkpoint_{step:08d}.pt"


def prune_checkpoints(folder, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(folder)[:-keep]:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
