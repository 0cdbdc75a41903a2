"""How a U-Net step executes: autocast dtype, activation checkpointing mode, memory layout.

``"selective"`` checkpointing keeps the outputs of the convolutions (the costly ops) and recomputes
everything else in backward; BatchNorm running statistics are restored after a recomputation,
so that a checkpointed training step updates them exactly once, as a plain one does.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CHECKPOINT_MODES = (False, True, "full", "selective")

# The ops whose outputs "selective" keeps (the dispatcher sees autocast's and oneDNN's variants).
_KEPT_OPS = frozenset({torch.ops.aten.convolution.default, torch.ops.aten._convolution.default,
                       torch.ops.aten.mkldnn_convolution.default})


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: AVX512-BF16 or AMX; CUDA: bf16 support)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _cpu_has_native_bfloat16()
    return False


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bfloat16() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def autocast_dtype(setting, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a step runs with: ``setting`` itself, or for ``"auto"`` bfloat16 where native."""
    if setting == "auto":
        return torch.bfloat16 if native_bfloat16(device) else None
    return setting


def memory_format(ndim: int) -> torch.memory_format:
    """The channels-last format of an ``ndim``-dimensional (B, C, *spatial) tensor."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def _keep_convolutions(ctx, func, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if func in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def batchnorm_stats(module: nn.Module):
    """A copy of the BatchNorm running statistics inside ``module``; calling it puts them back."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]

    @torch.no_grad()
    def restore():
        for m, mean, var, count in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
    return restore


@contextlib.contextmanager
def _batchnorm_stats_restored(module: nn.Module):
    restore = batchnorm_stats(module)
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def checkpoint_contexts(module: nn.Module, mode) -> tuple:
    """``context_fn`` result for ``torch.utils.checkpoint`` of ``module`` in ``mode`` ("full"/True or "selective")."""
    if mode == "selective":
        forward, recompute = create_selective_checkpoint_contexts(_keep_convolutions)
    else:
        forward, recompute = contextlib.nullcontext(), contextlib.nullcontext()
    # the statistics are saved and restored outside the recomputation (whose ops it replays)
    return forward, _both(_batchnorm_stats_restored(module), recompute)
