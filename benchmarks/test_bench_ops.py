"""pytest-benchmark suites of the same cases as ``python -m benchmarks``, for its statistics.

    pytest benchmarks/                                   # small size, every available backend
    GRADICON_BENCH_SIZE=tiny pytest benchmarks/ -k gradicon
    GRADICON_BENCH_DEVICE=cuda pytest benchmarks/ --benchmark-compare
    pytest benchmarks/ --benchmark-group-by=group        # one group per op and pass: backends side by side

Environment variables: ``GRADICON_BENCH_SIZE`` (a preset of ``benchmarks.cases.PRESETS`` or an
integer N; default ``small``), ``GRADICON_BENCH_DEVICE`` (``cpu``/``cuda``; default cuda when
available), ``GRADICON_BENCH_BACKENDS`` (comma-separated; default the reference plus every
available fused backend), ``GRADICON_BENCH_BATCH`` (default 1).

Not part of the default ``pytest`` run: pyproject's ``testpaths`` is ``tests``. A backend that
fails on its first call is skipped with the error as the reason (these are benchmarks; the
correctness tests live in ``tests/``).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import cases as C
from benchmarks.measure import synchronize

DEVICE = os.environ.get("GRADICON_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
SIZE = C.parse_size(os.environ.get("GRADICON_BENCH_SIZE", "small"))
BATCH = int(os.environ.get("GRADICON_BENCH_BATCH", "1"))
BACKENDS = ([b.strip() for b in os.environ["GRADICON_BENCH_BACKENDS"].split(",") if b.strip()]
            if os.environ.get("GRADICON_BENCH_BACKENDS") else C.default_backends(DEVICE))
OPS = C.default_ops()

_inputs: dict[str, tuple[C.Case, C.Inputs]] = {}


def _case(op: str) -> tuple[C.Case, C.Inputs]:
    if op not in _inputs:
        _inputs.clear()  # one op's inputs alive at a time (tests run op by op)
        case = C.Case(op=op, size=SIZE, batch=BATCH, device=DEVICE)
        _inputs[op] = (case, case.build())
    return _inputs[op]


def _prepare(op: str, backend: str, which: str):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = C.backend_runnable(backend, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    case, inputs = _case(op)
    calls = C.make_callables(case, inputs, backend)
    fn = calls.forward_backward if which == "fwd_bwd" else calls.forward
    try:
        fn()  # warm-up, and the place a backend that cannot run this op says so
    except Exception as exc:
        pytest.skip(f"{backend} failed on {op}: {type(exc).__name__}: {exc}")

    def run():
        out = fn()
        synchronize(DEVICE)
        return out

    return case, inputs, run


def _annotate(benchmark, case: C.Case, inputs: C.Inputs, backend: str, which: str) -> None:
    benchmark.group = f"{case.op} {case.size.label} {'forward+backward' if which == 'fwd_bwd' else 'forward'}"
    benchmark.extra_info.update({"op": case.op, "size": case.size.n, "batch": case.batch, "backend": backend,
                                 "device": DEVICE, "detail": case.describe()["detail"],
                                 **C.byte_counts(case, inputs)})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_forward_backward(benchmark, op, backend):
    case, inputs, run = _prepare(op, backend, "fwd_bwd")
    _annotate(benchmark, case, inputs, backend, "fwd_bwd")
    grads = benchmark(run)
    assert len(grads) == len(inputs.grad_inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_forward(benchmark, op, backend):
    case, inputs, run = _prepare(op, backend, "fwd")
    _annotate(benchmark, case, inputs, backend, "fwd")
    out = benchmark(run)
    assert out.requires_grad
