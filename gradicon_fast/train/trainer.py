"""Training loop for :class:`gradicon_fast.nn.GradICON` models (docs/conventions.md §5).

Adam (lr 5e-5), gradient accumulation, on-the-fly augmentation, bf16 autocast of the U-Nets
only (maps and losses stay float32), optional activation checkpointing, a tqdm bar, TensorBoard
and CSV logs, atomic checkpoints with exact resume, and torchrun data parallelism (DDP).

Determinism: everything random in step ``s`` for global micro-batch ``g`` (augmentation, the
penalty's noise) is drawn from a generator seeded by ``(seed, s, g)``, and data order comes from
:class:`PairStreamSampler`; so a resumed run repeats an uninterrupted one, and W ranks with
``accumulate=K`` repeat one process with ``accumulate=K·W`` (up to the BatchNorm caveat below).

BatchNorm: the U-Nets' BatchNorm uses the statistics of each forward's micro-batch. In
data-parallel runs on GPUs, ``sync_batchnorm="auto"`` converts it to SyncBatchNorm (statistics
of the global micro-batch); PyTorch's SyncBatchNorm has no CPU implementation, so with gloo on
CPUs each rank normalises its own micro-batch, which is what one process does with
``accumulate = K·W`` micro-batches of the same size.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..io.errors import OutputError
from ..io.output import atomic_output
from ..nn import GradICON, LossTerms, save_model
from .augment import augment_pair
from .checkpoint import (atomic_save, checkpoint_path, latest_checkpoint, load_checkpoint_file, prune_checkpoints,
                         rng_state, set_rng_state)
from .distributed import DistEnv, all_reduce_sum, init_distributed
from ..nn.networks import full_precision
from ..nn.unet_execution import autocast_dtype, batchnorm_stats
from .gradient_check import non_finite_gradients
from .memory_budget import choose_configuration, format_size, resumed_configuration
from .sampler import PairStreamSampler

TERMS = ("total", "similarity", "regularization", "fold_percentage")


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss; nothing was saved for that step."""

    def __init__(self, step: int, terms: dict):
        self.step = step
        self.terms = terms
        bad = [k for k in ("similarity", "regularization") if not math.isfinite(terms[k])]
        if not bad:
            bad = ["total"]
        values = ", ".join(f"{k} = {v:.6g}" for k, v in terms.items() if k != "fold_percentage")
        super().__init__(f"non-finite loss at step {step}: {' and '.join(bad)} is not finite ({values}); "
                         f"stopped without saving this step (the last checkpoint is intact)")


class NonFiniteGradientError(RuntimeError):
    """Training hit NaN/inf gradients with a finite loss; the step was not taken and nothing was saved."""

    def __init__(self, step: int, names: list):
        self.step = step
        self.names = names
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        super().__init__(f"non-finite gradients at step {step} although the loss is finite ({shown}); stopped "
                         f"without taking or saving this step (the last checkpoint is intact)")


@dataclass
class TrainConfig:
    """Training options. ``steps`` is the total number of optimiser steps (a resumed run continues
    up to it); ``batch_size`` is per rank and per micro-batch; each step accumulates
    ``accumulate`` micro-batches per rank (global batch = batch_size · accumulate · world size)."""

    steps: int = 1000
    batch_size: int = 1
    accumulate: int = 1
    lr: float = 5e-5
    augment: bool = True
    affine_scale: float = 0.05
    # U-Net execution (gradicon_fast.nn.configure; docs/performance.md), by default the fast settings of
    # gradicon_fast.nn.fast_defaults. amp: "auto" (bfloat16 autocast where the device computes it
    # natively, float32 elsewhere), True (autocast to amp_dtype everywhere) or False (float32);
    # checkpoint_activations: "selective" (convolution outputs kept, the cheap rest recomputed),
    # True (whole U-Nets recomputed) or False; channels_last: the channels-last layout.
    # PLAIN_EXECUTION holds the plain float32 settings. A resumed run keeps the settings it was saved with.
    amp: bool | str = "auto"
    amp_dtype: str = "bfloat16"
    checkpoint_activations: bool | str = "selective"
    channels_last: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 3             # newest kept; <= 0 keeps all
    resume: bool = True                   # continue from the newest checkpoint in out_dir
    log_every: int = 1
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    tensorboard: bool = True
    sync_batchnorm: str | bool = "auto"   # "auto": SyncBatchNorm for multi-GPU DDP only
    backend: str | None = None            # gradicon_fast backend of the ops (None: current/"auto")
    device: str | None = None             # None: cuda:LOCAL_RANK if available, else cpu
    save_final_model: bool = True         # out_dir/model.pt (gradicon_fast.nn.load_model)
    # Bytes or a size ("20GB"): precision, checkpointing, micro-batch and accumulation are chosen by
    # probe steps to fit it (gradicon_fast.train.memory_budget); the effective batch stays
    # batch_size · accumulate. The choice is recorded in memory_choice (saved in checkpoints).
    memory_budget: str | int | None = None
    memory_choice: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The U-Net execution options of TrainConfig, and their plain float32 values: what checkpoints saved
# before an option existed ran with.
PLAIN_EXECUTION = {"amp": False, "amp_dtype": "bfloat16", "checkpoint_activations": False, "channels_last": False}


def describe_execution(options: dict) -> str:
    """Execution ``options`` in words, e.g. "amp='auto', checkpoint_activations='selective'"."""
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def precision_name(dtype: torch.dtype | None) -> str:
    """"bfloat16" for an autocast dtype, "float32" for none."""
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def _complete_step(row: dict) -> int | None:
    """The step of a complete log.csv row; None for a row torn by a crash or a full disk."""
    if None in row or any(value in (None, "") for value in row.values()):
        return None
    try:
        return int(row["step"])
    except (ValueError, KeyError):
        return None


def micro_batch_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the generator for global micro-batch ``micro`` of (1-based) step ``step``."""
    return (seed * 0x9E3779B97F4A7C15 + step * 1_000_003 + micro * 7919 + 1) % (2 ** 63)


def _unpack(batch):
    if isinstance(batch, dict):
        return batch["image_A"], batch["image_B"]
    return batch[0], batch[1]


class Trainer:
    """``Trainer(model, dataset, out_dir, config).fit()`` → the list of logged rows (dicts).

    ``dataset`` items are dicts with ``"image_A"``/``"image_B"`` (C, *input_shape) tensors, or
    (A, B, …) tuples. Run under ``torchrun`` for data parallelism (``dist`` is then read from the
    environment). Rank 0 writes ``out_dir/log.csv``, ``out_dir/tensorboard/``,
    ``out_dir/checkpoints/checkpoint_<step>.pt`` and, at the end, ``out_dir/model.pt``.
    """

    def __init__(self, model: GradICON, dataset, out_dir, config: TrainConfig | None = None, *,
                 dist: DistEnv | None = None):
        self.config = config = config or TrainConfig()
        if config.steps < 0 or config.batch_size < 1 or config.accumulate < 1 or config.checkpoint_every < 1:
            raise ValueError(f"invalid TrainConfig: {config}")
        self.dist = dist if dist is not None else init_distributed(config.device)
        self.device = self.dist.device if config.device is None or self.dist.distributed \
            else torch.device(config.device)
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.dataset = dataset
        self.history: list[dict] = []

        model = getattr(model, "module", model)
        if not isinstance(model, GradICON):
            raise TypeError(f"model must be a gradicon_fast.nn.GradICON, got {type(model).__name__}")
        if config.backend is not None:
            model.backend = config.backend
        resume_from = latest_checkpoint(self.checkpoint_dir) if config.resume else None
        blob = load_checkpoint_file(resume_from, map_location=self.device) if resume_from is not None else None
        if blob is not None:
            self.config = config = self._saved_execution(config, blob)
        if config.memory_budget is not None and config.memory_choice is None:
            self.config = config = self._fit_budget(model, config, blob)
        if config.amp == "auto":
            amp_dtype = "auto"
        else:
            amp_dtype = getattr(torch, config.amp_dtype) if config.amp else None
        # what the U-Nets compute in on this device (recorded in checkpoints; "auto" depends on the device)
        self.autocast_dtype = autocast_dtype(amp_dtype, self.device)
        if blob is not None:
            self._check_saved_precision(blob)
        model.configure(amp_dtype=amp_dtype, checkpoint=config.checkpoint_activations,
                        channels_last=config.channels_last)
        if self._use_sync_batchnorm():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self._generator = torch.Generator()
        self.step = 0
        self.resumed_from: Path | None = None
        if blob is not None:
            self._resume(blob, resume_from)
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
        else:
            self.ddp = None

    # ---- set-up -----------------------------------------------------------------------------

    def _use_sync_batchnorm(self) -> bool:
        choice = self.config.sync_batchnorm
        if not self.dist.distributed or choice is False:
            return False
        on_gpu = self.dist.device.type == "cuda"
        if choice is True and not on_gpu:
            raise ValueError("sync_batchnorm=True needs CUDA devices: PyTorch's SyncBatchNorm has no CPU "
                             "implementation (use 'auto' to normalise per rank on CPUs)")
        return on_gpu

    def _fit_budget(self, model: GradICON, config: TrainConfig, blob: dict | None) -> TrainConfig:
        """``config`` with the configuration that fits ``config.memory_budget``: the choice saved with the
        checkpoint being resumed (same budget, same effective batch), else one made by probe steps."""
        if self.dist.distributed:
            raise ValueError("memory_budget chooses in one process: under torchrun, choose first without it "
                             "(gradicon_fast.train.choose_configuration) and pass the chosen options")
        say = print if config.progress else (lambda message: None)
        saved = ((blob or {}).get("train_config") or {}).get("memory_choice")
        resumed = resumed_configuration(config, saved) if saved else None
        if resumed is not None:
            say(f"memory budget {format_size(saved['budget_bytes'])}: {saved['chosen']} (as chosen for the run "
                "being resumed)")
            return resumed
        choice = choose_configuration(model, config.memory_budget, config, log=say)
        say(choice.describe(config))
        return choice.apply(config)

    def _say(self, message: str) -> None:
        if self.config.progress and self.dist.is_main:
            print(message)

    def _saved_execution(self, config: TrainConfig, blob: dict) -> TrainConfig:
        """``config`` with the U-Net execution settings the run being resumed was saved with (plain float32
        for a checkpoint saved before an option existed), so that it continues as it started; says so
        when they differ from the ones asked for. With a memory budget the settings are its choice,
        which is saved with the run and reused on resume (``_fit_budget``)."""
        saved = {**PLAIN_EXECUTION, **{k: v for k, v in (blob.get("train_config") or {}).items()
                                       if k in PLAIN_EXECUTION}}
        asked = {k: getattr(config, k) for k in saved}
        if asked == saved or config.memory_budget is not None:
            return config
        self._say(f"resuming with the settings the run was saved with ({describe_execution(saved)}) "
                  f"instead of {describe_execution(asked)}; start afresh (--no-resume, resume=False) to change them")
        return dataclasses.replace(config, **saved)

    def _check_saved_precision(self, blob: dict) -> None:
        """Says when this device computes the U-Nets in another precision than the saved run did (amp="auto"
        on a device with or without native bfloat16): the run goes on, but does not repeat bit for bit."""
        saved = (blob.get("execution") or {}).get("autocast_dtype", "unknown")
        now = precision_name(self.autocast_dtype)
        if saved not in ("unknown", now):
            self._say(f"note: the run was saved computing the U-Nets in {saved}; this device computes them in {now}")

    def _resume(self, blob: dict, path: Path) -> None:
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.step = int(blob["step"])
        set_rng_state(blob["rng"])
        self.resumed_from = path

    @property
    def samples_per_step(self) -> int:
        return self.config.batch_size * self.config.accumulate * self.dist.world_size

    def _loader(self):
        sampler = PairStreamSampler(len(self.dataset), self.config.batch_size, rank=self.dist.rank,
                                    world_size=self.dist.world_size, seed=self.config.seed,
                                    start_sample=self.step * self.samples_per_step)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.config.num_workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    # ---- logging ------------------------------------------------------------------------------
    # log.csv is appended to row by row (so that a killed run keeps its rows); a resume rewrites it
    # crash-safely with the rows up to the resumed step. TensorBoard's event files are its own.

    def _open_logs(self):
        self._csv_path = self.out_dir / "log.csv"
        fields = ["step", *TERMS, "lr", "seconds"]
        rows = []
        if self._csv_path.exists():  # keep the rows up to the resumed step (a killed run may have logged more)
            with open(self._csv_path, newline="") as f:
                logged = [(_complete_step(r), r) for r in csv.DictReader(f)]
            rows = [r for step, r in logged if step is not None and step <= self.step]
        with atomic_output(self._csv_path, what="training log") as tmp:  # a failed rewrite keeps the old log
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        self._csv_file = open(self._csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=fields)
        self._tb = None
        if self.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"),
                                     purge_step=self.step + 1 if self.step else None)

    def _close_logs(self):
        if getattr(self, "_csv_file", None) is not None:
            self._csv_file.close()
            self._csv_file = None
        if getattr(self, "_tb", None) is not None:
            self._tb.close()
            self._tb = None

    def _log(self, row: dict) -> None:
        try:
            self._csv.writerow(row)
            self._csv_file.flush()
        except OSError as e:  # a full disk: one line naming the log (a torn last row is skipped on resume)
            raise OutputError(f"cannot write training log {str(self._csv_path)!r}: {e.strerror or e}") from None
        if self._tb is not None:
            for k in TERMS:
                self._tb.add_scalar(f"loss/{k}" if k != "fold_percentage" else "fold_percentage", row[k], row["step"])
            self._tb.add_scalar("lr", row["lr"], row["step"])
            self._tb.add_scalar("seconds_per_step", row["seconds"], row["step"])

    # ---- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/checkpoint_<step>.pt`` (rank 0; atomic) and prune old ones."""
        if not self.dist.is_main:
            return None
        blob = {
            "format": "gradicon_fast.train/1",
            "step": self.step,
            "samples": self.step * self.samples_per_step,
            "config": self.model.config,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "train_config": self.config.to_dict(),
            # the precision the U-Nets ran in ("auto" resolved on this device)
            "execution": {"autocast_dtype": precision_name(self.autocast_dtype)},
            "world_size": self.dist.world_size,
        }
        path = checkpoint_path(self.checkpoint_dir, self.step)
        atomic_save(blob, path)
        prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
        return path

    # ---- the loop ---------------------------------------------------------------------------

    def _forward(self, image_A, image_B, generator) -> LossTerms:
        module = self.ddp if self.ddp is not None else self.model
        return module(image_A, image_B, generator=generator)

    def _accumulate_gradients(self, batches, step: int) -> torch.Tensor:
        """Forward and backward passes of this rank's micro-batches (gradients zeroed first); returns
        the sums of the terms."""
        cfg, env = self.config, self.dist
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(TERMS), dtype=torch.float64, device=self.device)
        for k, batch in enumerate(batches):
            image_A, image_B = (t.to(self.device, non_blocking=True).float() for t in _unpack(batch))
            micro = k * env.world_size + env.rank
            # one generator object, re-seeded: a torch.compile'd model specialises on the generator object
            generator = self._generator.manual_seed(micro_batch_seed(cfg.seed, step, micro))
            if cfg.augment:
                with torch.no_grad():
                    image_A, image_B = augment_pair(image_A, image_B, generator=generator,
                                                    affine_scale=cfg.affine_scale)
            last = k == len(batches) - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                terms = self._forward(image_A, image_B, generator)
                values = torch.stack([t.detach().double() for t in terms])
                check = all_reduce_sum(values.clone(), env)  # every rank stops together on a NaN anywhere
                if not bool(torch.isfinite(check[:3]).all()):
                    raise NonFiniteLossError(step, {n: float(v) for n, v in zip(TERMS, check / env.world_size)})
                (terms.total / len(batches)).backward()
            sums += values
        return sums

    def train_step(self, batches) -> dict:
        """One optimiser step over this rank's ``accumulate`` micro-batches; returns the mean terms
        over all ranks' micro-batches (as floats)."""
        cfg, env = self.config, self.dist
        step = self.step + 1
        (self.ddp if self.ddp is not None else self.model).train()
        restore_batchnorm = batchnorm_stats(self.model)
        sums = self._accumulate_gradients(batches, step)
        if non_finite_gradients(self.model.named_parameters()):
            # a low-precision backward went wrong with a finite loss (gradient_check): the step is redone
            # in float32 (same micro-batch seeds, BatchNorm statistics as before it)
            restore_batchnorm()
            with full_precision(self.model):
                sums = self._accumulate_gradients(batches, step)
            bad = non_finite_gradients(self.model.named_parameters())  # no NaN reaches the weights or a checkpoint
            if bad:
                raise NonFiniteGradientError(step, bad)
        self.optimizer.step()
        self.step = step
        all_reduce_sum(sums, env)
        means = (sums / (len(batches) * env.world_size)).tolist()
        return dict(zip(TERMS, means))

    def fit(self) -> list[dict]:
        """Train up to ``config.steps`` (from the resumed step); returns the rows logged in this run."""
        cfg = self.config
        main = self.dist.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._open_logs()
        bar = None
        try:
            if self.step < cfg.steps:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, disable=not (main and cfg.progress),
                           desc="train", dynamic_ncols=True)
                batches = iter(self._loader())
                while self.step < cfg.steps:
                    start = time.perf_counter()
                    micro = [next(batches) for _ in range(cfg.accumulate)]
                    terms = self.train_step(micro)
                    row = {"step": self.step, **terms, "lr": self.optimizer.param_groups[0]["lr"],
                           "seconds": time.perf_counter() - start}
                    self.history.append(row)
                    if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                        self._log(row)
                    bar.update(1)
                    bar.set_postfix(total=f"{terms['total']:.4f}", sim=f"{terms['similarity']:.4f}",
                                    reg=f"{terms['regularization']:.4f}", fold=f"{terms['fold_percentage']:.3f}%")
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.save_checkpoint()
            if main and cfg.save_final_model:
                save_model(self.model, self.out_dir / "model.pt")
        finally:
            if bar is not None:
                bar.close()
            if main:
                self._close_logs()
        return self.history


def train(model: GradICON, dataset, out_dir, config: TrainConfig | None = None, **overrides) -> GradICON:
    """Train ``model`` (see :class:`Trainer`); keyword overrides update ``config``. Returns the trained model."""
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    trainer = Trainer(model, dataset, out_dir, config)
    trainer.fit()
    return trainer.model


def train_two_stage(dataset, out_dir, input_shape, *, stage1_steps: int, stage2_steps: int,
                    config: TrainConfig | None = None, **model_kwargs) -> GradICON:
    """The paper's protocol: stage 1 trains the 3-step network (``out_dir/stage1``); stage 2 adds U4
    (:func:`gradicon_fast.nn.grow`) and trains all four steps (``out_dir/stage2``). Each stage
    resumes from its own checkpoints; a finished stage 1 is not rerun. ``model_kwargs`` go to
    :func:`gradicon_fast.nn.standard_network`. Returns the 4-step model.

    With ``config.memory_budget`` the 4-step network's configuration is chosen before stage 1
    starts (a budget that nothing fits fails before anything is written); stage 1 makes its own
    choice for the 3-step network, which needs less."""
    from ..nn import build_model, grow, standard_network

    config = config or TrainConfig()
    env = init_distributed(config.device)
    out_dir = Path(out_dir)
    stage2_dir = out_dir / "stage2"
    stage2_config = dataclasses.replace(config, steps=stage2_steps)
    model4 = None
    if config.resume and latest_checkpoint(stage2_dir / "checkpoints") is not None:
        # Stage 2 already started: its checkpoint holds all weights.
        blob = load_checkpoint_file(latest_checkpoint(stage2_dir / "checkpoints"))
        model4 = build_model(blob["config"])
    else:
        model3 = standard_network(input_shape, steps=3, **model_kwargs)
        if config.memory_budget is not None and config.memory_choice is None and not env.distributed:
            say = print if config.progress else (lambda message: None)
            choice = choose_configuration(grow(model3), config.memory_budget, config, log=say)
            say(f"stage 2 (4 steps): {choice.describe(config)}")
            stage2_config = choice.apply(stage2_config)
            if choice.candidate == choice.probes[0].candidate:  # the fastest fits 4 steps, so it fits 3
                config = choice.apply(config)
                say("stage 1 (3 steps): the same (the fastest configuration)")
        trainer1 = Trainer(model3, dataset, out_dir / "stage1", dataclasses.replace(config, steps=stage1_steps),
                           dist=env)
        trainer1.fit()
        model4 = grow(trainer1.model)
        del trainer1  # its optimiser state is not needed in stage 2
    trainer2 = Trainer(model4, dataset, stage2_dir, stage2_config, dist=env)
    trainer2.fit()
    return trainer2.model
