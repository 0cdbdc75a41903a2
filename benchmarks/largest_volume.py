"""The largest cubic volume whose training step fits a memory limit: gradicon_fast with
``--memory-budget`` beside the official ``icon_registration`` package.

    python -m benchmarks.largest_volume --limit 18GB                     # all sides, CPU
    python -m benchmarks.largest_volume --limit 18GB --side official --low 160 --high 224
    python -m benchmarks.largest_volume --limit 18GB --launcher "flock /tmp/gradicon_bigmem.lock"

Each measurement is one training step of the standard 4-step network (the paper's widths, LNCC
σ=5, sparse GradICON λ=1.5, Adam, batch 1, random images) in a fresh process, whose peak resident
memory (``VmHWM``, from the process's start: interpreter, libraries, weights, Adam's state and
the step) must stay within the limit; a watchdog stops a process as it passes the limit, so a
size far above it costs little and cannot exhaust the machine.

- **official**: ``GradientICONSparse`` around the official network (built as
  ``benchmarks/official.py`` builds it), training mode, one Adam step.
- **gradicon_fast**: ``gradicon_fast.train.choose_configuration`` (what ``--memory-budget``
  runs). It finds a configuration exactly when its leanest candidate fits, so the search probes
  that candidate alone (bfloat16 autocast where native + full activation checkpointing +
  channels-last, micro-batch 1); at the largest size found the full chooser runs and reports
  what ``--memory-budget`` picks there (``--choose-at-largest``).
- **fast_settings**: gradicon_fast with the fast settings (``gradicon_fast.nn.fast_defaults``:
  bfloat16 autocast where native, selective checkpointing, channels-last; the first candidate of
  ``--memory-budget`` where bfloat16 is native), micro-batch 1: the largest cube that trains at
  full speed.

The search is a bisection over multiples of ``--granularity`` between ``--low`` (expected to fit)
and ``--high`` (expected not to; both are checked first). Results: a table on stdout and
``benchmarks/results/largest_volume_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from . import environment
from .report import RESULTS_DIR

SIDES = ("official", "gradicon_fast", "fast_settings")
# The gradicon_fast settings measured, as TrainConfig options: the chooser's leanest candidate where
# bfloat16 is native, and its first (gradicon_fast.nn.fast_defaults).
GRADICON_FAST_SETTINGS = {
    "gradicon_fast": {"amp": "auto", "checkpoint_activations": True, "channels_last": True},
    "fast_settings": {"amp": "auto", "checkpoint_activations": "selective", "channels_last": True},
}


# ---- the official side's step, in a fresh process ------------------------------------------


def official_worker(spec: dict) -> dict:
    from gradicon_fast.train.memory_probe import first_to_go, peak_resident_bytes, watch_resident_memory

    first_to_go()
    threading.Thread(target=watch_resident_memory, args=(int(spec["limit_bytes"]),), daemon=True).start()
    from .official import image_pair, official_loss

    torch.set_num_threads(int(spec["threads"]))
    shape = (int(spec["size"]),) * 3
    torch.manual_seed(0)
    loss = official_loss(shape)
    loss.train()
    optimizer = torch.optim.Adam(loss.regis_net.parameters(), lr=5e-5)
    for p in loss.regis_net.parameters():  # Adam's state as after a first step (zero update)
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    A, B = image_pair(shape)
    start = time.perf_counter()
    loss(A, B).all_loss.backward()
    optimizer.step()
    return {"completed": True, "need_bytes": peak_resident_bytes(), "seconds": time.perf_counter() - start}


def official_step(size: int, limit_bytes: int, launcher: list[str], threads: int) -> dict:
    from gradicon_fast.train.memory_probe import STOPPED

    spec = {"size": size, "limit_bytes": limit_bytes, "threads": threads}
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([*launcher, sys.executable, "-m", "benchmarks.largest_volume", "--official-worker",
                           json.dumps(spec)], capture_output=True, text=True, env=env, cwd=root)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == STOPPED and lines:
        return {"size": size, "fits": False, "more_than_bytes": json.loads(lines[-1])["limit_bytes"]}
    if proc.returncode != 0 or not lines:
        return {"size": size, "fits": False, "error": f"exit status {proc.returncode}: {proc.stderr[-500:]}"}
    result = json.loads(lines[-1])
    return {"size": size, "fits": result["need_bytes"] <= limit_bytes, "need_bytes": result["need_bytes"],
            "step_seconds": result["seconds"]}


# ---- the gradicon_fast side ------------------------------------------------------------------


def _model(size: int):
    import gradicon_fast.nn as gnn

    torch.manual_seed(0)
    return gnn.standard_network((size,) * 3)


def gradicon_fast_step(side: str, size: int, limit_bytes: int, launcher: list[str]) -> dict:
    """One probe step of ``side``'s setting (GRADICON_FAST_SETTINGS) at ``size``³, micro-batch 1."""
    from gradicon_fast.train import TrainConfig
    from gradicon_fast.train.memory_budget import Candidate, Setting, probe

    config = TrainConfig(batch_size=1, device="cpu")
    candidate = Candidate(Setting(GRADICON_FAST_SETTINGS[side]), 1, 1)
    result = probe(_model(size), candidate, config, limit_bytes, launcher=launcher)
    out = {"size": size, "fits": result.fits, "need_bytes": result.need_bytes,
           "more_than_bytes": result.more_than_bytes, "step_seconds": result.seconds,
           "configuration": candidate.describe(config)}
    if result.more_than_bytes is not None and result.more_than_bytes < limit_bytes:
        # the probe's limit is capped by the memory the machine had free: no verdict about the limit
        out["inconclusive"] = "stopped below the limit: the machine had less memory free"
    return out


def gradicon_fast_choice(size: int, limit_bytes: int, launcher: list[str]) -> dict:
    from gradicon_fast.train import MemoryBudgetError, TrainConfig, choose_configuration

    config = TrainConfig(batch_size=1, device="cpu")
    try:
        choice = choose_configuration(_model(size), limit_bytes, config, launcher=launcher,
                                      log=lambda line: print(f"    {line}", flush=True))
    except MemoryBudgetError as e:
        return {"size": size, "fits": False, "error": str(e)}
    return {"size": size, "fits": True, **choice.to_dict(config)}


# ---- the search ------------------------------------------------------------------------------


def search(measure, low: int, high: int, granularity: int) -> tuple[int | None, list[dict]]:
    """Largest multiple of ``granularity`` in [low, high) for which ``measure(size)["fits"]``."""
    trials = []

    def fits(size):
        result = measure(size)
        trials.append(result)
        need = result.get("need_bytes")
        print(f"  {size}^3: {'fits' if result['fits'] else 'does not fit'}"
              + (f", needs {need / 1e9:.2f} GB" if need else "")
              + (f", {result['step_seconds']:.0f} s" if result.get("step_seconds") else ""), flush=True)
        return result["fits"]

    if not fits(low):
        return None, trials
    if fits(high):
        return high, trials
    while high - low > granularity:
        middle = (low + high) // 2 // granularity * granularity
        if middle <= low:
            break
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, trials


def measure_side(side: str, args, limit: int, launcher: list[str], low: int, high: int) -> dict:
    """``--sizes``: those sizes measured; otherwise the search (and, for gradicon_fast, the chooser at the
    largest size found)."""
    threads = torch.get_num_threads()
    if side == "official":
        measure = lambda size: official_step(size, limit, launcher, threads)  # noqa: E731
    else:
        measure = lambda size: gradicon_fast_step(side, size, limit, launcher)  # noqa: E731
    if args.sizes:
        trials = [measure(size) for size in args.sizes]
        for t in trials:
            print(f"  {t['size']}^3: {json.dumps(t)}", flush=True)
        return {"calibration": trials}
    largest, trials = search(measure, low, high, args.granularity)
    summary = {"largest_size": largest, "trials": trials}
    if side == "gradicon_fast" and largest is not None and args.choose_at_largest:
        print(f"  the chooser at {largest}^3:", flush=True)
        summary["choice_at_largest"] = gradicon_fast_choice(largest, limit, launcher)
    return summary


def save(output: Path, side: str, summary: dict, header: dict) -> None:
    """Merge one side's results into ``output`` (re-read first: runs of the two sides may overlap)."""
    result = json.loads(output.read_text()) if output.exists() else {"benchmark": "largest_volume", "sides": {}}
    result.update(header)
    entry = result["sides"].setdefault(side, {})
    if "calibration" in summary:
        entry.setdefault("calibration", []).extend(summary["calibration"])
    else:
        entry.update(summary)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, output)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.largest_volume", description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", default="18GB", help="memory limit (default 18GB)")
    p.add_argument("--side", choices=(*SIDES, "all"), default="all",
                   help="official; gradicon_fast: the leanest --memory-budget candidate; fast_settings: gradicon_fast "
                   "with its fast settings; all (default)")
    p.add_argument("--low", type=int, nargs="+", default=None, metavar="N",
                   help="a size expected to fit (one, or one per side in the order official gradicon_fast "
                   "fast_settings)")
    p.add_argument("--high", type=int, nargs="+", default=None, metavar="N", help="a size expected not to fit")
    p.add_argument("--granularity", type=int, default=16)
    p.add_argument("--sizes", type=int, nargs="+", metavar="N", help="measure these sizes instead of searching "
                   "(gradicon_fast sides: one probe step each), e.g. to place --low and --high")
    p.add_argument("--choose-at-largest", action="store_true",
                   help="gradicon_fast: run the full chooser at the largest size found (every faster candidate "
                   "is probed first)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--launcher", default="", help="command prefix of each measured process, e.g. 'flock LOCK'")
    p.add_argument("--output", type=Path, default=None,
                   help="results file (default benchmarks/results/largest_volume_<device>.json; merged into)")
    p.add_argument("--official-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.official_worker:
        print(json.dumps(official_worker(json.loads(args.official_worker))), flush=True)
        return 0

    from gradicon_fast.train import parse_size

    limit = parse_size(args.limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    launcher = shlex.split(args.launcher)
    defaults = {"official": (160, 224), "gradicon_fast": (256, 352), "fast_settings": (224, 320)}
    env = environment.describe("cpu")
    output = args.output or RESULTS_DIR / f"largest_volume_{env['device_name']}.json"
    for k, side in enumerate(SIDES if args.side == "all" else (args.side,)):
        low = args.low[min(k, len(args.low) - 1)] if args.low else defaults[side][0]
        high = args.high[min(k, len(args.high) - 1)] if args.high else defaults[side][1]
        print(f"{side}: within {args.limit} ({limit / 1e9:.2f} GB)"
              + (f", sizes {args.sizes}" if args.sizes else f", searching {low}..{high}"), flush=True)
        summary = measure_side(side, args, limit, launcher, low, high)
        summary.update(date=env["date"], commit=env["git"]["commit"], dirty=env["git"]["dirty"],
                       load_average_after=list(os.getloadavg()))
        save(output, side, summary, {"environment": env, "limit": args.limit, "limit_bytes": limit})
        if "largest_size" in summary:
            print(f"{side}: largest {summary['largest_size']}^3 (results: {output})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
