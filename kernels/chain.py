"""Chains of displacement fields in the Triton kernels: how they are passed, evaluated and
differentiated (docs/conventions.md §1), the counterpart of ``csrc/chain.h``.

How a chain reaches a kernel
----------------------------
Every kernel takes ``MAX_FIELDS`` (16, enough for φ_AB∘φ_BA with 8 fields each) *slots*, each
the five arguments ``F<j>, G<j>, A<j>, B<j>, C<j>``: the field's data pointer, its gradient
buffer, and its sizes along spatial axes 0, 1, 2 (2D fields use A and B). The fields are passed
as they are (contiguous), never copied or packed; unused slots repeat a real tensor and are never
read. The kernel body turns the slots into tuples ``fields``, ``grads``, ``sizes``; the helpers
below index them with compile-time slot numbers (``tl.static_range`` unrolls the chain), so a
kernel is specialised on the number of fields ``NF`` and on two bit masks, ``BATCHED`` (slot j
has a batch axis; otherwise it broadcasts over the batch) and ``GMASK`` (slot j wants a
gradient). ``ROT`` rotates the slots: the composed chain's field i (0 = outermost) is slot
``(i + ROT) % NF``, so that ICON's φ_BA∘φ_AB reuses the slots of φ_AB∘φ_BA.

A kernel's source writes all this once, as the parameter ``CHAIN`` and the statement
``fields, grads, sizes = CHAIN``: ``chain_kernels`` spells them out (``with_chain_arguments``:
the 80 slot parameters followed by ``NF``, ``BATCHED``, ``GMASK``, and the three tuples) before
Triton compiles the kernel, since a Triton kernel takes neither packed.

Sizes are plain int arguments that Triton does not specialise on (``SIZE_ARGS`` are listed in
``do_not_specialize``): a new grid size does not compile a new kernel.

Evaluation and reverse pass
---------------------------
``chain_forward`` moves a block of points (a D-tuple of ``[BLOCK, E]`` coordinates, E points
travelling together per row) through the fields, innermost first, and returns the positions
each field was sampled at (the *stash*, kept in registers) for the reverse pass;
``chain_backward`` walks back outermost first, scatters ``∂L/∂field`` with atomic adds
(``sampling.scatter``) and carries the adjoint ``ā ← ā + J_s(y)ᵀ ā`` to the next field.
Nothing is stored between the forward and the backward kernels: the backward kernels run the
forward pass again.

Unrolling costs compile time, not run time: ptxas/Triton take seconds for chains of a few fields
and minutes for the largest composed chains (16 fields, GradICON backward, 3D); Triton caches
compiled kernels on disk.
"""

import inspect
import linecache
import re
import textwrap

import torch
import triton
import triton.language as tl

from .sampling import as_index, interpolate, interpolate_gradient, locate_cell, scatter
from .tuning import forward_configs

MAX_FIELDS = 16
SIZE_ARGS = [f"{axis}{j}" for j in range(MAX_FIELDS) for axis in "ABC"]


# ---- the chain in a kernel's source ------------------------------------------------------------


def _chain_source() -> tuple[str, str]:
    """What ``CHAIN`` stands for: as parameters (the slots, then the chain's compile-time shape),
    and as the value of ``fields, grads, sizes``."""
    slots = ", ".join(f"F{j}, G{j}, A{j}, B{j}, C{j}" for j in range(MAX_FIELDS))
    fields = ", ".join(f"F{j}" for j in range(MAX_FIELDS))
    grads = ", ".join(f"G{j}" for j in range(MAX_FIELDS))
    sizes = ", ".join(f"(A{j}, B{j}, C{j})" for j in range(MAX_FIELDS))
    return (f"{slots}, NF: tl.constexpr, BATCHED: tl.constexpr, GMASK: tl.constexpr",
            f"({fields}), ({grads}), ({sizes})")


def with_chain_arguments(fn):
    """Kernel source ``fn`` with its parameter ``CHAIN`` and its statement ``fields, grads, sizes =
    CHAIN`` spelled out (see the module's docstring).

    The new function's source is kept in ``linecache`` (Triton and its interpreter read a kernel's
    source) at the original line numbers, under a name that says where it comes from.
    """
    lines, first = inspect.getsourcelines(fn)
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("def "))  # below any decorator
    source = textwrap.dedent("".join(lines[start:]))
    header = re.search(r"\)\s*:\s*\n", source)  # the end of the signature
    signature, body = (source[:header.end()], source[header.end():]) if header else (source, "")
    params, tuples = _chain_source()
    if len(re.findall(r"\bCHAIN,", signature)) != 1 or body.count(" = CHAIN\n") != 1:
        raise ValueError(f"{fn.__name__}: a kernel takes the parameter CHAIN and says 'fields, grads, sizes = CHAIN' "
                         "once")
    source = re.sub(r"\bCHAIN,", params + ",", signature) + body.replace(" = CHAIN\n", f" = {tuples}\n")
    text = "\n" * (first - 1 + start) + source
    filename = f"<{inspect.getsourcefile(fn)}: {fn.__name__} with its chain arguments>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(text, filename, "exec"), fn.__globals__, namespace)
    return namespace[fn.__name__]


def chain_kernels(fn, scalar_args, tuning_key, points_per_row: int = 1):
    """The two kernels of kernel source ``fn`` (see ``with_chain_arguments``): forward (autotuned
    on GPU, keyed by ``tuning_key``) and backward, neither specialised on ``scalar_args`` or the
    slots' sizes."""
    kernel = with_chain_arguments(fn)
    no_specialize = [*scalar_args, *SIZE_ARGS]
    forward = triton.autotune(configs=forward_configs(points_per_row), key=list(tuning_key))(
        triton.jit(kernel, do_not_specialize=no_specialize))
    return forward, triton.jit(kernel, do_not_specialize=no_specialize)


# ---- evaluation and reverse pass ------------------------------------------------------------------


@triton.jit
def block_points(n, BLOCK: tl.constexpr, BIG: tl.constexpr):
    """This program's block of flat point indices (grid axis 0) and its mask."""
    offs = as_index(tl.program_id(0), BIG) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def field_at(fields, grads, sizes, SLOT: tl.constexpr, BATCHED: tl.constexpr, b, D: tl.constexpr,
             BIG: tl.constexpr):
    """(data pointer, gradient pointer) of slot ``SLOT`` at batch entry ``b``, its sizes, and its
    channel stride."""
    sz = sizes[SLOT]
    if D == 3:
        channel_stride = as_index(sz[0], BIG) * sz[1] * sz[2]
    else:
        channel_stride = as_index(sz[0], BIG) * sz[1]
    if (BATCHED >> SLOT) & 1:
        offset = as_index(b, BIG) * (channel_stride * D)
    else:
        offset = as_index(b, BIG) * 0
    return fields[SLOT] + offset, grads[SLOT] + offset, sz, channel_stride


@triton.jit
def sample_field(ptr, channel_stride, cell, D: tl.constexpr, CT: tl.constexpr, mask):
    """The D channels of a displacement field at a cell."""
    s = ()
    for ch in tl.static_range(D):
        s = s + (interpolate(ptr + ch * channel_stride, cell, CT, mask),)
    return s


@triton.jit
def displaced(pts, s, D: tl.constexpr):
    """Points ``pts`` moved by the displacement ``s`` (D-tuples): what one field does to them."""
    out = ()
    for k in tl.static_range(D):
        out = out + (pts[k] + s[k],)
    return out


@triton.jit
def chain_forward(pts, fields, grads, sizes, b, NF: tl.constexpr, ROT: tl.constexpr, BATCHED: tl.constexpr,
                  D: tl.constexpr, CT: tl.constexpr, BIG: tl.constexpr, mask):
    """φ at points ``pts`` (a D-tuple of [BLOCK, E]); ``mask`` is [BLOCK, 1, 1]. Returns
    (φ(points), stash); stash[jj] holds the positions at which the composed chain's field
    NF-1-jj was sampled (application order)."""
    stash = ()
    for jj in tl.static_range(NF):
        ptr, _, sz, cs = field_at(fields, grads, sizes, (NF - 1 - jj + ROT) % NF, BATCHED, b, D, BIG)
        stash = stash + (pts,)
        pts = displaced(pts, sample_field(ptr, cs, locate_cell(pts, sz, D, BIG), D, CT, mask), D)
    return pts, stash


@triton.jit
def chain_backward(adj, stash, fields, grads, sizes, b, NF: tl.constexpr, ROT: tl.constexpr,
                   BATCHED: tl.constexpr, GMASK: tl.constexpr, STOP: tl.constexpr, E: tl.constexpr,
                   D: tl.constexpr, CT: tl.constexpr, BIG: tl.constexpr, mask):
    """Reverse pass of ``chain_forward``. ``adj`` (a D-tuple of [BLOCK, E]) holds ∂L/∂φ(x) on
    entry; field gradients are scattered into the slots whose ``GMASK`` bit is set. The adjoint
    is carried through the composed chain's fields 0 … STOP-1, as ā ← ā + J_s(y)ᵀ ā; on return
    it is ∂L/∂(position at which field STOP was sampled), ∂L/∂x when STOP == NF."""
    for i in tl.static_range(NF):
        if i <= STOP:
            ptr, gptr, sz, cs = field_at(fields, grads, sizes, (i + ROT) % NF, BATCHED, b, D, BIG)
            cell = locate_cell(stash[NF - 1 - i], sz, D, BIG)
            if (GMASK >> ((i + ROT) % NF)) & 1:
                scatter(gptr, cs, cell, adj, D, E, mask)
            if i < STOP:
                nxt = adj
                for ch in tl.static_range(D):
                    g = interpolate_gradient(ptr + ch * cs, cell, D, CT, mask)
                    upd = ()
                    for k in tl.static_range(D):
                        upd = upd + (nxt[k] + adj[ch] * g[k],)
                    nxt = upd
                adj = nxt
    return adj


# ---- host side --------------------------------------------------------------------------------


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the gradient buffers the kernels add into (half-precision fields: float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Tests set this to run the 64-bit offset code on small tensors.
FORCE_64BIT_OFFSETS = False


def is_big(*tensors: torch.Tensor) -> bool:
    """Whether offsets into any of ``tensors`` need 64 bits."""
    return FORCE_64BIT_OFFSETS or any(t.numel() >= 2**31 for t in tensors)


def slot_args(fields, grads, batch: int):
    """The kernel arguments of the slots, and the BATCHED mask.

    ``fields``: contiguous (B|1, d, *S) tensors, outermost first; ``grads``: per field a gradient
    buffer of the same shape or None.
    """
    if not 1 <= len(fields) <= MAX_FIELDS:
        raise ValueError(f"a composed chain may have 1 to {MAX_FIELDS} fields, got {len(fields)}")
    args = []
    batched = 0
    filler = fields[0]
    for j in range(MAX_FIELDS):
        if j < len(fields):
            f = fields[j]
            g = grads[j] if grads[j] is not None else f
            spatial = list(f.shape[2:]) + [1] * (3 - (f.ndim - 2))
            if f.shape[0] != 1 and batch > 1:
                batched |= 1 << j
        else:
            f, g, spatial = filler, filler, [1, 1, 1]
        args += [f, g, *spatial]
    return args, batched


def grad_mask(needs) -> int:
    mask = 0
    for j, n in enumerate(needs):
        if n:
            mask |= 1 << j
    return mask


def stop_index(needs_by_order, points_need_grad: bool) -> int:
    """How far (in composed order, 0 = outermost) the reverse pass must carry the adjoint: to the
    innermost field that wants a gradient, or through the whole chain for a point gradient."""
    if points_need_grad:
        return len(needs_by_order)
    wanted = [i for i, n in enumerate(needs_by_order) if n]
    return wanted[-1] if wanted else -1
