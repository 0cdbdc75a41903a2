"""Launch configurations of the Triton kernels.

Forward kernels that write each output once (``transform_points``, ``warp``, and the penalties'
loss kernels, whose per-program partial sums do not depend on the block size) are autotuned on
GPU over a few block sizes and warp counts. Backward kernels add into gradient buffers with
atomics, so a tuning run would add twice: they run one fixed configuration. Under
``TRITON_INTERPRET=1`` every kernel runs a single configuration, to keep the interpreter fast.
"""

import os

import triton


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# One configuration for the kernels that are not tuned (and for everything when interpreted).
BLOCK = 128 if not interpreted() else 256
NUM_WARPS = 4
# Points one program of a penalty's loss kernel sums over (a multiple of every tuned BLOCK), so
# that the partial sums' layout does not depend on the configuration.
TILE = 1024 if not interpreted() else BLOCK


def forward_configs():
    if interpreted():
        return [triton.Config({"BLOCK": BLOCK}, num_warps=NUM_WARPS)]
    return [
        triton.Config({"BLOCK": 64}, num_warps=2),
        triton.Config({"BLOCK": 128}, num_warps=4),
        triton.Config({"BLOCK": 256}, num_warps=4),
        triton.Config({"BLOCK": 256}, num_warps=8),
    ]
