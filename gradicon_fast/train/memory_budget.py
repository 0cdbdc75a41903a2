"""Training within a memory budget: the configuration chosen by measuring, not by guessing.

    choice = choose_configuration(model, "20GB", TrainConfig(batch_size=4))
    Trainer(model, dataset, out_dir, choice.apply(config)).fit()      # or TrainConfig(memory_budget="20GB")

The candidates are network settings (precision, activation checkpointing, memory layout;
:func:`settings_for`: which depend on whether the training device computes bfloat16 natively),
each with every micro-batch that divides the effective batch (the rest is made up by gradient
accumulation, so the optimiser sees the batch asked for): every setting at the largest micro-batch
first, then every setting at the next. They are tried in order; each runs one real training step
in a fresh process (:mod:`gradicon_fast.train.memory_probe`), and the first whose measured need
fits the budget is chosen. Options set away from their defaults in the given :class:`TrainConfig`
(e.g. ``amp=False``) are kept: every candidate uses them.

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

from ..nn.unet_execution import native_bfloat16
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


# The TrainConfig fields a candidate sets, and the values a saved choice may hold.
KNOBS = {"amp": (False, True, "auto"), "checkpoint_activations": (False, True, "full", "selective"),
         "channels_last": (False, True)}


@dataclass(frozen=True)
class Setting:
    """Network options of one candidate: :class:`TrainConfig` fields of :data:`KNOBS` and their values."""

    options: dict

    def describe(self, config) -> str:
        """``"bfloat16 autocast + selective checkpointing + channels-last"``, ``"float32"``, ..."""
        amp = self.options.get("amp", False)
        if amp == "auto":
            native = native_bfloat16(torch.device(_device(config)))
            parts = ["bfloat16 autocast" if native else "float32 (amp auto: bfloat16 not native here)"]
        else:
            parts = [f"{config.amp_dtype} autocast" if amp else "float32"]
        mode = self.options.get("checkpoint_activations", False)
        if mode:
            parts.append("selective checkpointing" if mode == "selective" else "full checkpointing")
        if self.options.get("channels_last", False):
            parts.append("channels-last")
        return " + ".join(parts)


def _setting(amp, checkpoint_activations, channels_last) -> Setting:
    return Setting({"amp": amp, "checkpoint_activations": checkpoint_activations, "channels_last": channels_last})


# Fastest first, from measured training steps of the standard network (BENCHMARKS.md "Whole network
# steps", docs/performance.md). Where bfloat16 is native: the fast settings (nn.fast_defaults;
# bfloat16 pays off only in the channels-last layout, and selective recomputation reruns only the
# cheap ops for much less memory), then full checkpointing (each U-Net's forward rerun: leaner,
# slower), then float32 + full checkpointing for small volumes, where autocast's bfloat16 copies of
# the weights outweigh the activations it saves. Elsewhere autocast and channels-last are slower than
# plain float32: float32 with no, selective, then full recomputation.
BFLOAT16_SETTINGS = (_setting("auto", "selective", True), _setting("auto", True, True))
FLOAT32_FALLBACK = _setting(False, True, False)
FLOAT32_SETTINGS = (_setting(False, False, False), _setting(False, "selective", False), FLOAT32_FALLBACK)


def settings_for(config) -> list[Setting]:
    """The settings tried for ``config``, fastest first: where its device computes bfloat16 natively
    (and ``amp=False`` is not set), :data:`BFLOAT16_SETTINGS` and, unless ``amp`` is set,
    :data:`FLOAT32_FALLBACK`; elsewhere :data:`FLOAT32_SETTINGS`. Options set away from their
    defaults replace the settings' own (duplicates dropped)."""
    from .trainer import TrainConfig

    defaults = TrainConfig()
    kept = {k: getattr(config, k) for k in KNOBS if getattr(config, k) != getattr(defaults, k)}
    if native_bfloat16(torch.device(_device(config))) and kept.get("amp", True) is not False:
        table = BFLOAT16_SETTINGS + (() if "amp" in kept else (FLOAT32_FALLBACK,))
    else:
        table = FLOAT32_SETTINGS
    settings: list[Setting] = []
    for setting in table:
        options = {**setting.options, **kept}
        if all(options != s.options for s in settings):
            settings.append(Setting(options))
    return settings


@dataclass(frozen=True)
class Candidate:
    setting: Setting
    micro_batch: int
    accumulate: int

    def apply(self, config):
        return dataclasses.replace(config, **self.setting.options, batch_size=self.micro_batch,
                                   accumulate=self.accumulate)

    def describe(self, config) -> str:
        return f"{self.setting.describe(config)}, micro-batch {self.micro_batch} x {self.accumulate} accumulated"


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


def candidates(config, settings: Sequence[Setting] | None = None) -> list[Candidate]:
    """The candidates for ``config``, in the order they are tried: each setting (default
    :func:`settings_for`) at the largest micro-batch, then each at the next. A smaller micro-batch
    changes the step (BatchNorm normalises over the images of a micro-batch), the settings do not
    (recomputation is exact, bfloat16 moves the transform by less than 0.1 mm): so every setting is
    tried at the batch asked for before any smaller micro-batch."""
    settings = settings_for(config) if settings is None else settings
    effective = config.batch_size * config.accumulate
    micro_batches = [m for m in range(config.batch_size, 0, -1) if effective % m == 0]
    return [Candidate(s, m, effective // m) for m in micro_batches for s in settings]


def resumed_configuration(config, saved: dict):
    """``config`` with ``saved``, the choice recorded in the checkpoint being resumed, when it was made
    for the same budget and effective batch; ``None`` when not (choose anew). A choice saved before
    channels-last was a candidate ran without it. One this version cannot read raises
    :class:`MemoryBudgetError`."""
    try:
        budget, chosen = int(saved["budget_bytes"]), str(saved["chosen"])
        batch, accumulate = int(saved["batch_size"]), int(saved["accumulate"])
        options = dict(saved["options"])
    except (KeyError, TypeError, ValueError) as e:
        raise MemoryBudgetError(f"the memory choice saved with the run being resumed cannot be read ({e!r}): start "
                                "afresh, or resume without a memory budget") from None
    unknown = [f"{k}={v!r}" for k, v in options.items() if k not in KNOBS or not any(
        v == allowed and type(v) is type(allowed) for allowed in KNOBS[k])]
    if unknown:
        raise MemoryBudgetError(f"the memory choice saved with the run being resumed ({chosen}) sets "
                                f"{', '.join(unknown)}, which this version does not know: start afresh, or resume "
                                "without a memory budget")
    if budget != parse_size(config.memory_budget) or batch * accumulate != config.batch_size * config.accumulate:
        return None
    options.setdefault("channels_last", False)
    return dataclasses.replace(config, **options, batch_size=batch, accumulate=accumulate, memory_choice=saved)


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
