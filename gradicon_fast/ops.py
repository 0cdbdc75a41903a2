"""Autograd and fake (meta) kernels of the compiled ops ``torch.ops.gradicon_fast.*``.

The schemas and device kernels live in C++ (``csrc/``); this module makes the ops
differentiable and traceable by ``torch.compile``. Each backward op recomputes what it needs
from the inputs (and the noise seed): nothing but the inputs is saved between forward and
backward. The functions at the bottom are thin typed wrappers used by ``functional.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _extension

Tensor = torch.Tensor

_registered = False


def _grads_or_none(grads: Sequence[Tensor], needed: Sequence[bool]) -> list[Tensor | None]:
    return [g if n else None for g, n in zip(grads, needed)]


def _batch(*tensors: Tensor) -> int:
    devices = {t.device for t in tensors}
    if len(devices) > 1:  # the C++ kernels check this too, but a meta tensor routes here instead
        raise RuntimeError(f"gradicon_fast: all tensors must be on one device, got {sorted(map(str, devices))}")
    return max(t.shape[0] for t in tensors)


def _register() -> None:
    global _registered
    if _registered or not _extension.loaded():
        return
    _registered = True
    lib = "gradicon_fast::"

    # ---- fake kernels: shapes only ----------------------------------------------------------
    @torch.library.register_fake(lib + "normal_noise_")
    def _(out, seed):
        return None

    @torch.library.register_fake(lib + "transform_points")
    def _(chain, points):
        return points.new_empty((_batch(points, *chain), *points.shape[1:]))

    @torch.library.register_fake(lib + "transform_points_backward")
    def _(grad, chain, points, chain_needs_grad, points_needs_grad):
        grads = [f.new_empty(f.shape) if n else f.new_empty((0,)) for f, n in zip(chain, chain_needs_grad)]
        return grads, points.new_empty(points.shape) if points_needs_grad else points.new_empty((0,))

    @torch.library.register_fake(lib + "warp")
    def _(image, chain, shape):
        return image.new_empty((_batch(image, *chain), image.shape[1], *shape))

    @torch.library.register_fake(lib + "warp_backward")
    def _(grad, image, chain, shape, image_needs_grad, chain_needs_grad):
        grads = [f.new_empty(f.shape) if n else f.new_empty((0,)) for f, n in zip(chain, chain_needs_grad)]
        return image.new_empty(image.shape) if image_needs_grad else image.new_empty((0,)), grads

    @torch.library.register_fake(lib + "gradicon_loss")
    def _(chain_ab, chain_ba, shape, stride, noise, seed, delta, noise_scale):
        _batch(*chain_ab, *chain_ba)
        return chain_ab[0].new_empty(())

    def _pair_grads_fake(chain_ab, chain_ba, ab_needs_grad, ba_needs_grad):
        return ([f.new_empty(f.shape) if n else f.new_empty((0,)) for f, n in zip(chain_ab, ab_needs_grad)],
                [f.new_empty(f.shape) if n else f.new_empty((0,)) for f, n in zip(chain_ba, ba_needs_grad)])

    @torch.library.register_fake(lib + "gradicon_loss_and_grad")
    def _(chain_ab, chain_ba, shape, stride, noise, seed, delta, noise_scale, ab_needs_grad, ba_needs_grad):
        return (chain_ab[0].new_empty(()),) + _pair_grads_fake(chain_ab, chain_ba, ab_needs_grad, ba_needs_grad)

    @torch.library.register_fake(lib + "gradicon_loss_backward")
    def _(grad, chain_ab, chain_ba, shape, stride, noise, seed, delta, noise_scale, ab_needs_grad, ba_needs_grad):
        return _pair_grads_fake(chain_ab, chain_ba, ab_needs_grad, ba_needs_grad)

    @torch.library.register_fake(lib + "icon_loss")
    def _(chain_ab, chain_ba, shape, noise, seed, noise_scale):
        _batch(*chain_ab, *chain_ba)
        return chain_ab[0].new_empty(())

    @torch.library.register_fake(lib + "icon_loss_backward")
    def _(grad, chain_ab, chain_ba, shape, noise, seed, noise_scale, ab_needs_grad, ba_needs_grad):
        return _pair_grads_fake(chain_ab, chain_ba, ab_needs_grad, ba_needs_grad)

    # ---- autograd: save the inputs, recompute in backward -----------------------------------
    ops = torch.ops.gradicon_fast

    def _setup_transform_points(ctx, inputs, output):
        chain, points = inputs
        ctx.chain_len = len(chain)
        ctx.save_for_backward(*chain, points)

    def _backward_transform_points(ctx, grad):
        *chain, points = ctx.saved_tensors
        chain_needs, points_needs = ctx.needs_input_grad
        chain_needs = [bool(n) for n in (chain_needs if isinstance(chain_needs, (list, tuple))
                                         else [chain_needs] * ctx.chain_len)]
        grads, grad_points = ops.transform_points_backward(grad, chain, points, chain_needs, bool(points_needs))
        return _grads_or_none(grads, chain_needs), grad_points if points_needs else None

    torch.library.register_autograd(lib + "transform_points", _backward_transform_points,
                                    setup_context=_setup_transform_points)

    def _setup_warp(ctx, inputs, output):
        image, chain, shape = inputs
        ctx.shape = list(shape)
        ctx.chain_len = len(chain)
        ctx.save_for_backward(image, *chain)

    def _backward_warp(ctx, grad):
        image, *chain = ctx.saved_tensors
        image_needs, chain_needs, _ = ctx.needs_input_grad
        chain_needs = [bool(n) for n in (chain_needs if isinstance(chain_needs, (list, tuple))
                                         else [chain_needs] * ctx.chain_len)]
        grad_image, grads = ops.warp_backward(grad, image, chain, ctx.shape, bool(image_needs), chain_needs)
        return grad_image if image_needs else None, _grads_or_none(grads, chain_needs), None

    torch.library.register_autograd(lib + "warp", _backward_warp, setup_context=_setup_warp)

    def _pair_needs(ctx, n_ab, n_ba):
        ab, ba = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ab = list(ab) if isinstance(ab, (list, tuple)) else [ab] * n_ab
        ba = list(ba) if isinstance(ba, (list, tuple)) else [ba] * n_ba
        return [bool(n) for n in ab], [bool(n) for n in ba]

    def _setup_gradicon(ctx, inputs, output):
        chain_ab, chain_ba, shape, stride, noise, seed, delta, noise_scale = inputs
        ctx.n_ab, ctx.n_ba = len(chain_ab), len(chain_ba)
        ctx.args = (list(shape), stride, seed, delta, noise_scale)
        ctx.has_noise = noise is not None
        ctx.save_for_backward(*chain_ab, *chain_ba, *([noise] if noise is not None else []))

    def _backward_gradicon(ctx, grad):
        saved = ctx.saved_tensors
        chain_ab, chain_ba = list(saved[:ctx.n_ab]), list(saved[ctx.n_ab:ctx.n_ab + ctx.n_ba])
        noise = saved[-1] if ctx.has_noise else None
        shape, stride, seed, delta, noise_scale = ctx.args
        ab_needs, ba_needs = _pair_needs(ctx, ctx.n_ab, ctx.n_ba)
        grads_ab, grads_ba = ops.gradicon_loss_backward(grad, chain_ab, chain_ba, shape, stride, noise, seed, delta,
                                                        noise_scale, ab_needs, ba_needs)
        return (_grads_or_none(grads_ab, ab_needs), _grads_or_none(grads_ba, ba_needs),
                None, None, None, None, None, None)

    torch.library.register_autograd(lib + "gradicon_loss", _backward_gradicon, setup_context=_setup_gradicon)

    def _setup_icon(ctx, inputs, output):
        chain_ab, chain_ba, shape, noise, seed, noise_scale = inputs
        ctx.n_ab, ctx.n_ba = len(chain_ab), len(chain_ba)
        ctx.args = (list(shape), seed, noise_scale)
        ctx.has_noise = noise is not None
        ctx.save_for_backward(*chain_ab, *chain_ba, *([noise] if noise is not None else []))

    def _backward_icon(ctx, grad):
        saved = ctx.saved_tensors
        chain_ab, chain_ba = list(saved[:ctx.n_ab]), list(saved[ctx.n_ab:ctx.n_ab + ctx.n_ba])
        noise = saved[-1] if ctx.has_noise else None
        shape, seed, noise_scale = ctx.args
        ab_needs, ba_needs = _pair_needs(ctx, ctx.n_ab, ctx.n_ba)
        grads_ab, grads_ba = ops.icon_loss_backward(grad, chain_ab, chain_ba, shape, noise, seed, noise_scale,
                                                    ab_needs, ba_needs)
        return (_grads_or_none(grads_ab, ab_needs), _grads_or_none(grads_ba, ba_needs), None, None, None, None)

    torch.library.register_autograd(lib + "icon_loss", _backward_icon, setup_context=_setup_icon)

    # ---- analytic GradICON (fake kernels and autograd, as for gradicon_loss) ------------------
    @torch.library.register_fake(lib + "gradicon_analytic_loss")
    def _(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale):
        return chain_ab[0].new_empty(())

    @torch.library.register_fake(lib + "gradicon_analytic_loss_backward")
    def _(grad, chain_ab, chain_ba, shape, stride, noise, seed, noise_scale, ab_needs_grad, ba_needs_grad):
        return _pair_grads_fake(chain_ab, chain_ba, ab_needs_grad, ba_needs_grad)

    def _setup_gradicon_analytic(ctx, inputs, output):
        chain_ab, chain_ba, shape, stride, noise, seed, noise_scale = inputs
        ctx.n_ab, ctx.n_ba = len(chain_ab), len(chain_ba)
        ctx.args = (list(shape), stride, seed, noise_scale)
        ctx.has_noise = noise is not None
        ctx.save_for_backward(*chain_ab, *chain_ba, *([noise] if noise is not None else []))

    def _backward_gradicon_analytic(ctx, grad):
        saved = ctx.saved_tensors
        chain_ab, chain_ba = list(saved[:ctx.n_ab]), list(saved[ctx.n_ab:ctx.n_ab + ctx.n_ba])
        noise = saved[-1] if ctx.has_noise else None
        shape, stride, seed, noise_scale = ctx.args
        ab_needs, ba_needs = _pair_needs(ctx, ctx.n_ab, ctx.n_ba)
        grads_ab, grads_ba = ops.gradicon_analytic_loss_backward(grad, chain_ab, chain_ba, shape, stride, noise, seed,
                                                                 noise_scale, ab_needs, ba_needs)
        return (_grads_or_none(grads_ab, ab_needs), _grads_or_none(grads_ba, ba_needs), None, None, None, None, None)

    torch.library.register_autograd(lib + "gradicon_analytic_loss", _backward_gradicon_analytic,
                                    setup_context=_setup_gradicon_analytic)


_register()


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
