"""Compile every Triton kernel variant the operators launch for a GPU target, without a GPU.

``python -m gradicon_fast.kernels.aot_check [--arch 90] [--quick]`` runs the operators' host code
on small CPU tensors with the kernel launches intercepted, then compiles each recorded launch
(its argument types and compile-time constants) with ``triton.compile`` for CUDA ``sm_<arch>``,
through Triton's whole pipeline down to a cubin (ptxas). The interpreter (``TRITON_INTERPRET=1``)
checks the kernels' numbers on CPU but accepts programs the compiler would reject; this checks
the rest. Must run without ``TRITON_INTERPRET``. Prints one line per kernel variant (registers,
spills, compile time) and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


class _Recorder:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel, args, kwargs))
        return launch


def _signature(fn, args, kwargs):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = fn.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    signature, constexprs = {}, {}
    for i, name in enumerate(names):
        param = fn.params[i]
        value = values[name]
        if param.is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = native_specialize_impl(BaseBackend, value, False, False, False)[0]
    return signature, constexprs


def _ptxas_usage(ptx: str, arch: int) -> str:
    """Registers and spill bytes per thread of a kernel's PTX, as ``ptxas -v`` reports them."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={arch_name}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}B"


def _record_launches(quick: bool):
    from . import ops

    log = []
    ops._wrap = lambda kernel: _Recorder(kernel, log)
    cases = [(3, torch.float32), (2, torch.float32), (3, torch.bfloat16)]
    if quick:
        cases = cases[:1]
    for d, dtype in cases:
        sh = (5, 6, 4)[:d]
        chain = [torch.zeros(2, d, *sh, dtype=dtype), torch.zeros(1, d, *(3, 4, 5)[:d], dtype=dtype)]
        pts = torch.zeros(1, d, 7, dtype=dtype)
        img = torch.zeros(1, 2, *sh, dtype=dtype)
        noise = torch.zeros(1, d, *sh, dtype=dtype)
        grad0 = torch.ones((), dtype=dtype)
        ops._transform_points(chain, pts)
        ops._transform_points_backward(torch.zeros(2, d, 7, dtype=dtype), chain, pts, [True, True], True)
        ops._warp(img, chain, list(sh))
        ops._warp_backward(torch.zeros(2, 2, *sh, dtype=dtype), img, chain, list(sh), True, [True, True])
        ops._gradicon_loss(chain, chain, list(sh), 2, None, 1, 1e-3, 0.1)
        ops._gradicon_loss_backward(grad0, chain, chain, list(sh), 1, noise, 1, 1e-3, 0.1, [True, True],
                                    [True, True])
        ops._gradicon_analytic_loss(chain, chain, list(sh), 2, None, 1, 0.1)
        ops._gradicon_analytic_loss_backward(grad0, chain, chain, list(sh), 1, noise, 1, 0.1, [True, True],
                                             [True, True])
        ops._icon_loss(chain, chain, list(sh), noise, 1, 0.1)
        ops._icon_loss_backward(grad0, chain, chain, list(sh), None, 1, 0.1, [True, True], [True, True])
        if not quick:
            # The largest composed chain: 8 + 8 fields.
            long = [chain[0]] * 8
            ops._gradicon_loss_backward(grad0, long, long, list(sh), 1, None, 1, 1e-3, 0.1, [True] * 8, [True] * 8)
    ops._normal_noise(1, 3, [4, 5], torch.float32, torch.device("cpu"))
    return log


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="3D float32 only")
    parser.add_argument("--all-configs", action="store_true",
                        help="every autotuning configuration (default: the first of each kernel)")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    target = GPUTarget("cuda", opts.arch, 32)
    seen = set()
    for kernel, args, kwargs in _record_launches(opts.quick):
        kwargs = dict(kwargs)
        configs = [None]
        if isinstance(kernel, Autotuner):
            configs = kernel.configs if opts.all_configs else kernel.configs[:1]
            kernel = kernel.fn
        for config in configs:
            kw = dict(kwargs)
            num_warps = kw.pop("num_warps", 4)
            if config is not None:
                kw.update(config.kwargs)
                num_warps = config.num_warps
            signature, constexprs = _signature(kernel, args, kw)
            key = (kernel.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
                   num_warps)
            if key in seen:
                continue
            seen.add(key)
            start = time.time()
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=target, options={"num_warps": num_warps})
            shown = {k: constexprs[k] for k in ("D", "NF", "BACKWARD", "F64", "BLOCK") if k in constexprs}
            dtype = signature.get("F0", signature.get("OUT", "?"))
            elapsed = time.time() - start
            print(f"{kernel.__name__:18s} {dtype:6s} {shown} warps={num_warps} "
                  f"{_ptxas_usage(compiled.asm['ptx'], opts.arch)} compile {elapsed:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
