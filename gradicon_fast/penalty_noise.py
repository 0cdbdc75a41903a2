"""The penalties' random points when no ``noise`` is given: drawn per call, eager or compiled alike.

Eager, a call draws from ``generator`` (default: the global generator): a seed for the fused
kernels (``torch.randint`` on the generator's device, CPU without one), or ``torch.randn`` noise
for the reference. Under ``torch.compile`` neither works as it is: a graph can hold no
``torch.Generator``, and a seed read from a tensor inside a graph is symbolic where the compiled
ops take a Python int. So there the ops get explicit noise, made by the opaque op
``gradicon_fast_noise::draw`` that runs when the graph runs: it draws the same numbers from the
same generator as the eager call (the fused kernels' noise for a seed is ``normal_noise(seed)``,
bit for bit), advances the generator the same way, and is registered as effectful, so that the
compiler neither merges two draws nor moves one past another.

The graph knows the generator by a key fixed when it is traced, and is guarded on the
generator's identity: reuse one generator across calls (re-seed it with ``manual_seed``); a new
generator object makes Dynamo compile the function again. The generators a graph was traced with
are kept alive here, so that no other object can take their identity.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .backend_registry import fused_ops

Tensor = torch.Tensor

_SEED_BOUND = 2**62
_traced_generators: dict[int, torch.Generator] = {}  # key (the generator's id) -> generator; 0 is "none given"


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed for the fused kernels' noise, drawn from ``generator`` (default: the global CPU generator)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, _SEED_BOUND, (1,), generator=generator, device=device).item())


def randn_noise(generator: torch.Generator | None, shape: Sequence[int], dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """The reference's noise: ``torch.randn`` on the generator's device (else ``device``), moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=where).to(device)


def seeded_noise(seed: int, backend: str, d: int, points_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """The noise a fused backend's kernels draw from ``seed`` themselves."""
    return fused_ops(backend).normal_noise(seed, d, points_shape, dtype=dtype, device=device)


def _generator_key(generator: torch.Generator | None) -> int:
    # Dynamo calls this while tracing, with the real generator, and guards the graph on its identity.
    if generator is None:
        return 0
    _traced_generators[id(generator)] = generator
    return id(generator)


# What torch.compiler.assume_constant_result(_generator_key) sets, without importing torch._dynamo
# here: that imports triton, and Triton's interpreter must be chosen (TRITON_INTERPRET) before it is.
_generator_key._dynamo_marked_constant = True


@torch.library.custom_op("gradicon_fast_noise::draw", mutates_args=())
def _draw(generator_key: int, backend: str, d: int, points_shape: list[int], dtype: torch.dtype,
          device: torch.device) -> Tensor:
    generator = _traced_generators[generator_key] if generator_key else None
    shape = (1, d, *points_shape)
    if backend == "torch":
        return randn_noise(generator, shape, dtype, device)
    return seeded_noise(draw_seed(generator), backend, d, points_shape, dtype, device)


@_draw.register_fake
def _(generator_key, backend, d, points_shape, dtype, device):
    return torch.empty((1, d, *points_shape), dtype=dtype, device=device)


# Each draw advances a generator: never merged with an identical-looking draw, dropped or reordered.
_draw.register_effect(torch.library.EffectType.ORDERED)


def compiled_noise(generator: torch.Generator | None, backend: str, d: int, points_shape: Sequence[int],
                   like: Tensor) -> Tensor:
    """Under ``torch.compile``: the (1, d, *points_shape) noise the eager call would use, drawn when the graph runs."""
    return _draw(_generator_key(generator), backend, d, [int(s) for s in points_shape], like.dtype, like.device)
