"""The machine and software a run was made on, and the device name its results file is called by."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def sanitize(text: str) -> str:
    """Lower-case, runs of anything but letters and digits become one '-'."""
    text = re.sub(r"\((r|tm|c)\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\b(cpu|processor)\b", "", text, flags=re.IGNORECASE)
    text = re.sub(r"@.*$", "", text)  # "... CPU @ 2.10GHz"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name(device: str) -> str | None:
    if device != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


def device_name(device: str) -> str:
    """``cpu-<model>-<N>threads`` or the sanitized CUDA device name (``nvidia-h200``)."""
    if device == "cuda":
        return sanitize(gpu_name(device) or "cuda")
    return f"cpu-{sanitize(cpu_model())}-{torch.get_num_threads()}threads"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def describe(device: str) -> dict:
    """Everything that identifies the run's conditions (stored in the results JSON)."""
    import gradicon_fast as gf

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "gradicon_fast": getattr(gf, "__version__", None),
        "gradicon_fast_backends": gf.backends(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "git": git_state(),
        "cuda": None,
    }
    try:
        env["load_average"] = list(os.getloadavg())
    except OSError:
        env["load_average"] = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["cuda"] = {
            "gpu_name": props.name,
            "gpu_memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "cuda_runtime": torch.version.cuda,
            "driver": _nvidia_smi_driver(),
        }
    return env


def _nvidia_smi_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
