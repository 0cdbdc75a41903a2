"""A published-format network run by the official ``icon_registration`` package and by gradicon_fast.

    python -m benchmarks official                      # 175³ (the uniGradICON grid), 3 timed steps
    python -m benchmarks official --size 65 --steps 1  # a quick run (65³ is the official U-Net's minimum)

One weight file in the official format (``torch.save(regis_net.state_dict())`` of the paper's
4-step network: ``tallUNet2`` steps in ``TwoStepRegistration``/``DownsampleRegistration``, as
uniGradICON builds it) is written once with random weights; each side then runs in its own fresh
process that loads it (the official side: ``GradientICONSparse`` with LNCC σ=5, λ=1.5 around the
official network, ``load_state_dict``; gradicon_fast: ``gradicon_fast.nn.load_model``), builds the
same pair of smooth random images and measures:

1. **forward registration**: one evaluation of the network on the pair, both directions, each
   direction's map on the network grid, without gradients (cold: the first call in the process);
2. **instance optimisation**: Adam (lr 2e-5, every weight, network in eval mode) on the full
   objective, as the official ``finetune_execute`` and gradicon_fast's ``instance_optimize`` run
   it; one warm-up step (allocates Adam's state), then ``--steps`` timed steps.

Memory is the process's peak RSS above its RSS just before the phase (``VmHWM`` reset through
``/proc/self/clear_refs``, as ``train_memory.py`` does): what the phase adds to a process that
already holds the weights and images (and, for the steps, Adam's state). Results: a table on stdout
and ``benchmarks/results/<device>-official.json``.
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
from .report import RESULTS_DIR

SIDES = ("official", "gradicon_fast")
LEARNING_RATE = 2e-5  # the official instance-optimisation default (itk_wrapper), also gradicon_fast's
SIGMA, LMBDA = 5, 1.5  # uniGradICON's objective: LNCC σ=5, GradICON weight 1.5
MIN_SIZE = 65  # the official tall U-Net pools each axis 5 times below quarter resolution


# ---- the official network, built with the official package's public classes ----------------


def official_network(shape):
    """The official 4-step ``regis_net`` (as ``unigradicon.make_network(include_last_step=True)``)."""
    import icon_registration as icon
    from icon_registration import networks

    dimension = len(shape)

    def step():
        return icon.FunctionFromVectorField(networks.tallUNet2(dimension=dimension))

    net = step()
    for _ in range(2):
        net = icon.TwoStepRegistration(icon.DownsampleRegistration(net, dimension=dimension), step())
    return icon.TwoStepRegistration(net, step())


def official_loss(shape):
    """``GradientICONSparse`` (LNCC σ=5, λ=1.5) around the official network, set up for ``shape``."""
    import icon_registration as icon
    from icon_registration import losses

    loss = losses.GradientICONSparse(official_network(shape), icon.LNCC(sigma=SIGMA), lmbda=LMBDA)
    loss.assign_identity_map((1, 1) + tuple(shape))
    return loss


def write_weights(path: Path, shape, seed: int = 0) -> None:
    """An official-format weight file with random weights: the U-Nets' zero-initialised last layers
    made non-zero (small, so the maps stay smooth) so that every step moves points."""
    torch.manual_seed(seed)
    net = official_network(shape)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in net.named_modules():
            if name.endswith("lastConv"):
                module.weight.copy_(1e-3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(1e-3 * torch.randn(module.bias.shape, generator=gen))
    torch.save(net.state_dict(), path)


def image_pair(shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two smooth random images in [0, 1] (box-blurred noise), (1, 1, *shape)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.nn.functional.avg_pool3d(torch.rand((1, 1, *shape), generator=gen), 5, stride=1, padding=2,
                                                count_include_pad=False) for _ in range(2))


# ---- one side, in a fresh process ----------------------------------------------------------


class OfficialSide:
    def __init__(self, weights: Path, shape):
        self.loss = official_loss(shape)
        self.loss.regis_net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.loss.eval()  # as get_unigradicon leaves it: BatchNorm uses its running statistics

    def parameters(self):
        return self.loss.parameters()

    def register(self, A, B):
        ident = self.loss.identity_map
        phi_AB, phi_BA = self.loss.regis_net(A, B), self.loss.regis_net(B, A)
        return phi_AB(ident) - ident, phi_BA(ident) - ident  # displacements, [0, 1] units

    def objective(self, A, B):
        out = self.loss(A, B)
        return out.all_loss, float(out.similarity_loss.detach())


class GradiconFastSide:
    def __init__(self, weights: Path, shape):
        import gradicon_fast.nn as gnn

        self.model = gnn.load_model(weights, shape=shape)
        self.model.eval()  # as instance_optimize runs it
        self.generator = torch.Generator().manual_seed(0)

    def parameters(self):
        return self.model.parameters()

    def register(self, A, B):
        import gradicon_fast.functional as gfn

        result = self.model.register(A, B)
        shape = tuple(self.model.input_shape)
        return gfn.compose(result.chain_AB, shape), gfn.compose(result.chain_BA, shape)  # displacements

    def objective(self, A, B):
        terms = self.model(A, B, generator=self.generator)
        return terms.total, float(terms.similarity.detach())


def _phase_start() -> tuple[int, bool]:
    gc.collect()
    ok, _ = reset_peak_rss()
    return read_status()["VmRSS"], ok


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    shape = (int(spec["size"]),) * 3
    side = (OfficialSide if spec["side"] == "official" else GradiconFastSide)(Path(spec["weights"]), shape)
    A, B = image_pair(shape)
    out = {"side": spec["side"], "size": spec["size"], "threads": torch.get_num_threads()}

    baseline, ok = _phase_start()
    start = time.perf_counter()
    with torch.no_grad():
        maps = side.register(A, B)
    seconds = time.perf_counter() - start
    peak = read_status()["VmHWM"]
    out["forward"] = {"seconds": seconds, "baseline_mb": baseline / MB, "peak_mb": peak / MB,
                      "extra_mb": (peak - baseline) / MB, "peak_reset": ok,
                      # both sides load the same weights: their maps must agree (a check, not a timing)
                      "mean_abs_displacement": [float(m.abs().mean()) for m in maps]}
    del maps

    steps = int(spec["steps"])
    if steps == 0:
        return out
    before_optimizer = read_status()["VmRSS"]
    optimizer = torch.optim.Adam(side.parameters(), lr=LEARNING_RATE)
    similarities = []

    def step():
        optimizer.zero_grad()
        total, similarity = side.objective(A, B)
        total.backward()
        optimizer.step()
        similarities.append(similarity)

    start = time.perf_counter()
    step()  # warm-up: allocates Adam's state
    warmup = time.perf_counter() - start
    baseline, ok = _phase_start()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = read_status()["VmHWM"]
    out["io_step"] = {"steps": steps, "warmup_seconds": warmup, "seconds": statistics.median(times) if times else None,
                      "seconds_all": times, "baseline_mb": baseline / MB, "peak_mb": peak / MB,
                      "extra_mb": (peak - baseline) / MB, "peak_reset": ok,
                      "rss_before_optimizer_mb": before_optimizer / MB, "similarity_per_step": similarities}
    return out


def run_side(spec: dict, timeout: float | None) -> dict:
    """One side in a fresh interpreter; its JSON line, or why it failed."""
    cmd = [sys.executable, "-m", "benchmarks.official", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"side": spec["side"], "ok": False, "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
        return {"side": spec["side"], "ok": False, "error": reason, "stderr": proc.stderr[-2000:]}
    result = json.loads(lines[-1])
    result.update(ok=True, wall_seconds=time.perf_counter() - start)
    return result


# ---- the driver ----------------------------------------------------------------------------


def table(result: dict) -> str:
    sides = result["sides"]
    head = f"{'':<34}" + "".join(f"{s:>16}" for s in SIDES) + f"{'ratio':>9}"
    rows = [head, "-" * len(head)]
    for phase, key, label, fmt in (("forward", "seconds", "forward registration, s", "{:.2f}"),
                                   ("forward", "extra_mb", "forward registration, MB", "{:.0f}"),
                                   ("io_step", "seconds", "instance-optimisation step, s", "{:.2f}"),
                                   ("io_step", "extra_mb", "instance-optimisation step, MB", "{:.0f}"),
                                   ("io_step", "peak_mb", "process peak during steps, MB", "{:.0f}")):
        if phase not in sides[SIDES[0]] and all(s.get("ok") for s in sides.values()):
            continue  # --steps 0
        values = [sides[s].get(phase, {}).get(key) if sides[s].get("ok") else None for s in SIDES]
        cells = "".join(f"{fmt.format(v) if v is not None else 'failed':>16}" for v in values)
        ratio = f"{values[0] / values[1]:.1f}x" if None not in values and values[1] else ""
        rows.append(f"{label:<34}{cells}{ratio:>9}")
    for s in SIDES:
        if not sides[s].get("ok"):
            rows.append(f"{s}: {sides[s].get('error')}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks official",
                                description="A published-format network: the official icon_registration package "
                                            "beside gradicon_fast (see BENCHMARKS.md).")
    p.add_argument("--size", type=int, default=175, help=f"cubic side of the network grid (default 175; >= {MIN_SIZE})")
    p.add_argument("--steps", type=int, default=3,
                   help="timed instance-optimisation steps after one warm-up (default 3; 0: forward registration only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each side (default: torch's)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each side")
    p.add_argument("--output", type=Path, default=None,
                   help="results JSON (default benchmarks/results/<device>-official.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def run(args) -> dict:
    if args.size < MIN_SIZE:
        raise SystemExit(f"--size must be >= {MIN_SIZE} (the official U-Net pools each axis 5 times), got {args.size}")
    if args.steps < 0:
        raise SystemExit(f"--steps must be >= 0, got {args.steps}")
    try:
        import icon_registration  # noqa: F401
    except ImportError:
        raise SystemExit("the official package is not installed: pip install --no-deps icon_registration")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment.describe("cpu")
    result = {"benchmark": "official", "device": env["device_name"], "environment": env,
              "config": {"size": args.size, "steps": args.steps, "threads": torch.get_num_threads(),
                         "learning_rate": LEARNING_RATE, "similarity": f"LNCC sigma={SIGMA}", "lmbda": LMBDA,
                         "command": " ".join(["python -m benchmarks official"] + sys.argv[2:])},
              "sides": {}}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "regis_net.trch"
        write_weights(weights, (args.size,) * 3)
        for side in SIDES:
            spec = {"side": side, "size": args.size, "steps": args.steps, "threads": torch.get_num_threads(),
                    "weights": str(weights)}
            result["sides"][side] = run_side(spec, args.timeout)
    result["load_average_after"] = list(os.getloadavg())
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    result = run(args)
    output = args.output or RESULTS_DIR / f"{result['device']}-official.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, output)
    print(table(result))
    print(f"\nresults: {output}")
    return 0 if all(s.get("ok") for s in result["sides"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
