"""Which implementation runs an op: the backend registry, ``use_backend`` and ``backends()``.

Backends:
  ``torch``   the pure-PyTorch reference (any device; always available);
  ``cpu``     the fused C++/OpenMP kernels of the compiled extension (CPU tensors);
  ``cuda``    the fused CUDA C++ kernels of the compiled extension (CUDA tensors);
  ``triton``  the fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
  ``auto``    per call, the fastest available for the inputs' device, else ``torch``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

import torch

from . import _extension

KNOWN = ("auto", "torch", "cpu", "cuda", "triton")



class _Choice(threading.local):
    """The backend chosen by ``use_backend`` in this thread.

    A thread-local attribute rather than a ContextVar: ``torch.compile`` reads it while tracing and
    guards the compiled graph on its value (a later call under another ``use_backend`` recompiles),
    whereas it cannot trace ``ContextVar.get``.
    """

    def __init__(self):
        self.name = "auto"  # set per thread: each new thread starts on "auto"


_choice = _Choice()
_warned: set[str] = set()


def _check_name(name: str) -> str:
    if name not in KNOWN:
        raise ValueError(f"backend must be one of {', '.join(repr(k) for k in KNOWN)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` (``"auto"`` picks per call)."""
    previous, _choice.name = _choice.name, _check_name(name)
    try:
        yield
    finally:
        _choice.name = previous


def current_backend() -> str:
    return _choice.name


def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    return None


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None if it can (on some device)."""
    if name in ("auto", "torch"):
        return None
    if name == "cpu":
        return None if _extension.loaded() else f"the C++ extension is not built ({_extension.error()})"
    if name == "cuda":
        if not _extension.loaded():
            return f"the C++ extension is not built ({_extension.error()})"
        if not _extension.has_cuda():
            return "the C++ extension was built without CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        return _triton_reason()
    raise ValueError(f"unknown backend {name!r}")


def backends() -> dict[str, bool]:
    """Map each backend to whether it can run in this process."""
    return {name: unavailable_reason(name) is None for name in KNOWN if name != "auto"}


def fused_ops(name: str):
    """The module of typed wrappers (``transform_points``, ``warp``, ``gradicon_loss``,
    ``gradicon_analytic_loss``, ``icon_loss``, ``normal_noise``) that runs fused backend ``name``'s
    ops (docs/op_layer.md). Imported on first use, not cached in a global: torch.compile would
    guard on it."""
    if name in ("cpu", "cuda"):
        from . import ops

        return ops
    if name == "triton":
        from .kernels import ops as triton_ops  # imported lazily: triton is optional

        return triton_ops
    raise ValueError(f"backend {name!r} has no fused ops")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(requested: str | None, device: torch.device) -> str:
    """The concrete backend that runs an op on tensors of ``device``."""
    name = _check_name(requested) if requested is not None else _choice.name
    if name == "auto":
        if device.type == "cpu":
            if _extension.loaded():
                return "cpu"
            _warn_once("cpu", f"gradicon_fast: using the PyTorch reference on CPU: {_extension.error()}")
            return "torch"
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                if unavailable_reason(candidate) is None:
                    return candidate
            _warn_once("cuda", "gradicon_fast: no fused GPU backend available; using the PyTorch reference")
            return "torch"
        return "torch"
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors, but the inputs are on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors, but the inputs are on {device}")
    if name == "triton" and device.type == "cpu" and not triton_interpreted():
        raise ValueError("backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1")
    return name
