"""Compile check of the CUDA kernels (csrc/cuda/*.cu) with nvcc, without a GPU and without linking.

Runs wherever an nvcc is found (on PATH, or $CUDA_HOME/bin/nvcc, or the CUDA_HOME torch found), also
with a CPU build of torch: its wheel ships the ATen/c10 CUDA headers. Each file is compiled for
sm_80 and sm_90 with the flags setup.py's CUDAExtension uses (torch's C++ standard and common nvcc
flags, -O3 --fmad=false), all files at once in parallel processes; the total wall time is printed
(``pytest -s``). A cold run takes about 5 minutes of CPU time (about 50 s per file, most of it
parsing the ATen headers once per architecture and once for the host); a file whose inputs are
unchanged since its last successful check is not recompiled (pytest's cache, so a fresh clone
compiles everything). Set GRADICON_FAST_SKIP_NVCC=1 to skip it.
"""

from __future__ import annotations

import concurrent.futures
import glob
import inspect
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = ("80", "90")


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        homes.append(CUDA_HOME)
    except Exception:  # pragma: no cover - torch import problems show elsewhere
        pass
    for home in homes:
        if home:
            candidate = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return None


NVCC = _find_nvcc()

needs_nvcc = [
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (not on PATH, no $CUDA_HOME/bin/nvcc): "
                                            "the CUDA kernels cannot be compile-checked here"),
    pytest.mark.skipif(os.environ.get("GRADICON_FAST_SKIP_NVCC", "0") == "1",
                       reason="GRADICON_FAST_SKIP_NVCC=1"),
    pytest.mark.skipif(not SOURCES, reason="no csrc/cuda/*.cu sources"),
]


def _cxx_standard() -> str:
    """The C++ standard torch's extensions are built with (C++20 from torch 2.10 on, C++17 before)."""
    from torch.utils import cpp_extension

    return "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"


def _base_command() -> list[str]:
    import torch
    from torch.utils import cpp_extension

    include_dirs = [os.path.join(ROOT, "csrc")] + list(cpp_extension.include_paths())
    cmd = [NVCC, "-c", f"-std={_cxx_standard()}", "-O3", "--fmad=false", "-Xcompiler", "-fPIC",
           "-DGRADICON_FAST_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cmd += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    torch_include = cpp_extension.include_paths()[0]
    if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        # A CPU wheel lacks this generated header (it only defines C10_CUDA_BUILD_SHARED_LIBS).
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for arch in ARCHS:
        cmd += ["--generate-code", f"arch=compute_{arch},code=sm_{arch}"]
    for d in include_dirs:
        cmd += ["-I", d]
    return cmd


def _compile(source: str, out_dir: str, threads: int) -> tuple[str, int, str, float]:
    obj = os.path.join(out_dir, os.path.basename(source) + ".o")
    cmd = _base_command() + ["--threads", str(threads), "-o", obj, source]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return " ".join(cmd), proc.returncode, proc.stderr + proc.stdout, time.monotonic() - start


def _fingerprint(source: str) -> str:
    """Hash of what a file's compilation depends on: nvcc, the flags, every source and header of csrc/."""
    h = hashlib.sha256()
    h.update(subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(" ".join(_base_command()).encode())
    h.update(source.encode())
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if path.endswith((".h", ".cuh", ".cu")):
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def compiled(request):
    """{source: (command, returncode, output, seconds)}: every file compiled once, in parallel.

    A success is remembered in pytest's cache under the hash of everything the compilation reads,
    so that a rerun with nothing changed costs nothing (a fresh clone, as in CI, compiles).
    """
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    results, todo = {}, []
    for src in SOURCES:
        key = "gradicon_fast/nvcc/" + _fingerprint(src)
        if cache is not None and cache.get(key, False):
            results[src] = ("(cached success)", 0, "", 0.0)
        else:
            todo.append((src, key))
    cpus = os.cpu_count() or 1
    jobs = max(1, min(len(todo), cpus))
    threads = max(1, min(len(ARCHS), cpus // jobs))  # nvcc --threads: the architectures in parallel
    start = time.monotonic()
    if todo:
        with tempfile.TemporaryDirectory(prefix="gradicon_fast_nvcc_") as out_dir:
            with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {src: (key, pool.submit(_compile, src, out_dir, threads)) for src, key in todo}
                for src, (key, future) in futures.items():
                    results[src] = future.result()
                    if results[src][1] == 0 and cache is not None:
                        cache.set(key, True)
    total = time.monotonic() - start
    per_file = ", ".join(f"{os.path.basename(s)} {r[3]:.0f}s" for s, r in sorted(results.items()))
    print(f"\nnvcc compile check: {len(todo)} of {len(SOURCES)} files compiled ({len(SOURCES) - len(todo)} cached), "
          f"{jobs} parallel jobs, {total:.0f}s wall ({per_file})", file=sys.stderr)
    return results


@pytest.mark.parametrize("source", [pytest.param(s, id=os.path.basename(s), marks=needs_nvcc) for s in SOURCES])
def test_compiles(compiled, source):
    command, returncode, output, _ = compiled[source]
    assert returncode == 0, f"nvcc failed on {os.path.relpath(source, ROOT)}:\n$ {command}\n{output}"


def test_every_op_has_a_cuda_kernel():
    """Every op csrc/ops.cpp defines (but built_with_cuda, a plain function) has a CUDA kernel."""
    schemas = open(os.path.join(ROOT, "csrc", "ops.cpp")).read()
    ops = set(re.findall(r'm\.def\(\s*"(\w+)\(', schemas)) - {"built_with_cuda"}
    cuda = set()
    for path in SOURCES:
        text = open(path).read()
        if "TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m)" in text:
            cuda.update(re.findall(r'm\.impl\("(\w+)"', text))
    assert ops, "no op schemas found in csrc/ops.cpp"
    assert ops <= cuda, f"ops without a CUDA kernel: {sorted(ops - cuda)}"
