#!/usr/bin/env bash
# compute-sanitizer over every CUDA op of gradicon_fast (forward and backward, 2D and 3D, float32,
# float64 and float16, explicit and seeded noise, finite-difference and analytic GradICON, ICON, batch broadcasting, coarse fields that take the
# warp-aggregated atomics, the longest chains).
#
#   benchmarks/gpu/sanitize.sh                    # memcheck, racecheck, synccheck, initcheck
#   TOOLS="memcheck racecheck" benchmarks/gpu/sanitize.sh
#
# Needs a CUDA device, the extension built with its CUDA kernels (pip install -e . with a CUDA
# build of torch) and compute-sanitizer (on PATH or in $CUDA_HOME/bin). Only the package's own
# kernels are instrumented (KERNEL_FILTER, default kns=gradicon_fast: kernel names containing
# "gradicon_fast"; set KERNEL_FILTER= to check every kernel). PyTorch's caching allocator is
# switched off so that memcheck sees every allocation's true bounds. Exit status 0 when every
# tool reports no error.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
SAN=${COMPUTE_SANITIZER:-}
if [ -z "$SAN" ]; then
  SAN=$(command -v compute-sanitizer || true)
  [ -n "$SAN" ] || SAN="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
fi
if [ ! -x "$SAN" ]; then
  echo "compute-sanitizer not found (not on PATH, not in \$CUDA_HOME/bin); set COMPUTE_SANITIZER" >&2
  exit 2
fi
TOOLS=${TOOLS:-"memcheck racecheck synccheck initcheck"}
KERNEL_FILTER=${KERNEL_FILTER-kns=gradicon_fast}

script=$(mktemp --suffix=.py)
trap 'rm -f "$script"' EXIT
cat >"$script" <<'PYEOF'
import sys

import torch

import gradicon_fast as gf
from gradicon_fast import ops as fused

if not torch.cuda.is_available() or not gf.backends()["cuda"]:
    sys.exit("needs a CUDA device and the CUDA kernels (gf.backends()['cuda'] is False)")
dev = "cuda"
torch.manual_seed(0)


def field(batch, shape, magnitude, dtype):
    return ((torch.rand(batch, len(shape), *shape, dtype=dtype, device=dev) - 0.5) * 2 * magnitude).requires_grad_()


def grads(y, inputs):
    return torch.autograd.grad(y.float().square().sum() if y.dim() else y, inputs, allow_unused=True)


for dtype in (torch.float32, torch.float64, torch.float16):
    for d in (2, 3):
        shape = (23, 18) if d == 2 else (11, 9, 13)
        coarse = tuple((s + 3) // 4 for s in shape)
        half = tuple((s + 1) // 2 for s in shape)
        ab = [field(2, coarse, 0.1, dtype), field(1, half, 0.05, dtype), field(2, shape, 0.02, dtype)]
        ba = [field(1, (3,) * d, 0.1, dtype), field(2, shape, 0.02, dtype)]
        points = (torch.rand(2, d, 7, 5, dtype=dtype, device=dev) * 1.6 - 0.3).requires_grad_()
        image = torch.rand(1, 3, *half, dtype=dtype, device=dev).requires_grad_()
        with gf.use_backend("cuda"):
            y = gf.transform_points(ab, points)
            grads(y, ab + [points])
            grads(gf.transform_points(ab, points.detach()), ab)             # field gradients only
            grads(gf.transform_points([f.detach() for f in ab], points), [points])
            w = gf.warp(image, ab, shape=shape)                              # coarse image: aggregated scatter
            grads(w, ab + [image])
            grads(gf.warp(image, [f.detach() for f in ab], shape=shape), [image])
            grads(gf.warp(image.detach(), ab, shape=half), ab)
            for stride in (1, 2):
                g = torch.Generator(device=dev).manual_seed(stride)
                loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, generator=g)       # seeded noise
                grads(loss, ab + ba)
                pts = tuple((s + stride - 1) // stride for s in shape)
                noise = torch.randn(1, d, *pts, dtype=dtype, device=dev)
                loss = gf.gradicon_loss(ab, ba, shape=shape, stride=stride, noise=noise, symmetric=True)
                grads(loss, ab + ba)
                grads(gf.gradicon_loss(ab, [f.detach() for f in ba], shape=shape, stride=stride, noise=noise), ab)
                grads(gf.gradicon_loss(ab, ba, shape=shape, stride=stride, mode="analytic", generator=g), ab + ba)
                grads(gf.gradicon_loss([f.detach() for f in ab], ba, shape=shape, stride=stride, mode="analytic",
                                       noise=noise), ba)
            loss = gf.icon_loss(ab, ba, shape=shape, generator=torch.Generator(device=dev).manual_seed(3))
            grads(loss, ab + ba)
            grads(gf.icon_loss([f.detach() for f in ab], ba, shape=shape,
                               noise=torch.randn(1, d, *shape, dtype=dtype, device=dev)), ba)
            fused.normal_noise(7, d, shape, dtype=dtype, device=dev)
    # the longest chains: 8 + 8 fields
    long_ab = [field(2, (5, 6, 7), 0.05, dtype) for _ in range(8)]
    long_ba = [field(1, (6, 5, 4), 0.05, dtype) for _ in range(8)]
    with gf.use_backend("cuda"):
        grads(gf.gradicon_loss(long_ab, long_ba, shape=(7, 6, 5), noise=torch.randn(1, 3, 7, 6, 5, dtype=dtype,
                                                                                    device=dev)), long_ab + long_ba)
        grads(gf.gradicon_loss(long_ab, long_ba, shape=(7, 6, 5), mode="analytic",
                               generator=torch.Generator(device=dev).manual_seed(2)), long_ab + long_ba)
        grads(gf.icon_loss(long_ab, long_ba, shape=(7, 6, 5), generator=torch.Generator(device=dev).manual_seed(1)),
              long_ab + long_ba)
torch.cuda.synchronize()
print("every op ran")
PYEOF

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
filter=()
[ -n "$KERNEL_FILTER" ] && filter=(--kernel-name "$KERNEL_FILTER")
status=0
for tool in $TOOLS; do
  echo "== compute-sanitizer --tool $tool"
  # initcheck must watch every kernel: with the filter, the writes of torch's own kernels (the
  # inputs) go unseen and every read of them is reported as uninitialised.
  tool_filter=()
  [ "$tool" = initcheck ] || tool_filter=(${filter[@]+"${filter[@]}"})
  if "$SAN" --tool "$tool" --error-exitcode 99 --show-backtrace device ${tool_filter[@]+"${tool_filter[@]}"} \
      "$PY" "$script"; then
    echo "== $tool: no errors"
  else
    echo "== $tool: FAILED (exit $?)"
    status=1
  fi
done
exit $status
