"""Timing, peak memory and bandwidth measurements.

Timing: ``time.perf_counter`` around one call, with ``torch.cuda.synchronize()`` before and after
on CUDA. The backends of a case are interleaved repetition by repetition (ABC, BCA, CAB, ...) so
that a change in machine load hits them all alike; the reported figure is the median.

Memory "beyond the fields and their gradients":
  CUDA  in process: ``torch.cuda.max_memory_allocated()`` over one forward+backward, minus what
        was allocated before it (the inputs), minus the bytes of the gradients it returns.
  CPU   in a fresh subprocess per (op, size, backend) (``benchmarks.memprobe``): the peak RSS
        (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``) over one forward+backward,
        minus the RSS just before it (inputs allocated and touched), minus the gradient bytes.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from .environment import REPO_ROOT

MB = 1024 * 1024


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call of ``fn``, device work included; the result is dropped afterwards."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(values: list[float], key: str) -> dict:
    """``{key}_median_s`` (the reported figure), ``{key}_min_s`` and ``{key}_iqr_s`` (spread)."""
    out = {f"{key}_median_s": median(values), f"{key}_min_s": min(values) if values else None,
           f"{key}_iqr_s": None}
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        out[f"{key}_iqr_s"] = q[2] - q[0]
    return out


# --------------------------------------------------------------------------------------------
# Memory on CUDA (in process)
# --------------------------------------------------------------------------------------------


def cuda_memory(forward_backward: Callable[[], tuple], grad_bytes: int, field_bytes: int) -> dict:
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = forward_backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    returned = sum(g.numel() * g.element_size() for g in grads if g is not None)
    del grads
    extra = peak - before - grad_bytes
    return {
        "method": "cuda-max-memory-allocated",
        "supported": True,
        "baseline_bytes": before,
        "peak_bytes": peak,
        "grad_bytes": grad_bytes,
        "returned_grad_bytes": returned,
        "extra_bytes": extra,
        "extra_mb": extra / MB,
        "extra_fraction": extra / (field_bytes + grad_bytes) if field_bytes + grad_bytes else None,
    }


# --------------------------------------------------------------------------------------------
# Memory on CPU (fresh subprocess, peak RSS)
# --------------------------------------------------------------------------------------------


def read_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out


def reset_peak_rss() -> tuple[bool, str]:
    """Reset VmHWM to the current RSS; (verified, explanation).

    To check that the reset works, a 32 MB buffer is touched and freed first (unmapped at once
    under ``PROBE_ENV``), which lifts VmHWM above the RSS; after the reset VmHWM must have dropped
    back to the RSS.
    """
    slack = 4 * MB
    buffer = bytearray(32 * MB)  # zero-filled, so every page is touched
    del buffer
    before = read_status()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        return False, f"writing /proc/self/clear_refs failed: {exc}"
    after = read_status()
    detail = (f"VmHWM {before['VmHWM']} B -> {after['VmHWM']} B (RSS {before['VmRSS']} B -> {after['VmRSS']} B)")
    if after["VmHWM"] > after["VmRSS"] + slack:
        return False, "VmHWM was not reset by clear_refs: " + detail
    if before["VmHWM"] > before["VmRSS"] + slack and after["VmHWM"] >= before["VmHWM"]:
        return False, "VmHWM did not drop: " + detail
    return True, detail


# glibc: allocations above this go to mmap and are unmapped on free, so RSS follows live memory
# instead of a growing heap; fixed (not dynamic) because setting it disables the adaptive threshold.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def cpu_memory_subprocess(case_dict: dict, backend: str, threads: int, timeout: float = 7200) -> dict:
    """Run ``benchmarks.memprobe`` for one (case, backend) in a fresh interpreter; its JSON result."""
    env = dict(os.environ)
    env.update(PROBE_ENV)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    request = json.dumps({"case": case_dict, "backend": backend, "threads": threads})
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memprobe", request], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": "cpu-peak-rss", "supported": False, "error": f"memory probe timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"method": "cpu-peak-rss", "supported": False,
                "error": f"memory probe exited with {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# Bandwidth on CUDA
# --------------------------------------------------------------------------------------------


def copy_bandwidth(repeat: int = 20, max_bytes: int = 1 << 30) -> dict:
    """Device-to-device copy bandwidth: (bytes read + bytes written) / time of ``dst.copy_(src)``."""
    free, _ = torch.cuda.mem_get_info()
    size = min(max_bytes, free // 8) // 4 * 4
    src = torch.empty(size // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    moved = 2 * size
    t = statistics.median(times)
    return {"tensor_bytes": size, "moved_bytes": moved, "times_s": times, "median_s": t, "gb_per_s": moved / t / 1e9}


def bandwidth(moved_fwd: int, moved_fwd_bwd: int, fwd_s: float | None, fwd_bwd_s: float | None,
              copy_gbps: float | None) -> dict:
    out = {"moved_bytes_fwd": moved_fwd, "moved_bytes_fwd_bwd": moved_fwd_bwd,
           "fwd_gb_per_s": moved_fwd / fwd_s / 1e9 if fwd_s else None,
           "fwd_bwd_gb_per_s": moved_fwd_bwd / fwd_bwd_s / 1e9 if fwd_bwd_s else None}
    for key in ("fwd", "fwd_bwd"):
        value = out[f"{key}_gb_per_s"]
        out[f"{key}_fraction_of_copy"] = value / copy_gbps if value is not None and copy_gbps else None
    return out
