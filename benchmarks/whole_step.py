"""Whole training and instance-optimisation steps: the official package beside gradicon_fast's settings.

    python -m benchmarks steps                               # 175³, both phases, official + 3 settings
    python -m benchmarks steps --size 65 --phases io --settings default --rounds 1   # a quick run
    python -m benchmarks steps --lock /tmp/bigmem.lock       # each process under flock (shared machines)

One official-format weight file of the paper's 4-step network (random weights, non-zero last
layers: :func:`benchmarks.official.write_weights`) is written once; every (side, phase) then runs
in its own fresh process that loads it, builds the same pair of smooth random images and runs

- **io** (instance optimisation): the network in eval mode, Adam (lr 2e-5) on every weight, the full
  objective (LNCC σ=5 both directions + 1.5 · GradICON), as the official ``finetune_execute`` and
  gradicon_fast's ``instance_optimize`` do;
- **train** (a training step): the same in train mode (BatchNorm batch statistics), Adam lr 5e-5.

A process makes one warm-up step (Adam's state is allocated, oneDNN primitives are created), then
``--steps`` timed steps. Reported per step: wall seconds (median), CPU seconds of the process, and
the **step memory**: the process's peak RSS during the timed steps above its RSS when they start
(``VmHWM`` reset through ``/proc/self/clear_refs``), i.e. what a step adds to a process that already
holds weights, images and optimiser state; the process peak too.

gradicon_fast runs in each of ``--settings`` (``gradicon_fast.nn.configure`` options, see
:data:`SETTINGS`). Processes alternate official / gradicon_fast settings within a round and the
order is reversed each round, so that a change of machine load falls on both sides; the load
average is recorded around every process. Results: a table and
``benchmarks/results/<device>-steps.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import environment
from .measure import MB, read_status, reset_peak_rss
from .official import MIN_SIZE, GradiconFastSide, OfficialSide, image_pair, write_weights
from .report import RESULTS_DIR

PHASES = {"io": 2e-5, "train": 5e-5}  # learning rates: the official instance-optimisation and training defaults
# gradicon_fast settings: gradicon_fast.nn.configure keyword arguments ("default": nn.fast_defaults)
SETTINGS = {
    "float32": dict(amp_dtype=None, checkpoint=False, channels_last=False),
    "default": dict(amp_dtype="auto", checkpoint="selective", channels_last=True),
    "float32-selective": dict(amp_dtype=None, checkpoint="selective", channels_last=True),
    "float32-checkpoint": dict(amp_dtype=None, checkpoint="full", channels_last=False),
    "bfloat16": dict(amp_dtype=torch.bfloat16, checkpoint=False, channels_last=True),
    "bfloat16-checkpoint": dict(amp_dtype=torch.bfloat16, checkpoint="full", channels_last=False),
}
OFFICIAL = "official"


# ---- one (side, phase) in a fresh process ---------------------------------------------------


def _side(spec: dict, shape):
    weights = Path(spec["weights"])
    if spec["setting"] == OFFICIAL:
        side = OfficialSide(weights, shape)
        module = side.loss
    else:
        side = GradiconFastSide(weights, shape)
        side.model.configure(**SETTINGS[spec["setting"]])
        module = side.model
    module.train(spec["phase"] == "train")  # io: eval mode, BatchNorm uses its running statistics
    return side


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    shape = (int(spec["size"]),) * 3
    side = _side(spec, shape)
    A, B = image_pair(shape)
    optimizer = torch.optim.Adam(side.parameters(), lr=PHASES[spec["phase"]])
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        total, _ = side.objective(A, B)
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))

    start = time.perf_counter()
    step()
    warmup = time.perf_counter() - start
    gc.collect()
    ok, _ = reset_peak_rss()
    baseline = read_status()["VmRSS"]
    walls, cpus = [], []
    for _ in range(int(spec["steps"])):
        start, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    peak = read_status()["VmHWM"]
    return {"setting": spec["setting"], "phase": spec["phase"], "size": spec["size"],
            "threads": torch.get_num_threads(), "warmup_seconds": warmup, "seconds": statistics.median(walls),
            "seconds_all": walls, "cpu_seconds": statistics.median(cpus), "baseline_mb": baseline / MB,
            "step_mb": (peak - baseline) / MB, "peak_mb": peak / MB, "peak_reset": ok, "losses": losses}


def run_process(spec: dict, lock: str | None, timeout: float | None) -> dict:
    """One (setting, phase) in a fresh interpreter (under ``flock lock`` when given); its JSON, or why it failed."""
    cmd = [sys.executable, "-m", "benchmarks.whole_step", "--worker", json.dumps(spec)]
    if lock:
        cmd = ["flock", lock] + cmd
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    described = {"setting": spec["setting"], "phase": spec["phase"], "size": spec["size"]}
    load_before = list(os.getloadavg())
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {**described, "ok": False, "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
        return {**described, "ok": False, "error": reason, "stderr": proc.stderr[-2000:]}
    result = json.loads(lines[-1])
    result.update(ok=True, load_before=load_before, load_after=list(os.getloadavg()))
    return result


# ---- the driver ----------------------------------------------------------------------------


def schedule(phases: list[str], settings: list[str], rounds: int) -> list[tuple[str, str]]:
    """(phase, setting) runs: per phase official and the settings alternating, reversed every other round."""
    runs = []
    for r in range(rounds):
        for phase in phases:
            order = [OFFICIAL] + settings
            runs += [(phase, s) for s in (order if r % 2 == 0 else order[::-1])]
    return runs


def summarise(runs: list[dict]) -> dict:
    """Per phase and setting: the median over rounds of step seconds and step MB, and ratios to the official."""
    out = {}
    for phase in dict.fromkeys(r["phase"] for r in runs):
        rows = {}
        for setting in dict.fromkeys(r["setting"] for r in runs if r["phase"] == phase):
            mine = [r for r in runs if r["phase"] == phase and r["setting"] == setting and r.get("ok")]
            rows[setting] = {key: statistics.median(r[key] for r in mine) if mine else None
                             for key in ("seconds", "cpu_seconds", "step_mb", "peak_mb")}
            rows[setting]["runs"] = len(mine)
        official = rows.get(OFFICIAL, {})
        for row in rows.values():
            both = row["seconds"] and official.get("seconds")
            row["speedup"] = official["seconds"] / row["seconds"] if both else None
            both = row["step_mb"] and official.get("step_mb")
            row["memory_ratio"] = row["step_mb"] / official["step_mb"] if both else None
        out[phase] = rows
    return out


def table(summary: dict) -> str:
    head = f"{'phase':<6}{'setting':<22}{'s/step':>9}{'CPU s':>9}{'step MB':>10}{'peak MB':>10}{'speed-up':>10}" \
           f"{'memory':>8}"
    lines = [head, "-" * len(head)]
    for phase, rows in summary.items():
        for setting, row in rows.items():
            if not row["runs"]:
                lines.append(f"{phase:<6}{setting:<22}  failed")
                continue
            speed = f"{row['speedup']:.2f}x" if row["speedup"] else ""
            memory = f"{row['memory_ratio']:.2f}x" if row["memory_ratio"] else ""
            lines.append(f"{phase:<6}{setting:<22}{row['seconds']:>9.1f}{row['cpu_seconds']:>9.1f}"
                         f"{row['step_mb']:>10.0f}{row['peak_mb']:>10.0f}{speed:>10}{memory:>8}")
    return "\n".join(lines)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks steps",
                                description="Whole training and instance-optimisation steps of the standard network: "
                                            "the official icon_registration package beside gradicon_fast's settings "
                                            "(see BENCHMARKS.md).")
    p.add_argument("--size", type=int, default=175, help=f"cubic side of the network grid (default 175; >= {MIN_SIZE})")
    p.add_argument("--phases", type=_csv, default=list(PHASES), help="comma list of io,train (default both)")
    p.add_argument("--settings", type=_csv, default=["float32", "default", "bfloat16-checkpoint"],
                   help=f"gradicon_fast settings, comma list of {', '.join(SETTINGS)} "
                        "(default float32,default,bfloat16-checkpoint)")
    p.add_argument("--no-official", action="store_true", help="leave out the official package")
    p.add_argument("--steps", type=int, default=1, help="timed steps per process after one warm-up (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="repetitions of the whole schedule (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process (default 2)")
    p.add_argument("--lock", default=None, help="run every process under `flock LOCK` (machines shared by big jobs)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each process")
    p.add_argument("--output", type=Path, default=None,
                   help="results JSON (default benchmarks/results/<device>-steps.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    if args.size < MIN_SIZE:
        p.error(f"--size must be >= {MIN_SIZE} (the official U-Net pools each axis 5 times), got {args.size}")
    for name, values, known in (("--phases", args.phases, PHASES), ("--settings", args.settings, SETTINGS)):
        unknown = [v for v in values if v not in known]
        if unknown or not values:
            p.error(f"{name}: unknown {', '.join(map(repr, unknown)) or 'empty list'} (choose from {', '.join(known)})")
    if args.steps < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--steps, --rounds and --threads must be >= 1")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    check_args(p, args)
    if not args.no_official:
        try:
            import icon_registration  # noqa: F401
        except ImportError:
            p.error("the official package is not installed (pip install --no-deps icon_registration) or give "
                    "--no-official")
    torch.set_num_threads(args.threads)
    env = environment.describe("cpu")
    result = {"benchmark": "steps", "device": env["device_name"], "environment": env,
              "config": {"size": args.size, "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
                         "phases": args.phases, "settings": {s: {k: str(v) for k, v in SETTINGS[s].items()}
                                                             for s in args.settings},
                         "command": " ".join(["python -m benchmarks steps"]
                                             + (sys.argv[2:] if argv is None else argv))},
              "runs": []}
    output = args.output or RESULTS_DIR / f"{result['device']}-steps.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    runs = schedule(args.phases, args.settings, args.rounds)
    if args.no_official:
        runs = [(phase, s) for phase, s in runs if s != OFFICIAL]
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "regis_net.trch"
        write_weights(weights, (args.size,) * 3)
        for phase, setting in runs:
            spec = {"setting": setting, "phase": phase, "size": args.size, "steps": args.steps,
                    "threads": args.threads, "weights": str(weights)}
            r = run_process(spec, args.lock, args.timeout)
            result["runs"].append(r)
            status = f"{r['seconds']:.1f} s/step, {r['step_mb']:.0f} MB/step" if r.get("ok") else r.get("error")
            print(f"{phase:<6}{setting:<22}{status}  (load {os.getloadavg()[0]:.1f})", flush=True)
            result["summary"] = summarise(result["runs"])
            tmp_out = output.with_suffix(".json.tmp")
            tmp_out.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp_out, output)  # rewritten after every process: an interrupted run keeps what it measured
    print()
    print(table(result["summary"]))
    print(f"\nresults: {output}")
    return 0 if all(r.get("ok") for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
