"""Peak-RSS probe for one (op, size, backend) on CPU, run in a fresh interpreter by the runner.

    python -m benchmarks.memprobe '{"case": {...}, "backend": "cpu", "threads": 2}'

Steps: warm up (the same op at a tiny size loads code, starts the OpenMP pool and fills
allocator bookkeeping; ``torch-compile`` warms up at the full size, since it must compile for
those shapes), build the inputs (written, hence touched), collect garbage, read the RSS, reset
``VmHWM`` through ``/proc/self/clear_refs`` and check that it dropped, run one forward+backward
keeping the gradients, read ``VmHWM``. Prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys

import torch

from .cases import COMPILED, Case, Size, byte_counts, make_callables
from .measure import MB, read_status, reset_peak_rss


def probe(case: Case, backend: str) -> dict:
    if backend == COMPILED:
        warm_case = case
    else:
        warm_case = dataclasses.replace(case, size=Size("warm-up", 8), batch=1)
    warm_inputs = warm_case.build()
    grads = make_callables(warm_case, warm_inputs, backend).forward_backward()
    del grads, warm_inputs
    gc.collect()

    inputs = case.build()
    counts = byte_counts(case, inputs)
    run = make_callables(case, inputs, backend)
    gc.collect()
    ok, detail = reset_peak_rss()
    before = read_status()["VmRSS"]
    result = {"method": "cpu-peak-rss", "supported": ok, "reset": detail}
    if not ok:
        return result
    grads = run.forward_backward()
    status = read_status()
    extra = status["VmHWM"] - before - counts["grad_bytes"]
    total = counts["field_bytes"] + counts["grad_bytes"]
    result.update({
        "baseline_bytes": before,
        "peak_bytes": status["VmHWM"],
        "rss_after_bytes": status["VmRSS"],
        "grad_bytes": counts["grad_bytes"],
        "returned_grad_bytes": sum(g.numel() * g.element_size() for g in grads),
        "extra_bytes": extra,
        "extra_mb": extra / MB,
        "extra_fraction": extra / total if total else None,
    })
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(argv[0])
    torch.set_num_threads(int(request["threads"]))
    case = Case.from_dict(request["case"])
    try:
        result = probe(case, request["backend"])
    except Exception as exc:  # reported to the runner, which records it
        result = {"method": "cpu-peak-rss", "supported": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
