"""Training within a memory budget: the configuration chosen by measuring, not by guessing.

    choice = choose_configuration(model, "20GB", TrainConfig(batch_size=4))
    Trainer(model, dataset, out_dir, choice.apply(config)).fit()      # or TrainConfig(memory_budget="20GB")

The candidates are the network settings of :data:`SETTINGS` (precision; activation
checkpointing: none, selective or full), each with every micro-batch that divides the effective
batch (largest first; the rest is made up by gradient accumulation, so the optimiser sees the batch
asked for). They are tried in order (float32 before autocast, the faster first within each); each
runs one real training step in a fresh process (:mod:`gradicon_fast.train.memory_probe`), and the
first whose measured need fits the budget is chosen. Options set away from their defaults in the
given :class:`TrainConfig` (e.g. ``amp=True``) are kept: only candidates with the same value are
tried.

What is measured: on the CPU the probe process's peak resident memory (interpreter, libraries,
weights, Adam's state and one step); on a GPU the CUDA caching allocator's peak reserved memory
(the CUDA context comes on top). Data held by the training process besides (a data set's cache,
data-loader workers) is not part of it: leave room for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .memory_probe import STOPPED

# Units as GNU coreutils reads them: a bare letter or an "iB" suffix is binary, "B" after the
# letter decimal (dd, sort -S, numfmt).
UNITS = {"b": 1, "": None}
for _power, _letter in enumerate("kmgt", start=1):
    UNITS[_letter] = UNITS[_letter + "ib"] = 1024 ** _power
    UNITS[_letter + "b"] = 1000 ** _power
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


class MemoryBudgetError(ValueError):
    """No candidate configuration fits the budget (or the budget is not a size)."""


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: ``"20GB"`` (10⁹), ``"20G"`` / ``"20GiB"`` (2³⁰), ``"512MiB"``, ``"1.5G"``, ``"800000B"``;
    an int is bytes. A bare number without a unit is refused (bytes or gigabytes?)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise MemoryBudgetError(f"memory budget must be a size such as 20GB, 512MiB or 1.5G, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text)
        unit = match and UNITS.get(match.group(2).lower(), 0)
        if not match or unit == 0:
            raise MemoryBudgetError(f"memory budget {text!r} is not a size: expected a number and a unit such as "
                                    "20GB, 512MiB or 1.5G (K, M, G, T and KiB... are powers of 1024; KB, MB, GB, TB "
                                    "powers of 1000; B bytes)")
        if unit is None:
            raise MemoryBudgetError(f"memory budget {text!r} needs a unit: 20GB, 512MiB, 1.5G, ... (bytes: "
                                    f"{text.strip()}B)")
        value = int(float(match.group(1)) * unit)
    if value <= 0:
        raise MemoryBudgetError(f"memory budget must be more than 0 bytes, got {text!r}")
    return value


def format_size(n: int | float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class Setting:
    """Network options of one candidate: :class:`TrainConfig` fields and their values."""

    name: str          # "{amp_dtype}" is replaced by the configured autocast dtype
    options: dict


# Exact float32 before autocast, so that precision is lowered only where float32 does not fit even
# with full checkpointing; within each, the faster first: no recomputation, then "selective"
# (convolution outputs kept, the cheap ops recomputed), then full (each U-Net's forward rerun in
# backward; 175³ on a 2-core CPU: 65 s a step without, 110 s with; 6.8 against 3.0 GB).
SETTINGS: tuple[Setting, ...] = (
    Setting("float32", {"amp": False, "checkpoint_activations": False}),
    Setting("float32 + selective checkpointing", {"amp": False, "checkpoint_activations": "selective"}),
    Setting("float32 + activation checkpointing", {"amp": False, "checkpoint_activations": True}),
    Setting("{amp_dtype} autocast", {"amp": True, "checkpoint_activations": False}),
    Setting("{amp_dtype} autocast + selective checkpointing", {"amp": True, "checkpoint_activations": "selective"}),
    Setting("{amp_dtype} autocast + activation checkpointing", {"amp": True, "checkpoint_activations": True}),
)


@dataclass(frozen=True)
class Candidate:
    setting: Setting
    micro_batch: int
    accumulate: int

    def apply(self, config):
        return dataclasses.replace(config, **self.setting.options, batch_size=self.micro_batch,
                                   accumulate=self.accumulate)

    def describe(self, config) -> str:
        name = self.setting.name.format(amp_dtype=config.amp_dtype)
        return f"{name}, micro-batch {self.micro_batch} x {self.accumulate} accumulated"


@dataclass
class Probe:
    """What one candidate's training step needed: ``need_bytes`` (measured), or, for a probe stopped
    on its way past the limit, ``more_than_bytes``."""

    candidate: Candidate
    fits: bool
    need_bytes: int | None = None
    more_than_bytes: int | None = None
    seconds: float | None = None
    error: str | None = None

    def need(self) -> str:
        if self.need_bytes is not None:
            return format_size(self.need_bytes)
        if self.more_than_bytes is not None:
            return f"more than {format_size(self.more_than_bytes)}"
        return "unknown"

    def describe(self, config) -> str:
        verdict = "fits" if self.fits else "does not fit"
        detail = f"; {self.seconds:.2f} s" if self.seconds is not None else ""
        if self.error:
            detail += f"; {self.error}"
        return f"{self.candidate.describe(config)}: needs {self.need()} ({verdict}{detail})"

    def to_dict(self, config) -> dict:
        return {"candidate": self.candidate.describe(config), "fits": self.fits, "need_bytes": self.need_bytes,
                "more_than_bytes": self.more_than_bytes, "step_seconds": self.seconds, "error": self.error}


@dataclass
class MemoryChoice:
    budget_bytes: int
    candidate: Candidate
    probes: list = field(default_factory=list)
    method: str = ""

    @property
    def probe(self) -> Probe:
        return next(p for p in self.probes if p.candidate == self.candidate)

    def apply(self, config):
        """``config`` with the chosen options and a record of the choice (saved in checkpoints)."""
        return dataclasses.replace(self.candidate.apply(config), memory_choice=self.to_dict(config))

    def describe(self, config) -> str:
        return (f"memory budget {format_size(self.budget_bytes)}: chose {self.candidate.describe(config)} "
                f"(measured {self.probe.need()}; {len(self.probes)} configuration(s) probed)")

    def to_dict(self, config) -> dict:
        return {"budget_bytes": self.budget_bytes, "chosen": self.candidate.describe(config),
                "batch_size": self.candidate.micro_batch, "accumulate": self.candidate.accumulate,
                "options": dict(self.candidate.setting.options), "need_bytes": self.probe.need_bytes,
                "method": self.method,
                "probes": [p.to_dict(config) for p in self.probes]}


def candidates(config, settings: Sequence[Setting] = SETTINGS) -> list[Candidate]:
    """The candidates for ``config``, in the order they are tried."""
    from .trainer import TrainConfig

    defaults = TrainConfig()
    knobs = {k for s in settings for k in s.options}
    kept = {k: getattr(config, k) for k in knobs if getattr(config, k) != getattr(defaults, k)}
    effective = config.batch_size * config.accumulate
    micro_batches = [m for m in range(config.batch_size, 0, -1) if effective % m == 0]
    return [Candidate(s, m, effective // m) for s in settings
            if all(s.options.get(k, v) == v for k, v in kept.items()) for m in micro_batches]


def _device(config) -> str:
    """The training device, as the trainer picks it (without torchrun: cuda:0 when available)."""
    return str(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _watch_limit(budget_bytes: int) -> int:
    """Where a CPU probe is stopped: far enough above the budget to measure a near miss, never
    beyond what the machine has free."""
    limit = max(budget_bytes, min(2 * budget_bytes, budget_bytes + 2 ** 31))
    available = _available_bytes()
    return min(limit, available - 2 ** 28) if available else limit


def probe(model, candidate: Candidate, config, budget_bytes: int, *, launcher: Sequence[str] = (),
          timeout: float | None = None) -> Probe:
    """Run ``candidate``'s training step of ``model`` in a fresh process; what it needed."""
    from ..nn import GradICON

    model = getattr(model, "module", model)
    if not isinstance(model, GradICON) or not model.config:
        raise TypeError("a memory budget needs a gradicon_fast.nn.GradICON built by standard_network, grow or "
                        "load_model (its config rebuilds it in the probe)")
    device = _device(config)
    train_config = dataclasses.replace(candidate.apply(config), memory_budget=None, memory_choice=None,
                                       accumulate=min(candidate.accumulate, 2), resume=False, progress=False,
                                       tensorboard=False, save_final_model=False, device=device)
    spec = {"model_config": model.config, "backend": model.backend, "stride": model.stride,
            "symmetric": model.symmetric, "train_config": train_config.to_dict(), "device": str(device),
            "threads": torch.get_num_threads(), "allowance_bytes": budget_bytes,
            "limit_bytes": _watch_limit(budget_bytes)}
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [*launcher, sys.executable, "-m", "gradicon_fast.train.memory_probe"]
    try:
        proc = subprocess.run(command, input=json.dumps(spec), capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return Probe(candidate, False, error=f"timed out after {timeout:g} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if proc.returncode == STOPPED and result.get("stopped"):
        return Probe(candidate, False, more_than_bytes=result["limit_bytes"], error="stopped at the limit")
    if proc.returncode in (-9, 137):
        return Probe(candidate, False, error="killed (out of memory)")
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:]
        raise RuntimeError(f"memory probe of {candidate.describe(config)} failed (exit status {proc.returncode}): "
                           f"{tail[0] if tail else 'no output'}")
    if not result["completed"]:
        return Probe(candidate, False, more_than_bytes=budget_bytes, error=result.get("error"))
    need = int(result["need_bytes"])
    return Probe(candidate, need <= budget_bytes, need_bytes=need, seconds=result["seconds"])


def choose_configuration(model, budget, config=None, *, candidates_to_try: Sequence[Candidate] | None = None,
                         launcher: Sequence[str] = (), timeout: float | None = None,
                         log: Callable[[str], None] | None = None) -> MemoryChoice:
    """The first candidate (fastest first) whose measured training step of ``model`` fits ``budget``
    (bytes, or a size such as ``"20GB"``); :class:`MemoryBudgetError` naming the smallest measured need
    when none does. ``launcher`` prefixes each probe's command (e.g. ``["flock", LOCK_FILE]``)."""
    from .trainer import TrainConfig

    budget_bytes = parse_size(budget)
    config = config or TrainConfig()
    tried = list(candidates(config) if candidates_to_try is None else candidates_to_try)
    if not tried:
        raise MemoryBudgetError("no candidate configuration keeps the options set in the training config")
    # Weights, gradients and Adam's two moments are float32 in every candidate: a floor known without probing.
    floor = 4 * sum(p.numel() * 4 for p in getattr(model, "module", model).parameters())
    if floor > budget_bytes:
        raise MemoryBudgetError(f"memory budget {_named(budget, budget_bytes)} is too small: the weights, their "
                                f"gradients and Adam's two moments alone take {format_size(floor)}")
    probes = []
    for candidate in tried:
        result = probe(model, candidate, config, budget_bytes, launcher=launcher, timeout=timeout)
        probes.append(result)
        if log is not None:
            log(f"memory probe: {result.describe(config)}")
        if result.fits:
            method = "peak reserved CUDA memory" if _device(config).startswith("cuda") else \
                "peak resident memory of the process"
            return MemoryChoice(budget_bytes, candidate, probes, method)
    raise MemoryBudgetError(_nothing_fits(budget, budget_bytes, probes, config))


def _nothing_fits(budget, budget_bytes: int, probes: list, config) -> str:
    measured = [p for p in probes if p.need_bytes is not None]
    if measured:
        smallest = min(measured, key=lambda p: p.need_bytes)
    else:
        smallest = probes[-1]
    return (f"memory budget {_named(budget, budget_bytes)} is too small: the smallest measured need is "
            f"{smallest.need()} "
            f"({smallest.candidate.describe(config)}); none of the {len(probes)} configurations tried fits")


def _named(budget, budget_bytes: int) -> str:
    """The budget as given and in bytes: '20G (21.47 GB)'."""
    return f"{budget.strip()} ({format_size(budget_bytes)})" if isinstance(budget, str) else format_size(budget_bytes)
