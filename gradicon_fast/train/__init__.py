"""Training: the paper's protocol (Adam 5e-5, two stages), augmentation, checkpoints, DDP,
and test-time instance optimisation.

    from gradicon_fast.nn import standard_network
    from gradicon_fast.train import Trainer, TrainConfig
    model = standard_network((175, 175, 175), steps=3)
    Trainer(model, dataset, "runs/lung/stage1", TrainConfig(steps=50_000, batch_size=1)).fit()
    TrainConfig(batch_size=4, memory_budget="20GB")   # precision, checkpointing, micro-batch chosen to fit
"""

from .augment import affine_displacement, augment_pair, random_signed_permutation
from .checkpoint import atomic_save, latest_checkpoint, list_checkpoints
from .distributed import DistEnv, cleanup, init_distributed
from .instance_optimization import instance_optimize
from .memory_budget import MemoryBudgetError, MemoryChoice, choose_configuration, parse_size
from .sampler import PairStreamSampler
from .trainer import (NonFiniteGradientError, NonFiniteLossError, TrainConfig, Trainer, micro_batch_seed, train,
                      train_two_stage)

__all__ = [
    "DistEnv", "MemoryBudgetError", "MemoryChoice", "NonFiniteGradientError", "NonFiniteLossError",
    "PairStreamSampler", "TrainConfig",
    "Trainer", "affine_displacement", "atomic_save", "augment_pair", "choose_configuration", "cleanup",
    "init_distributed", "instance_optimize", "latest_checkpoint", "list_checkpoints", "micro_batch_seed",
    "parse_size", "random_signed_permutation", "train", "train_two_stage",
]
