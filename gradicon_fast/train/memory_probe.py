"""One measured training step in a fresh process: the probe behind ``TrainConfig.memory_budget``.

    python -m gradicon_fast.train.memory_probe < spec.json    # prints one JSON line

The spec (written by :func:`gradicon_fast.train.memory_budget.probe`) names the model (its
``config``, backend, penalty stride), the training options of one candidate, the device and the
memory limits. The process builds the model and the :class:`Trainer`, allocates Adam's state
(one update with zero gradients: the weights do not move), then runs one ``train_step`` on
random images of the model's input shape and reports what it needed:

- CPU: the process's peak resident memory (``VmHWM`` in ``/proc/self/status``), from its start:
  interpreter, libraries, weights, Adam's state and the step. A watchdog thread stops the process
  (exit status 3, one JSON line) as soon as its resident memory passes ``limit_bytes``, so that a
  candidate far above the budget cannot exhaust the machine.
- CUDA: the caching allocator's peak reserved memory (``torch.cuda.max_memory_reserved``), with
  the process limited to the budget by ``torch.cuda.set_per_process_memory_fraction``; running
  out counts as not fitting.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import threading
import time

STOPPED = 3  # exit status: resident memory passed the limit
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def watch_resident_memory(limit_bytes: int, interval: float = 0.01) -> None:
    """Stop the process when its resident memory passes ``limit_bytes`` (torch's kernels release the
    GIL, so this thread keeps running while the step computes)."""
    while True:
        rss = resident_bytes()
        if rss > limit_bytes:
            os.write(1, (json.dumps({"stopped": True, "resident_bytes": rss, "limit_bytes": limit_bytes}) + "\n").encode())
            os._exit(STOPPED)
        time.sleep(interval)


def first_to_go() -> None:
    """If the machine runs out of memory anyway, the kernel should end this probe, not the training."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def run(spec: dict) -> dict:
    import torch

    from ..nn import build_model
    from .distributed import DistEnv
    from .trainer import TrainConfig, Trainer

    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    on_gpu = device.type == "cuda"
    if on_gpu:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["allowance_bytes"] / total), device)
    torch.manual_seed(0)
    model = build_model(spec["model_config"], backend=spec["backend"])
    model.stride, model.symmetric = int(spec["stride"]), bool(spec["symmetric"])
    config = TrainConfig(**spec["train_config"])
    out = {"stopped": False}
    try:
        with tempfile.TemporaryDirectory() as unused_out_dir:
            trainer = Trainer(model, None, unused_out_dir, config, dist=DistEnv(device=device))
            # Adam's state as after a first step; with zero gradients the update is zero.
            for p in trainer.model.parameters():
                p.grad = torch.zeros_like(p)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            channels = int(spec["model_config"].get("image_channels", 1))
            shape = (config.batch_size, channels, *model.input_shape)
            generator = torch.Generator().manual_seed(0)
            batches = [(torch.rand(shape, generator=generator), torch.rand(shape, generator=generator))
                       for _ in range(config.accumulate)]
            gc.collect()
            if on_gpu:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            trainer.train_step(batches)
            if on_gpu:
                torch.cuda.synchronize(device)
            out["seconds"] = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return dict(out, completed=False, error="out of memory")
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):
            raise
        return dict(out, completed=False, error="out of memory")
    if on_gpu:
        out.update(need_bytes=torch.cuda.max_memory_reserved(device),
                   allocated_bytes=torch.cuda.max_memory_allocated(device),
                   method="torch.cuda.max_memory_reserved")
    else:
        out.update(need_bytes=peak_resident_bytes(), method="peak resident memory (VmHWM)")
    return dict(out, completed=True)


def main() -> int:
    spec = json.loads(sys.stdin.read())
    if not spec["device"].startswith("cuda"):
        first_to_go()
        threading.Thread(target=watch_resident_memory, args=(int(spec["limit_bytes"]),), daemon=True).start()
    print(json.dumps(run(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
