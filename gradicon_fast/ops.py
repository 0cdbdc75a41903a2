"""The compiled extension's ops ``torch.ops.gradicon_fast.*`` (the ``cpu`` and ``cuda`` backends).

The schemas and device kernels live in C++ (``csrc/``); importing this module gives them their
fake kernels and autograd from the op table (``op_registry``), which makes them differentiable and
traceable by ``torch.compile``. The functions below are thin typed wrappers used by ``functional.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _extension, op_registry

Tensor = torch.Tensor

# The ops csrc/ops.cpp defines; their fake kernels and autograd come from the op table.
EXTENSION_OPS = ("normal_noise_", "transform_points", "transform_points_backward", "warp", "warp_backward",
                 "gradicon_loss", "gradicon_loss_backward", "gradicon_loss_and_grad", "gradicon_analytic_loss",
                 "gradicon_analytic_loss_backward", "icon_loss", "icon_loss_backward")

if _extension.loaded():
    op_registry.register_compiled("gradicon_fast", EXTENSION_OPS)


# ---- typed wrappers ---------------------------------------------------------------------------


def normal_noise(seed: int, d: int, points_shape: Sequence[int], *, dtype=torch.float32,
                 device=None) -> Tensor:
    """The (1, d, *points_shape) standard-normal noise the fused penalties draw from ``seed``."""
    out = torch.empty((1, d, *points_shape), dtype=dtype, device=device)
    torch.ops.gradicon_fast.normal_noise_(out, int(seed))
    return out


def transform_points(chain: Sequence[Tensor], points: Tensor) -> Tensor:
    return torch.ops.gradicon_fast.transform_points(list(chain), points)


def warp(image: Tensor, chain: Sequence[Tensor], shape: Sequence[int]) -> Tensor:
    return torch.ops.gradicon_fast.warp(image, list(chain), list(shape))


# When a CPU GradICON loss will be backpropagated, compute its gradients in the same pass over the
# points as the loss (gradicon_loss_and_grad) instead of a forward pass and a backward pass that
# repeats it: about a third less work. The gradients are held from the forward call until backward
# (memory the backward would allocate anyway) and scaled in place there, so such a loss supports
# one backward pass; set this to False for retain_graph=True, or to measure the two-pass ops.
fuse_cpu_loss_and_grad = True


class _GradiconLossAndGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, params, *fields):
        n_ab, shape, stride, noise, seed, delta, noise_scale = params
        needs = [bool(n) for n in ctx.needs_input_grad[1:]]
        loss, grads_ab, grads_ba = torch.ops.gradicon_fast.gradicon_loss_and_grad(
            list(fields[:n_ab]), list(fields[n_ab:]), shape, stride, noise, seed, delta, noise_scale, needs[:n_ab],
            needs[n_ab:])
        ctx.grads = [g if n else None for g, n in zip(list(grads_ab) + list(grads_ba), needs)]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("gradicon_loss: this loss was already backpropagated, and its fused CPU gradients are "
                               "spent; for retain_graph=True set gradicon_fast.ops.fuse_cpu_loss_and_grad = False")
        ctx.grads = None  # the engine takes the tensors over: no copy, nothing kept
        # Scaling by exactly 1 changes no bit; skipping it saves a pass over the buffers (290 MB at
        # lung scale) when the loss is backpropagated alone or with weight 1.
        if grad_loss.item() != 1.0:
            for g in grads:
                if g is not None:
                    g.mul_(grad_loss)
        return (None, *grads)


def gradicon_loss(chain_ab, chain_ba, shape, stride, noise, seed, delta, noise_scale) -> Tensor:
    chain_ab, chain_ba = list(chain_ab), list(chain_ba)
    args = (list(shape), int(stride), noise, int(seed), float(delta), float(noise_scale))
    fields = chain_ab + chain_ba
    if (fuse_cpu_loss_and_grad and fields[0].device.type == "cpu" and torch.is_grad_enabled()
            and any(f.requires_grad for f in fields) and not torch.compiler.is_compiling()):
        return _GradiconLossAndGrad.apply((len(chain_ab), *args), *fields)
    return torch.ops.gradicon_fast.gradicon_loss(chain_ab, chain_ba, *args)


def icon_loss(chain_ab, chain_ba, shape, noise, seed, noise_scale) -> Tensor:
    return torch.ops.gradicon_fast.icon_loss(list(chain_ab), list(chain_ba), list(shape), noise, int(seed),
                                             float(noise_scale))


def gradicon_analytic_loss(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale) -> Tensor:
    """One direction of the analytic GradICON penalty: ‖J - I‖_F² of φ_ab∘φ_ba, mean over B·d·N."""
    return torch.ops.gradicon_fast.gradicon_analytic_loss(list(chain_ab), list(chain_ba), list(shape), int(stride),
                                                          noise, int(seed), float(noise_scale))
