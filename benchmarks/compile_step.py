"""Time per step of the standard 3D network, eager against ``torch.compile(model)``, side by side.

One process, one model: a training step (train mode, Adam lr 5e-5) and an instance-optimisation
step (eval mode, Adam lr 2e-5, the official pipeline's step), each the full objective (forward,
backward, Adam) with the paper's widths. The eager and compiled steps alternate on two copies of
the same weights, so that both see the same machine load. The first compiled step of each mode
includes compilation: ``compile_s`` is its time minus the median compiled step.

    python benchmarks/compile_step.py --size 64 --steps 5 --threads 2

Writes a table to stdout and ``benchmarks/results/compile_step_cpu.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import gradicon_fast.nn as gnn

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"train": (True, 5e-5), "instance-optimisation": (False, 2e-5)}


def _step(model, optimizer, image_A, image_B, generator) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(image_A, image_B, generator=generator).total.backward()
    optimizer.step()
    return time.perf_counter() - start


def measure(size: int, steps: int, mode: str) -> dict:
    training, lr = MODES[mode]
    torch.manual_seed(0)
    eager = gnn.standard_network((size,) * 3)
    compiled_weights = copy.deepcopy(eager)
    eager.train(training)
    compiled_weights.train(training)
    compiled = torch.compile(compiled_weights)
    image_A, image_B = torch.rand(1, 1, size, size, size), torch.rand(1, 1, size, size, size)
    opt_eager = torch.optim.Adam(eager.parameters(), lr=lr)
    opt_compiled = torch.optim.Adam(compiled_weights.parameters(), lr=lr)
    gen_eager, gen_compiled = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    first = _step(compiled, opt_compiled, image_A, image_B, gen_compiled)  # compiles
    _step(eager, opt_eager, image_A, image_B, gen_eager)                  # warm-up
    times_eager, times_compiled = [], []
    for _ in range(steps):
        times_eager.append(_step(eager, opt_eager, image_A, image_B, gen_eager))
        times_compiled.append(_step(compiled, opt_compiled, image_A, image_B, gen_compiled))
    eager_s, compiled_s = statistics.median(times_eager), statistics.median(times_compiled)
    return dict(mode=mode, size=size, steps=steps, eager_s=eager_s, compiled_s=compiled_s,
                speedup=eager_s / compiled_s, compile_s=first - compiled_s, times_eager=times_eager,
                times_compiled=times_compiled)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="cubic image side (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode and side (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(args.size, args.steps, mode) for mode in args.modes.split(",")]
    print("| step | size | eager s | compiled s | speed-up | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['size']}³ | {r['eager_s']:.2f} | {r['compiled_s']:.2f} | {r['speedup']:.2f}x "
              f"| {r['compile_s']:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    blob = dict(rows=rows, torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    (RESULTS / "compile_step_cpu.json").write_text(json.dumps(blob, indent=1) + "\n")


if __name__ == "__main__":
    main()
