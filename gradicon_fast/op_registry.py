"""The fused ops, declared once: each op's fake (meta) kernel and autograd formula, for every backend.

A backend is a ``torch.ops`` namespace that implements the ops of ``OPS`` under the same names:

* ``register_compiled(namespace, names)``: the compiled extension (``torch.ops.gradicon_fast``), whose
  schemas and CPU/CUDA kernels ``csrc/ops.cpp`` defines; this adds the fake kernels and autograd;
* ``register_python(namespace, implementations, traceable_op=...)``: ops written in Python (the
  Triton backend, ``torch.ops.gradicon_fast_triton``), defined here from their implementations (the
  schema inferred from their type annotations), then given the same fake kernels and autograd.

Every differentiable op ``name`` has a backward op ``name_backward`` that takes the upstream
gradient, the forward op's inputs, and one "needs grad" flag per differentiable input (a bool for a
tensor, a list of bools for a tensor list), and returns those inputs' gradients (an empty tensor
where none was wanted). The differentiable inputs are the op's first ones. The autograd formula
saves only the inputs and calls the backward op, which recomputes what it needs (the noise from
its seed): nothing else is kept between forward and backward. docs/op_layer.md has a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

Tensor = torch.Tensor


# ---- fake kernels: shapes only ----------------------------------------------------------------


def batch_size(*tensors: Tensor) -> int:
    """The batch size of an op on ``tensors`` (each batch B or 1); checked, as the kernels check it."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:  # the kernels check this too, but a meta tensor reaches the fake kernel instead
        raise RuntimeError(f"gradicon_fast: all tensors must be on one device, got {sorted(map(str, devices))}")
    batch = 1
    for t in tensors:
        b = t.shape[0]
        if b != batch and b != 1 and batch != 1:
            raise ValueError(f"batch sizes must be equal or 1, got {b} and {batch}")
        batch = max(batch, b)
    return batch


def _fake_gradient(t: Tensor, needed: bool) -> Tensor:
    return t.new_empty(t.shape) if needed else t.new_empty((0,))


def fake_input_gradients(inputs: Sequence[Any], needs: Sequence[Any]) -> tuple:
    """The gradients a backward op returns for ``inputs`` (tensors or tensor lists), shapes only."""
    return tuple([_fake_gradient(t, n) for t, n in zip(x, need)] if isinstance(x, (list, tuple))
                 else _fake_gradient(x, need) for x, need in zip(inputs, needs))


def _fake_transform_points(chain, points):
    return points.new_empty((batch_size(points, *chain), *points.shape[1:]))


def _fake_warp(image, chain, shape):
    return image.new_empty((batch_size(image, *chain), image.shape[1], *shape))


def _fake_penalty(chain_ab, chain_ba, *args):
    batch_size(*chain_ab, *chain_ba)
    return chain_ab[0].new_empty(())


def _fake_penalty_and_gradients(chain_ab, chain_ba, *args):
    return (_fake_penalty(chain_ab, chain_ba),) + fake_input_gradients((chain_ab, chain_ba), args[-2:])


def _fake_noise_into(out, seed):
    return None


def _fake_noise(seed, d, points_shape, dtype, device):
    return torch.empty((1, d, *points_shape), dtype=dtype, device=device)


# ---- the op table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedOp:
    """One op of the table.

    ``differentiable``: how many leading inputs get gradients (0: the op has no autograd formula);
    the op ``name + "_backward"`` computes them. ``traceable``: whether a Python backend may define
    it as an op that ``torch.compile`` traces into (see ``register_python``). Backward ops stay
    opaque: their kernels scatter to addresses computed from values they load, and torch's analysis
    of which tensors a traced kernel writes then counts every input as written (the fields, the
    noise), which breaks the compiled graph's autograd (a leaf "modified in place").
    ``fake``: the shape-only kernel; None for a backward op, whose fake is derived.
    """

    name: str
    fake: Callable | None = None
    differentiable: int = 0
    traceable: bool = True

    @property
    def backward(self) -> str:
        return self.name + "_backward"


def _with_backward(name: str, fake: Callable) -> tuple[FusedOp, FusedOp]:
    """A differentiable op (its first two inputs) and its backward op."""
    return FusedOp(name, fake, differentiable=2), FusedOp(name + "_backward", traceable=False)


OPS: dict[str, FusedOp] = {op.name: op for op in (
    *_with_backward("transform_points", _fake_transform_points),
    *_with_backward("warp", _fake_warp),
    *_with_backward("gradicon_loss", _fake_penalty),
    *_with_backward("gradicon_analytic_loss", _fake_penalty),
    *_with_backward("icon_loss", _fake_penalty),
    # The CPU GradICON loss and its gradients in one pass (used by gradicon_fast.ops, not autograd).
    FusedOp("gradicon_loss_and_grad", _fake_penalty_and_gradients),
    # The penalties' noise for a seed: into a given tensor (extension), or as a new tensor (Triton).
    FusedOp("normal_noise_", _fake_noise_into),
    FusedOp("normal_noise", _fake_noise),
)}


def _forward_op_of(backward_name: str) -> FusedOp | None:
    forward = OPS.get(backward_name.removesuffix("_backward"))
    return forward if forward is not None and forward.differentiable and forward.backward == backward_name else None


def fake_kernel(name: str) -> Callable:
    """The shape-only kernel of op ``name``; a backward op's comes from its forward op's inputs."""
    forward = _forward_op_of(name)
    if forward is None:
        return OPS[name].fake

    def fake_backward(grad, *args):
        return fake_input_gradients(args[:forward.differentiable], args[-forward.differentiable:])

    return fake_backward


# ---- the autograd formula, one for every differentiable op ------------------------------------


def _needs(flag, x) -> bool | list[bool]:
    """An input's "needs grad" flag(s) from ``ctx.needs_input_grad`` (one flag, or one per list entry)."""
    if isinstance(x, (list, tuple)):
        return [bool(n) for n in (flag if isinstance(flag, (list, tuple)) else [flag] * len(x))]
    return bool(flag)


def _wanted(grad, need):
    if isinstance(need, list):
        return [g if n else None for g, n in zip(grad, need)]
    return grad if need else None


def _save_inputs(ctx, inputs, output) -> None:
    """Saves the tensors among ``inputs`` (tensors, tensor lists, None) and keeps the other values."""
    tensors, layout = [], []
    for x in inputs:
        if isinstance(x, Tensor):
            layout.append(("tensor", None))
            tensors.append(x)
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
            layout.append(("tensors", len(x)))
            tensors.extend(x)
        else:
            layout.append(("value", list(x) if isinstance(x, (list, tuple)) else x))
    ctx.input_layout = layout
    ctx.save_for_backward(*tensors)


def _saved_inputs(ctx) -> list:
    saved, at, inputs = ctx.saved_tensors, 0, []
    for kind, value in ctx.input_layout:
        if kind == "tensor":
            inputs.append(saved[at])
            at += 1
        elif kind == "tensors":
            inputs.append(list(saved[at:at + value]))
            at += value
        else:
            inputs.append(value)
    return inputs


def _autograd_backward(backward_op, differentiable: int) -> Callable:
    def backward(ctx, grad):
        inputs = _saved_inputs(ctx)
        needs = [_needs(ctx.needs_input_grad[i], inputs[i]) for i in range(differentiable)]
        grads = backward_op(grad, *inputs, *needs)
        return (*[_wanted(g, n) for g, n in zip(grads, needs)], *[None] * (len(inputs) - differentiable))

    return backward


# ---- backends -----------------------------------------------------------------------------------


def _qualname(namespace: str, name: str) -> str:
    return f"{namespace}::{name}"


def op_exists(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return False
    return True


_registered: set[str] = set()  # the namespaces whose fake kernels and autograd are registered


def _register_autograd(namespace: str, names: Iterable[str]) -> None:
    library = getattr(torch.ops, namespace)
    for name in names:
        op = OPS[name]
        if op.differentiable:
            torch.library.register_autograd(
                _qualname(namespace, name), _autograd_backward(getattr(library, op.backward), op.differentiable),
                setup_context=_save_inputs)


def register_compiled(namespace: str, names: Iterable[str]) -> None:
    """Give the ops ``names`` of a compiled library (schemas and kernels defined in C++) their fake
    kernels and autograd; once per namespace."""
    if namespace in _registered:
        return
    _registered.add(namespace)
    names = list(names)
    for name in names:
        torch.library.register_fake(_qualname(namespace, name), fake_kernel(name))
    _register_autograd(namespace, names)


def register_python(namespace: str, implementations: Mapping[str, Callable],
                    traceable_op: Callable | None = None) -> set[str]:
    """Define the ops ``namespace::name`` from their Python ``implementations``, with fake kernels
    and autograd; once per namespace. Returns the names defined as traceable ops.

    ``traceable_op(qualname, fn, mutates_args=())`` (e.g. ``torch.library.triton_op``) defines the
    ops of the table marked traceable, which ``torch.compile`` then traces into (their fake kernel
    is the implementation run on fake tensors); the others, and all ops when it is None, are opaque
    ``custom_op``s with the table's fake kernel.
    """
    traced = {name for name in implementations if traceable_op is not None and OPS[name].traceable}
    # An earlier import of the backend's module under another name may have defined them already.
    if namespace in _registered or op_exists(namespace, next(iter(implementations))):
        return traced
    _registered.add(namespace)
    for name, fn in implementations.items():
        qualname = _qualname(namespace, name)
        if name in traced:
            traceable_op(qualname, fn, mutates_args=())
        else:
            torch.library.custom_op(qualname, fn, mutates_args=()).register_fake(fake_kernel(name))
    _register_autograd(namespace, implementations)
    return traced
