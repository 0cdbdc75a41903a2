"""Atomic checkpoint files and RNG state capture for resumable training."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``:
    a reader (or a resume after a crash) sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


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
