"""Peak memory and step time of one training step of the standard 3D GradICON network.

Fused ops (backend ``cpu`` on CPUs, ``cuda``/``triton`` on GPUs) against the PyTorch reference
ops (backend ``torch``), each with and without bf16 autocast of the U-Nets and with and without
activation checkpointing. Every configuration runs in a fresh subprocess:

1. build ``standard_network((S, S, S))`` (4 steps, the paper's widths), Adam, random images;
2. one warm-up training step (forward, backward, Adam step: allocates the optimiser state);
3. reset the peak counter — CPU: write ``5`` to ``/proc/self/clear_refs`` (resets ``VmHWM``);
   GPU: ``torch.cuda.reset_peak_memory_stats`` — and read the baseline (RSS / allocated bytes);
4. ``--steps`` timed training steps; read the peak (``VmHWM`` / ``max_memory_allocated``).

Reported: ``peak_mb`` (the process's peak: weights, optimiser state, activations, workspace),
``step_mb`` (peak minus the baseline before the measured steps: what a step adds) and the median
step time. Results go to a table on stdout and to ``benchmarks/results/train_memory_<device>.json``
(merged with earlier runs by configuration and size).

    python benchmarks/train_memory.py --size 64                  # CPU, 8 configurations
    python benchmarks/train_memory.py --device cuda --size 175   # the lung size on a GPU
    python benchmarks/train_memory.py --device cuda --search-max --memory-limit-gb 80 \\
        --backends fused --amp --checkpoint                      # largest cube within 80 GB

``--search-max`` finds the largest cubic side (multiple of ``--granularity``) whose training
step at batch 1 succeeds within the memory limit (on GPUs the limit is enforced with
``torch.cuda.set_per_process_memory_fraction``; on CPUs a run counts as failed when its peak RSS
exceeds the limit).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MB = 2 ** 20


# ---- the measured worker (fresh process) ----------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    import torch

    sys.path.insert(0, str(HERE.parent))
    import gradicon_fast as gf
    import gradicon_fast.nn as gnn

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    on_gpu = device.type == "cuda"
    if on_gpu and spec.get("memory_limit_bytes"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_limit_bytes"] / total), device)
    backend = spec["backend"]
    if backend == "fused":
        backend = "cpu" if not on_gpu else ("cuda" if gf.backends()["cuda"] else "triton")
    size = int(spec["size"])
    shape = (size, size, size)
    torch.manual_seed(0)
    model = gnn.standard_network(shape, steps=spec.get("steps_net", 4), backend=backend)
    model.configure(amp_dtype=torch.bfloat16 if spec["amp"] else None, checkpoint=spec["checkpoint"])
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5)
    batch = int(spec.get("batch", 1))
    image_A = torch.rand((batch, 1, *shape), device=device)
    image_B = torch.rand((batch, 1, *shape), device=device)
    generator = torch.Generator().manual_seed(0)

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        terms = model(image_A, image_B, generator=generator)
        terms.total.backward()
        optimizer.step()
        return float(terms.total.detach())

    out = {"backend": backend, "size": size, "batch": batch, "amp": spec["amp"], "checkpoint": spec["checkpoint"],
           "device": str(device)}
    try:
        if spec.get("warmup", True):
            step()
        sync()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        else:
            out["peak_reset"] = _reset_cpu_peak()
            baseline = _status_bytes("VmRSS")
        times = []
        loss = None
        for _ in range(int(spec.get("steps", 1))):
            start = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if on_gpu else _status_bytes("VmHWM")
        out.update(ok=True, loss=loss, baseline_mb=baseline / MB, peak_mb=peak / MB, step_mb=(peak - baseline) / MB,
                   step_seconds=statistics.median(times), step_seconds_all=times,
                   memory_method="torch.cuda.max_memory_allocated" if on_gpu else "VmHWM (clear_refs 5)")
    except torch.OutOfMemoryError as e:
        out.update(ok=False, error=f"out of memory: {str(e).splitlines()[0]}")
    return out


# ---- the driver ---------------------------------------------------------------------------


def run_config(spec: dict, timeout: float | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**_describe(spec), "ok": False, "error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - start
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
        return {**_describe(spec), "ok": False, "error": reason, "stderr": proc.stderr[-2000:]}
    result = json.loads(lines[-1])
    result["wall_seconds"] = wall
    if spec.get("memory_limit_bytes") and result.get("ok") and result["peak_mb"] * MB > spec["memory_limit_bytes"]:
        result.update(ok=False, error="peak above the memory limit")
    return result


def _describe(spec: dict) -> dict:
    return {k: spec[k] for k in ("backend", "size", "batch", "amp", "checkpoint", "device") if k in spec}


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2 ** 30)
    return env


def table(results: list[dict]) -> str:
    head = f"{'backend':>8} {'amp':>5} {'ckpt':>5} {'size':>5} {'batch':>5} {'peak MB':>10} {'step MB':>10} {'step s':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.get("ok"):
            lines.append(f"{r['backend']:>8} {str(r['amp']):>5} {str(r['checkpoint']):>5} {r['size']:>5} "
                         f"{r['batch']:>5} {r['peak_mb']:>10.0f} {r['step_mb']:>10.0f} {r['step_seconds']:>8.2f}")
        else:
            lines.append(f"{r.get('backend', '?'):>8} {str(r.get('amp')):>5} {str(r.get('checkpoint')):>5} "
                         f"{r.get('size', '?'):>5} {r.get('batch', '?'):>5}   failed: {r.get('error')}")
    return "\n".join(lines)


def save(results: list[dict], device_kind: str, extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train_memory_{device_kind}.json"
    data = {"runs": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    key = lambda r: (r.get("backend"), r.get("amp"), r.get("checkpoint"), r.get("size"), r.get("batch"))
    fresh = {key(r) for r in results}
    data["runs"] = [r for r in data.get("runs", []) if key(r) not in fresh] + results
    data["environment"] = environment(device_kind)
    if extra:
        data.setdefault("search_max", []).append(extra)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def search_max(base: dict, args) -> dict:
    """Largest cubic side (multiple of granularity) that trains within the limit: doubling, then bisection."""
    g = args.granularity
    lo_ok, hi_bad = 0, None
    size = max(g, (args.size // g) * g)
    trials = []
    while hi_bad is None or hi_bad - lo_ok > g:
        if hi_bad is None and lo_ok:
            size = lo_ok * 2
        elif hi_bad is not None:
            size = ((lo_ok + hi_bad) // 2 // g) * g
            if size <= lo_ok:
                break
        r = run_config({**base, "size": size, "steps": 1}, args.timeout)
        trials.append(r)
        print(f"  size {size:>4}: {'ok' if r.get('ok') else 'failed (' + str(r.get('error')) + ')'}"
              + (f", peak {r['peak_mb']:.0f} MB, {r['step_seconds']:.2f} s/step" if r.get("ok") else ""), flush=True)
        if r.get("ok"):
            lo_ok = size
            if size >= args.max_size:
                break
        else:
            hi_bad = size
            if lo_ok == 0 and size <= g:
                break
    best = max((t for t in trials if t.get("ok")), key=lambda t: t["size"], default=None)
    return {"limit_gb": args.memory_limit_gb, "backend": base["backend"], "amp": base["amp"],
            "checkpoint": base["checkpoint"], "largest_size": best["size"] if best else None,
            "largest": best, "trials": trials}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="cubic side of the volume (default 64; 175 for lung)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="timed training steps after the warm-up step")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backends", default="fused,torch", help="comma list of fused,torch")
    p.add_argument("--amp", choices=["both", "on", "off"], default="both", nargs="?", const="on",
                   help="bf16 autocast of the U-Nets: both (default), on, off")
    p.add_argument("--checkpoint", choices=["both", "on", "off"], default="both", nargs="?", const="on",
                   help="activation checkpointing: both (default), on, off")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each worker (CPU)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    p.add_argument("--search-max", action="store_true", help="find the largest cube within --memory-limit-gb")
    p.add_argument("--memory-limit-gb", type=float, default=None)
    p.add_argument("--granularity", type=int, default=8)
    p.add_argument("--max-size", type=int, default=512)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    device_kind = "cuda" if args.device.startswith("cuda") else "cpu"
    choose = {"both": [False, True], "on": [True], "off": [False]}
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("fused", "torch"):
            p.error(f"unknown backend {b!r} (fused or torch)")
    limit = args.memory_limit_gb * 2 ** 30 if args.memory_limit_gb else None

    if args.search_max:
        if limit is None:
            if device_kind != "cuda":
                p.error("--search-max on a CPU needs --memory-limit-gb")
            import torch

            limit = torch.cuda.get_device_properties(0).total_memory
            args.memory_limit_gb = limit / 2 ** 30
        summaries = []
        for backend, amp, ckpt in itertools.product(backends, choose[args.amp], choose[args.checkpoint]):
            base = dict(device=args.device, backend=backend, amp=amp, checkpoint=ckpt, batch=1,
                        threads=args.threads, memory_limit_bytes=limit, warmup=True)
            print(f"search: backend={backend} amp={amp} checkpoint={ckpt} limit={args.memory_limit_gb:.1f} GB",
                  flush=True)
            summary = search_max(base, args)
            print(f"  largest: {summary['largest_size']}", flush=True)
            summaries.append(summary)
            if not args.no_save:
                save([t for t in summary["trials"] if t.get("ok")], device_kind,
                     {k: v for k, v in summary.items() if k != "trials"})
        print(json.dumps([{k: v for k, v in s.items() if k not in ("trials", "largest")} for s in summaries],
                         indent=2))
        return 0

    results = []
    for backend, amp, ckpt in itertools.product(backends, choose[args.amp], choose[args.checkpoint]):
        spec = dict(device=args.device, backend=backend, amp=amp, checkpoint=ckpt, size=args.size, batch=args.batch,
                    steps=args.steps, threads=args.threads, memory_limit_bytes=limit)
        r = run_config(spec, args.timeout)
        results.append(r)
        print(table([r]).splitlines()[-1], flush=True)
    print()
    print(table(results))
    if not args.no_save:
        print(f"\nwrote {save(results, device_kind)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
