"""Builds gradicon_fast and its extension ``gradicon_fast._C`` with ninja through torch.utils.cpp_extension.

The CUDA kernels are compiled only when a CUDA toolkit and a CUDA build of torch are both present
(force with GRADICON_FAST_CUDA=1, skip with GRADICON_FAST_CUDA=0). Architectures come from
TORCH_CUDA_ARCH_LIST, default "8.0;9.0". If the extension cannot be built at all, set
GRADICON_FAST_NO_EXTENSION=1: the package then runs on its PyTorch reference.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _simd_flags():
    """-mavx2 -mfma when the building machine has them (the extension is built where it runs), and
    -mtune=native: scheduling for this processor, the same instructions (the lung-scale GradICON step
    on the 2-core Zen 4 development machine: 4-5 % faster in two alternating runs, no different in a
    third; bit-identical results);
    GRADICON_FAST_SIMD=0 builds the portable scalar kernels only."""
    wanted = os.environ.get("GRADICON_FAST_SIMD", "auto")
    if wanted == "0":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if wanted == "1" or ("avx2" in flags and "fma" in flags):
        return ["-mavx2", "-mfma", "-mtune=native"]
    return []


def _extensions():
    if os.environ.get("GRADICON_FAST_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    wanted = os.environ.get("GRADICON_FAST_CUDA", "auto")
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if wanted == "1" and not cuda_possible:
        raise RuntimeError("GRADICON_FAST_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found")
    with_cuda = cuda_possible and wanted != "0"

    # -ffp-contract=off: no fused multiply-adds the reference does not do, so that identical
    # inputs give identical coordinates on every backend.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wno-unknown-pragmas"] + _simd_flags()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    kwargs = dict(
        name="gradicon_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        kwargs["sources"] += _sources("csrc/cuda/*.cu")
        kwargs["define_macros"] = [("GRADICON_FAST_WITH_CUDA", None)]
        # --fmad=false: as -ffp-contract=off for the C++ (coordinates identical to the CPU kernels);
        # -lineinfo: source lines in compute-sanitizer and Nsight reports, no effect on the code;
        # GRADICON_FAST_NVCC_FLAGS: extra flags for experiments, e.g. -DGF_CUDA_BACKWARD_MIN_BLOCKS=1.
        nvcc = ["-O3", "--fmad=false", "-lineinfo"] + os.environ.get("GRADICON_FAST_NVCC_FLAGS", "").split()
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        ext = CUDAExtension(**kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["gradicon_fast", "gradicon_fast.kernels", "benchmarks"],
    package_dir={"gradicon_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
