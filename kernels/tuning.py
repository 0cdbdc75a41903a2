"""Launch configurations of the Triton kernels.

The kernels hold, per program, tensors of ``BLOCK × E × 2^D`` corner values (E points travelling
together per row: 4 for GradICON, 1 otherwise); register use grows with the elements per thread,
``BLOCK · E · 2^D / (32 · num_warps)``, and with the number of fields (the reverse pass keeps the
positions of every field). The block sizes below keep that at 2 … 8 elements per thread. ptxas
(sm_90, ``python -m gradicon_fast.kernels.aot_check``) reports for 3D float32: forward kernels
30 … 125 registers; backward kernels with 2 … 4 fields 85 … 155 (analytic GradICON 233), none
spilling; GradICON backward with 8 fields 255 registers and 32 bytes of spill, with 16 fields
255 and 512 bytes.

Forward kernels that write each output once (``transform_points``, ``warp``, and the penalties'
loss kernels, whose per-program partial sums cover a fixed TILE of points whatever the block)
are autotuned on GPU over a few block sizes and warp counts. Backward kernels add into gradient
buffers with atomics, so a tuning run would add twice: they run one fixed configuration. Under
``TRITON_INTERPRET=1`` every kernel runs one large block, which is what keeps the interpreter
fast.
"""

import os

import triton


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


NUM_WARPS = 4
_INTERPRETER_BLOCK = 256
# Points one program of a penalty's loss kernel sums over (a multiple of every tuned BLOCK), so
# that the partial sums' layout does not depend on the configuration.
TILE = 1024 if not interpreted() else _INTERPRETER_BLOCK


def backward_block(d: int, e: int = 1) -> int:
    """BLOCK of a backward kernel whose rows carry ``e`` points of a ``d``-dimensional chain."""
    if interpreted():
        return _INTERPRETER_BLOCK
    return max(8, 256 // (e * 2**d))


def noise_block() -> int:
    return _INTERPRETER_BLOCK if interpreted() else 128


def forward_configs(e: int = 1):
    """Autotuning configurations of a forward kernel whose rows carry ``e`` points."""
    if interpreted():
        return [triton.Config({"BLOCK": _INTERPRETER_BLOCK}, num_warps=NUM_WARPS)]
    if e == 1:
        pairs = [(32, 4), (64, 2), (64, 4), (128, 4)]
    else:
        pairs = [(8, 2), (16, 2), (16, 4), (32, 4)]
    return [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in pairs]
