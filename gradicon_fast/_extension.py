"""Loads the compiled extension ``gradicon_fast._C`` (op schemas, CPU and CUDA kernels) if it was built."""

from __future__ import annotations

_error: str | None = None
_module = None

import os

if os.environ.get("GRADICON_FAST_DISABLE_EXTENSION", "0") == "1":
    _error = "disabled by GRADICON_FAST_DISABLE_EXTENSION=1"
else:
    try:  # the import registers the ops with torch.library as a side effect
        from . import _C as _module  # type: ignore[attr-defined]
    except ImportError as exc:  # not built, or built against another torch
        _error = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    return _module is not None


def error() -> str:
    return _error or ""


def has_cuda() -> bool:
    if _module is None:
        return False
    import torch

    return bool(torch.ops.gradicon_fast.built_with_cuda())
