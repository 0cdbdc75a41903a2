"""Benchmark cases: the ops, the problem sizes, the inputs, and what each backend runs.

A *size* ``N`` stands for the standard network's chain (docs/conventions.md §5): four displacement fields per
direction at ``ceil(N/4)³, ceil(N/2)³, N³, N³`` (U1 at ¼ resolution, U2 at ½, U3 and U4 at full),
on a loss / image grid of ``N³``. ``lung`` is N = 175: chains at 44³, 88³, 175³, 175³ and sparse
GradICON on 88³ points (shape 175³, stride 2), the paper's lung setting.

Every case is built from a seed, so the timing process and the memory-probe subprocesses
(``benchmarks.memprobe``) build bit-identical inputs. The displacement fields are smooth random
fields (low-resolution Gaussian noise upsampled trilinearly, scaled to a peak of ``amplitude`` in
[0, 1] units), so that the sampling kernels see the memory-access pattern of a real registration
rather than uniformly scattered reads; they all require grad.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import gradicon_fast as gf
from gradicon_fast import reference

Tensor = torch.Tensor

# op name -> one-line description (the table's legend).
OPS = {
    "gradicon_sparse": "GradICON (finite differences), sparse: stride 2, the paper's variant",
    "gradicon_dense": "GradICON (finite differences), dense: stride 1",
    "gradicon_analytic": "GradICON, analytic Jacobian, stride 2 (only where the API offers mode='analytic')",
    "icon": "ICON, both directions, dense",
    "transform_points": "the A->B chain evaluated at N³ points (identity + noise)",
    "warp": "a 1-channel N³ image warped by the A->B chain onto its own grid",
    "compose": "the A->B chain materialised as one N³ displacement field",
}
PAIR_OPS = ("gradicon_sparse", "gradicon_dense", "gradicon_analytic", "icon")

# preset name -> N
PRESETS = {"tiny": 12, "small": 48, "medium": 96, "lung": 175}

REFERENCE = "torch"
COMPILED = "torch-compile"
ALL_BACKENDS = ("torch", "cpu", "cuda", "triton", COMPILED)


@dataclasses.dataclass(frozen=True)
class Size:
    """A problem size: its label in the tables and the full-resolution side N."""

    label: str
    n: int

    @property
    def field_sides(self) -> tuple[int, ...]:
        n = self.n
        return (math.ceil(n / 4), math.ceil(n / 2), n, n)

    def default_repeat_warmup(self) -> tuple[int, int]:
        """Timed repetitions and warm-up runs per backend when the command line does not say."""
        if self.n <= 24:
            return 3, 1
        if self.n <= 64:
            return 10, 2
        if self.n <= 128:
            return 5, 1
        return 3, 1  # lung scale: the reference takes seconds per forward+backward

    def to_dict(self) -> dict:
        return {"label": self.label, "n": self.n, "field_sides": list(self.field_sides)}


def parse_size(spec: str) -> Size:
    """``tiny``/``small``/``medium``/``lung`` or an integer N >= 4."""
    spec = spec.strip()
    if spec in PRESETS:
        return Size(spec, PRESETS[spec])
    try:
        n = int(spec)
    except ValueError:
        raise ValueError(f"size must be one of {', '.join(PRESETS)} or an integer, got {spec!r}") from None
    if n < 4:
        raise ValueError(f"size must be >= 4, got {n}")
    return Size(str(n), n)


def analytic_supported() -> bool:
    """Whether gf.gradicon_loss accepts mode='analytic' (being added by a colleague)."""
    chain = [torch.zeros(1, 3, 2, 2, 2, requires_grad=True)]
    try:
        gf.gradicon_loss(chain, chain, shape=(4, 4, 4), stride=2, mode="analytic", backend="torch",
                         noise=torch.zeros(1, 3, 2, 2, 2))
    except (ValueError, TypeError, NotImplementedError):
        return False
    return True


def default_ops() -> list[str]:
    return [op for op in OPS if op != "gradicon_analytic" or analytic_supported()]


def backend_runnable(name: str, device: str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` tensors here, or None."""
    if name == COMPILED:
        return None if hasattr(torch, "compile") else "torch.compile is not available"
    if name not in ALL_BACKENDS:
        return f"unknown backend {name!r}; known: {', '.join(ALL_BACKENDS)}"
    from gradicon_fast import backend_registry

    reason = backend_registry.unavailable_reason(name)
    if reason is not None:
        return reason
    if name == "cpu" and device != "cpu":
        return "the 'cpu' backend runs on CPU tensors"
    if name == "cuda" and device != "cuda":
        return "the 'cuda' backend runs on CUDA tensors"
    if name == "triton" and device == "cpu" and not backend_registry.triton_interpreted():
        return "the 'triton' backend runs on CPU tensors only under TRITON_INTERPRET=1"
    return None


def default_backends(device: str) -> list[str]:
    """The reference plus every fused backend that can run on ``device`` here."""
    candidates = ("torch", "cpu", "triton") if device == "cpu" else ("torch", "cuda", "triton")
    return [b for b in candidates if backend_runnable(b, device) is None]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def smooth_field(batch: int, channels: int, side: int, amplitude: float, generator: torch.Generator) -> Tensor:
    """(batch, channels, side, side, side): low-resolution noise upsampled, peak |value| = amplitude."""
    coarse = max(2, math.ceil(side / 8))
    low = torch.randn((batch, channels, coarse, coarse, coarse), generator=generator, dtype=torch.float64)
    field = F.interpolate(low, size=(side, side, side), mode="trilinear", align_corners=True)
    field = field * (amplitude / field.abs().amax().clamp_min(1e-12))
    return field.to(torch.float32).contiguous()


@dataclasses.dataclass
class Inputs:
    chain_ab: list[Tensor]
    chain_ba: list[Tensor]
    shape: tuple[int, int, int]
    points: Tensor | None = None  # transform_points
    image: Tensor | None = None  # warp
    noise: Tensor | None = None  # pair ops with --explicit-noise
    grad_output: Tensor | None = None  # non-scalar outputs: the upstream gradient of backward

    @property
    def grad_inputs(self) -> list[Tensor]:
        """The tensors gradients are taken for: every field the op reads."""
        return [t for t in self.chain_ab + self.chain_ba if t.requires_grad]

    def tensors(self) -> list[Tensor]:
        extra = [t for t in (self.points, self.image, self.noise, self.grad_output) if t is not None]
        return self.chain_ab + self.chain_ba + extra


@dataclasses.dataclass(frozen=True)
class Case:
    """One (op, size, batch) problem on one device; everything needed to rebuild its inputs."""

    op: str
    size: Size
    batch: int = 1
    device: str = "cpu"
    amplitude: float = 0.03
    explicit_noise: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; known: {', '.join(OPS)}")

    @property
    def name(self) -> str:
        return f"{self.op}/{self.size.label}/b{self.batch}"

    @property
    def pair(self) -> bool:
        return self.op in PAIR_OPS

    @property
    def stride(self) -> int:
        return 1 if self.op in ("gradicon_dense", "icon") else 2

    @property
    def points_shape(self) -> tuple[int, ...]:
        n = self.size.n
        if self.op in ("gradicon_sparse", "gradicon_analytic"):
            return reference.loss_points_shape((n, n, n), 2)
        return (n, n, n)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["size"] = self.size.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Case":
        data = dict(data)
        size = data.pop("size")
        return cls(size=Size(size["label"], int(size["n"])), **data)

    def describe(self) -> dict:
        """What the case computes, for the JSON and the legend."""
        sides = "³, ".join(str(s) for s in self.size.field_sides) + "³"
        n = self.size.n
        pts = "x".join(str(s) for s in self.points_shape)
        text = {
            "gradicon_sparse": f"chains 2x[{sides}], loss on {n}³ stride 2 ({pts} points)",
            "gradicon_dense": f"chains 2x[{sides}], loss on {n}³ ({pts} points)",
            "gradicon_analytic": f"chains 2x[{sides}], analytic, loss on {n}³ stride 2 ({pts} points)",
            "icon": f"chains 2x[{sides}], loss on {n}³ ({pts} points)",
            "transform_points": f"chain [{sides}] at {pts} points",
            "warp": f"chain [{sides}], 1-channel {n}³ image",
            "compose": f"chain [{sides}] onto {n}³",
        }[self.op]
        return {"op": self.op, "summary": OPS[self.op], "detail": text, "points_shape": list(self.points_shape)}

    def build(self) -> Inputs:
        """The case's inputs on its device: deterministic in ``seed``, fields requiring grad."""
        g = torch.Generator().manual_seed(self.seed)
        n = self.size.n
        amp = self.amplitude

        def chain() -> list[Tensor]:
            return [smooth_field(self.batch, 3, s, amp, g) for s in self.size.field_sides]

        chain_ab = chain()
        chain_ba = chain() if self.pair else []
        inputs = Inputs(chain_ab=chain_ab, chain_ba=chain_ba, shape=(n, n, n))
        if self.op == "transform_points":
            identity = reference.identity_map((n, n, n))
            inputs.points = identity + torch.randn(identity.shape, generator=g) / n
        elif self.op == "warp":
            inputs.image = smooth_field(self.batch, 1, n, 1.0, g)
        if self.pair and self.explicit_noise:
            inputs.noise = torch.randn((1, 3, *self.points_shape), generator=g)
        if self.op in ("transform_points", "compose"):
            inputs.grad_output = torch.randn((self.batch, 3, n, n, n), generator=g)
        elif self.op == "warp":
            inputs.grad_output = torch.randn((self.batch, 1, n, n, n), generator=g)

        def move(t: Tensor | None, grad: bool = False) -> Tensor | None:
            if t is None:
                return None
            return t.to(self.device).contiguous().requires_grad_(grad)

        inputs.chain_ab = [move(t, True) for t in inputs.chain_ab]
        inputs.chain_ba = [move(t, True) for t in inputs.chain_ba]
        inputs.points = move(inputs.points)
        inputs.image = move(inputs.image)
        inputs.noise = move(inputs.noise)
        inputs.grad_output = move(inputs.grad_output)
        return inputs


def nbytes(tensors: Sequence[Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def output_bytes(case: Case) -> int:
    """Bytes of the op's output (a scalar for the losses)."""
    if case.pair:
        return 4
    n = case.size.n
    channels = 1 if case.op == "warp" else 3
    return 4 * case.batch * channels * n ** 3


def byte_counts(case: Case, inputs: Inputs) -> dict:
    """Sizes of what the case holds, and the bytes that must move per pass (see BENCHMARKS.md).

    Lower bound on memory traffic of a fused implementation: in each pass (forward, backward)
    every input tensor is read once; the forward writes the output; the backward reads the
    upstream gradient and writes each field's gradient once. Identity points and noise drawn
    in-kernel from a seed cost nothing.
    """
    fields = nbytes(inputs.chain_ab + inputs.chain_ba)
    grads = nbytes(inputs.grad_inputs)
    other = nbytes([inputs.points, inputs.image, inputs.noise])
    out = output_bytes(case)
    grad_out = nbytes([inputs.grad_output]) if inputs.grad_output is not None else 4
    fwd = fields + other + out
    bwd = fields + other + grad_out + grads
    return {
        "field_bytes": fields,
        "grad_bytes": grads,
        "input_bytes": nbytes(inputs.tensors()),
        "output_bytes": out,
        "moved_bytes_fwd": fwd,
        "moved_bytes_fwd_bwd": fwd + bwd,
    }


# --------------------------------------------------------------------------------------------
# What each backend runs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Callables:
    forward: Callable[[], Tensor]  # the op's forward, autograd recording (as in training)
    forward_backward: Callable[[], tuple[Tensor, ...]]  # forward, then the gradients of every field


def _forward_public(case: Case, inputs: Inputs, backend: str) -> Callable[[], Tensor]:
    shape = inputs.shape
    if case.pair:
        generator = torch.Generator(device=case.device).manual_seed(case.seed + 1)
        noise = inputs.noise
        ab, ba = inputs.chain_ab, inputs.chain_ba
        if case.op == "icon":
            return lambda: gf.icon_loss(ab, ba, shape=shape, noise=noise, generator=generator, backend=backend)
        kwargs = {"mode": "analytic"} if case.op == "gradicon_analytic" else {}
        return lambda: gf.gradicon_loss(ab, ba, shape=shape, stride=case.stride, noise=noise,
                                        generator=generator, backend=backend, **kwargs)
    chain = inputs.chain_ab
    if case.op == "transform_points":
        points = inputs.points
        return lambda: gf.transform_points(chain, points, backend=backend)
    if case.op == "warp":
        image = inputs.image
        return lambda: gf.warp(image, chain, backend=backend)
    if case.op == "compose":
        return lambda: gf.compose(chain, shape, backend=backend)
    raise AssertionError(case.op)


def _forward_compiled(case: Case, inputs: Inputs) -> Callable[[], Tensor]:
    """The reference's own functions under torch.compile; noise is drawn outside the graph."""
    shape = inputs.shape
    compile_ = lambda fn: torch.compile(fn, dynamic=False)  # noqa: E731
    if case.pair:
        generator = torch.Generator(device=case.device).manual_seed(case.seed + 1)
        points_shape = case.points_shape
        ab, ba = inputs.chain_ab, inputs.chain_ba

        def draw() -> Tensor:
            if inputs.noise is not None:
                return inputs.noise
            return torch.randn((1, 3, *points_shape), generator=generator, device=case.device)

        if case.op == "icon":
            fn = compile_(lambda a, b, noise: reference.icon_loss(a, b, shape=shape, noise=noise))
        elif case.op == "gradicon_analytic":
            analytic = getattr(reference, "gradicon_loss_analytic")
            fn = compile_(lambda a, b, noise: analytic(a, b, shape=shape, noise=noise, stride=2))
        else:
            stride = case.stride
            fn = compile_(lambda a, b, noise: reference.gradicon_loss(a, b, shape=shape, noise=noise, stride=stride))
        return lambda: fn(ab, ba, draw())
    chain = inputs.chain_ab
    if case.op == "transform_points":
        fn = compile_(reference.transform_points)
        points = inputs.points
        return lambda: fn(chain, points)
    if case.op == "warp":
        fn = compile_(reference.warp)
        image = inputs.image
        return lambda: fn(image, chain, shape)
    if case.op == "compose":
        fn = compile_(reference.compose)
        return lambda: fn(chain, shape)
    raise AssertionError(case.op)


def make_callables(case: Case, inputs: Inputs, backend: str) -> Callables:
    forward = _forward_compiled(case, inputs) if backend == COMPILED else _forward_public(case, inputs, backend)
    wrt = inputs.grad_inputs
    grad_output = inputs.grad_output

    def forward_backward() -> tuple[Tensor, ...]:
        out = forward()
        return torch.autograd.grad(out, wrt, grad_outputs=grad_output)

    return Callables(forward=forward, forward_backward=forward_backward)
