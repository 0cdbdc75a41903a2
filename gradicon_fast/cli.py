"""The ``gradicon-fast`` command line (also ``python -m gradicon_fast``).

    gradicon-fast register --fixed F --moving M --warped-out W --transform-out T
    gradicon-fast warp --moving M --transform T --reference F --out W [--nearest]
    gradicon-fast jacobian --transform T [--out J]
    gradicon-fast train --config lung|brain|knee|synthetic2d --data DIR --out RUN
    gradicon-fast demo [--out demo_output]
    gradicon-fast bench [ARGS...]

Errors in the inputs (missing or unreadable files, 2D against 3D, bad masks, unknown options) are
reported as one line on stderr with a non-zero exit status; outputs are written to a temporary file
and renamed, so a failed run leaves no partial file behind.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

EXIT_INPUT = 1   # a problem with the inputs or the run
EXIT_USAGE = 2   # a problem with the command line (argparse's convention)


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``gradicon-fast register: error: ... (see --help)``."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------
# register
# ------------------------------------------------------------------------------------------------


def _cmd_register(args) -> int:
    from . import io
    from .alignment import geometric_center
    from .io.affine import AFFINE_FILE_SUFFIXES, write_affine
    from .registration import Level, RegistrationSettings, register_images

    outputs = [("--warped-out", args.warped_out, io.WRITABLE_IMAGE_SUFFIXES),
               ("--transform-out", args.transform_out, io.FIELD_IMAGE_SUFFIXES + io.TRANSFORM_FILE_SUFFIXES),
               ("--inverse-transform-out", args.inverse_transform_out,
                io.FIELD_IMAGE_SUFFIXES + io.TRANSFORM_FILE_SUFFIXES),
               ("--affine-out", args.affine_out, AFFINE_FILE_SUFFIXES),
               ("--jacobian-out", args.jacobian_out, io.WRITABLE_IMAGE_SUFFIXES)]
    if all(path is None for _, path, _ in outputs):
        raise UsageError(f"no output requested: give at least one of {', '.join(option for option, _, _ in outputs)}")
    for option, path, suffixes in outputs:  # fail before the long computation
        if path is not None:
            io.check_writable(path, what=f"{option} file", suffixes=suffixes)
    paths = [os.path.abspath(p) for _, p, _ in outputs if p is not None]
    if len(set(paths)) != len(paths):
        raise io.InputError("two outputs were given the same file name")
    if args.io_iterations < 0:
        raise UsageError("--io-iterations must be >= 0")
    if args.io_iterations_given and args.model is None:
        raise UsageError("--io-iterations needs --model (model-free registration uses --iterations)")
    if (args.model_preset is not None or args.model_shape is not None) and args.model is None:
        raise UsageError("--model-preset and --model-shape need --model")
    if args.model_preset is not None and args.model_shape is not None:
        raise UsageError("give --model-preset or --model-shape, not both")
    _check_network_options(args)

    fixed = io.read_image(args.fixed, what="fixed image")
    moving = io.read_image(args.moving, what="moving image")
    if args.nan_value is not None:
        fixed = _nan_value_applied(args, fixed, "fixed")
        moving = _nan_value_applied(args, moving, "moving")
    if fixed.ndim != moving.ndim:
        raise io.InputError(f"the fixed image is {fixed.ndim}D but the moving image is {moving.ndim}D")
    fixed_mask = io.read_mask(args.fixed_mask, fixed, what="fixed mask") if args.fixed_mask else None
    moving_mask = io.read_mask(args.moving_mask, moving, what="moving mask") if args.moving_mask else None
    _say(args, f"fixed:  {args.fixed} ({fixed.geometry.describe()})")
    _say(args, f"moving: {args.moving} ({moving.geometry.describe()})")

    device = _device(args.device)
    model = None
    if args.model is not None:
        model = _load_model(args.model, device, args.backend, preset=args.model_preset, shape=args.model_shape)
    settings = RegistrationSettings()
    if args.iterations is not None:
        if len(args.iterations) != len(settings.levels) or any(n < 0 for n in args.iterations):
            raise UsageError(f"--iterations takes {len(settings.levels)} counts >= 0 (one per level, coarse to fine)")
        settings.levels = tuple(Level(lv.image_scale, lv.field_scale, n)
                                for lv, n in zip(settings.levels, args.iterations))
    for name in ("lmbda", "sigma", "max_size", "lr", "similarity", "smooth", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if settings.max_size < 8 or settings.sigma < 1 or settings.lmbda < 0 or settings.lr <= 0 or settings.smooth < 0:
        raise UsageError("need --max-size >= 8, --sigma >= 1, --lmbda >= 0, --lr > 0 and --smooth >= 0")

    result = register_images(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, intensity=args.intensity,
                             settings=settings, model=model, io_iterations=args.io_iterations, backend=args.backend,
                             device=device, progress=not args.quiet, log=lambda m: _say(args, m),
                             default_value=args.default_value, init=args.init,
                             warn=lambda m: _stderr(f"gradicon-fast register: warning: {m}"),
                             fixed_modality=args.fixed_modality, moving_modality=args.moving_modality,
                             mask_use=args.mask_use, io_similarity=args.io_similarity, io_lr=args.io_lr)
    with io.output_group():  # every output, or (when one cannot be written) none of them
        if args.warped_out:
            io.write_image(args.warped_out, result.warped, what="--warped-out file")
        if args.transform_out:
            io.write_displacement_field(args.transform_out, result.forward, what="--transform-out file")
        if args.inverse_transform_out:
            io.write_displacement_field(args.inverse_transform_out, result.inverse,
                                        what="--inverse-transform-out file")
        if args.affine_out:
            write_affine(args.affine_out, result.affine.matrix, result.affine.offset,
                         center=geometric_center(fixed.geometry), what="--affine-out file")
        if args.jacobian_out:
            _write_jacobian(args.jacobian_out, result.forward, what="--jacobian-out file")
    print(f"registered ({result.method}) in {result.seconds:.1f} s; folds: {result.fold_percentage:.4f} % of cells",
          flush=True)
    for option, path, _ in outputs:
        if path is not None:
            _say(args, f"wrote {path}")
    return 0


def _check_network_options(args) -> None:
    """The options of the published-network protocol need --model; --init and --affine-out are model-free."""
    if args.model is None:
        given = [option for option, value in (("--fixed-modality", args.fixed_modality),
                                              ("--moving-modality", args.moving_modality),
                                              ("--io-similarity", args.io_similarity), ("--io-lr", args.io_lr))
                 if value is not None]
        if args.mask_use != "input":
            given.append("--mask-use")
        if given:
            raise UsageError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --model (model-free "
                             f"registration normalises with --intensity and multiplies the images by their masks)")
        if args.init is None:
            args.init = "affine"
        return
    if args.init not in (None, "none"):
        raise UsageError("--init is for model-free registration: with --model each image's voxel box is mapped onto "
                         "the network grid, as the published pipeline does")
    if args.affine_out is not None:
        raise UsageError("--affine-out needs model-free registration (with --model there is no initial alignment)")
    if args.io_lr is not None and not args.io_lr > 0:
        raise UsageError("--io-lr must be > 0")
    args.init = "none"


def _write_jacobian(path: str, field, *, what: str) -> None:
    """The Jacobian determinant of ``field``, one value per grid cell placed at the cell centre (half a voxel
    from the field's origin), as an image."""
    import numpy as np

    from . import io

    det = field.jacobian_determinant().numpy()
    g = field.geometry
    origin = g.index_to_physical(np.full(g.ndim, 0.5))
    cells = io.Geometry(det.shape, g.spacing, tuple(origin), g.direction)
    io.write_image(path, io.Image(det.astype("float32"), cells), what=what)


def _nan_value_applied(args, image, name: str):
    """``image`` with its NaN/infinite voxels set to ``--nan-value`` (said when there were any)."""
    from . import io

    image, count = io.replace_nonfinite(image, args.nan_value)
    if count:
        _say(args, f"{name} image: {count} NaN/infinite voxel(s) set to {args.nan_value:g} (--nan-value)")
    return image


def _device(name: str | None) -> str:
    import torch

    if name in (None, "cpu"):
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available")
        return name
    raise UsageError(f"--device must be 'cpu' or 'cuda[:N]', got {name!r}")


def _network_layer_missing(what: str) -> str:
    return (f"{what} needs the network layer (gradicon_fast.nn / gradicon_fast.train), which is not available "
            f"in this installation yet")


def _load_model(path: str, device: str, backend: str | None, *, preset=None, shape=None):
    from .io import InputError
    from .io.image import _check_readable

    _check_readable(path, "model checkpoint")
    try:
        from .nn import load_model
        from .train import instance_optimize  # noqa: F401 - checked here, used later
    except ImportError:
        raise UsageError(_network_layer_missing("register --model")) from None
    try:
        model = load_model(path, map_location=device, backend=backend, preset=preset, shape=shape)
    except InputError:  # not a readable checkpoint at all: load_model's message says so
        raise
    except Exception as e:  # config / state-dict errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load model checkpoint {path!r}: {first}") from None
    return model.to(device)


# ------------------------------------------------------------------------------------------------
# warp, jacobian
# ------------------------------------------------------------------------------------------------


def _cmd_warp(args) -> int:
    from . import io

    io.check_writable(args.out, what="--out file")
    moving = io.read_image(args.moving, what="moving image", dtype=None)
    reference = io.read_image(args.reference, what="reference image", dtype=None)
    if moving.ndim != reference.ndim:
        raise io.InputError(f"the moving image is {moving.ndim}D but the reference image is {reference.ndim}D")
    field = io.read_displacement_field(args.transform, reference.geometry, what="transform")
    if not args.nearest:
        moving = io.Image(moving.array.astype("float32"), moving.geometry)
    warped = io.warp_image(moving, field, mode="nearest" if args.nearest else "bilinear",
                           default_value=args.default_value, backend=args.backend)
    io.write_image(args.out, warped, what="--out file")
    _say(args, f"wrote {args.out} ({reference.geometry.describe()}, {'nearest' if args.nearest else 'linear'})")
    return 0


def _cmd_jacobian(args) -> int:
    from . import io

    if args.out:
        io.check_writable(args.out, what="--out file")
    reference = io.read_image(args.reference, what="reference image").geometry if args.reference else None
    field = io.read_displacement_field(args.transform, reference, what="transform")
    det = field.jacobian_determinant().numpy()
    print(f"folds: {field.fold_percentage():.4f} % of {det.size} cells (negative Jacobian determinant); "
          f"determinant min {det.min():.4f}, mean {det.mean():.4f}, max {det.max():.4f}", flush=True)
    if args.out:
        _write_jacobian(args.out, field, what="--out file")
        _say(args, f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------
# train, demo, bench
# ------------------------------------------------------------------------------------------------

TRAIN_CONFIGS = {
    # input shape, intensity preset, pairs, steps of stage 1 / stage 2 (the paper's protocol)
    "lung": dict(shape=(175, 175, 175), preset="lung_ct", pairs="intra"),
    "brain": dict(shape=(130, 155, 130), preset="mri", pairs="inter"),
    "knee": dict(shape=(80, 192, 192), preset="mri", pairs="inter"),
    "synthetic2d": dict(shape=(128, 128), preset=None, pairs=None),
}
# --precision and --checkpointing: TrainConfig's amp and checkpoint_activations
TRAIN_PRECISIONS = {"auto": "auto", "bfloat16": True, "float32": False}
TRAIN_CHECKPOINTING = {"selective": "selective", "full": True, "none": False}


def _cmd_train(args) -> int:
    from .io import InputError

    try:
        from .data import SyntheticPairDataset, VolumePairDataset
        from .train import MemoryBudgetError, TrainConfig, train_two_stage
    except ImportError:
        raise UsageError(_network_layer_missing("train")) from None
    spec = TRAIN_CONFIGS[args.config]
    shape = tuple(args.shape) if args.shape else spec["shape"]
    if len(shape) != len(spec["shape"]):
        raise UsageError(f"--shape needs {len(spec['shape'])} sizes for --config {args.config}")
    if args.config == "synthetic2d":
        dataset = SyntheticPairDataset(args.pairs or 1000, shape, seed=args.seed)
    else:
        if args.data is None:
            raise UsageError(f"--config {args.config} needs --data DIR (a folder of NIfTI/NRRD volumes)")
        if not os.path.isdir(args.data):
            raise InputError(f"--data {args.data!r} is not a folder")
        try:
            dataset = VolumePairDataset(args.data, shape, preset=spec["preset"], pairs=spec["pairs"],
                                        masks=args.masks, labels=args.labels, pattern=args.pattern, cache=True)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(f"--data {args.data!r}: {e}") from None
    out = args.out or os.path.join("runs", args.config)
    config = TrainConfig(batch_size=args.batch_size, lr=args.lr, device=args.device, backend=args.backend,
                         seed=args.seed, amp=TRAIN_PRECISIONS[args.precision],
                         checkpoint_activations=TRAIN_CHECKPOINTING[args.checkpointing],
                         channels_last=args.channels_last, progress=not args.quiet, resume=not args.no_resume,
                         memory_budget=_training_budget(args, dataset, shape))
    layout = "channels-last" if args.channels_last else "channels-first"
    settings = f"U-Nets: {args.precision} precision, {args.checkpointing} checkpointing, {layout}"
    _say(args, f"training the {args.config} configuration: {len(dataset)} pairs at {'x'.join(map(str, shape))}, "
               f"{args.steps_stage1} + {args.steps_stage2} steps, output {out}; "
               f"{settings if config.memory_budget is None else 'U-Net settings chosen by --memory-budget'}")
    start = time.perf_counter()
    try:
        train_two_stage(dataset, out, shape, stage1_steps=args.steps_stage1, stage2_steps=args.steps_stage2,
                        config=config, lmbda=args.lmbda, width=args.width)
    except MemoryBudgetError as e:  # raised before anything is written
        raise InputError(f"--memory-budget: {e}") from None
    _say(args, f"trained in {time.perf_counter() - start:.0f} s; model: {os.path.join(out, 'stage2', 'model.pt')}")
    return 0


def _training_budget(args, dataset, shape) -> int | str | None:
    """--memory-budget in bytes, less what the cached volumes will take (they stay in memory)."""
    if args.memory_budget is None:
        return None
    from .train import MemoryBudgetError, parse_size
    from .train.memory_budget import format_size

    try:
        budget = parse_size(args.memory_budget)
    except MemoryBudgetError as e:
        raise UsageError(f"--memory-budget: {e}") from None
    volumes = len(getattr(dataset, "paths", ()))
    cache = volumes * math.prod(shape) * (4 + (8 if args.labels else 0))  # float32 images, int64 labels
    if cache >= budget:
        raise UsageError(f"--memory-budget {args.memory_budget} ({format_size(budget)}) is too small: the {volumes} "
                         f"cached volumes alone take {format_size(cache)}")
    if not cache:
        return args.memory_budget
    _say(args, f"memory budget {format_size(budget)}: {format_size(cache)} kept for the cached volumes")
    return budget - cache


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, size=args.size, seed=args.seed, backend=args.backend, progress=not args.quiet,
             quiet=args.quiet, synthetic=args.synthetic)
    return 0


def _benchmark_root() -> Path | None:
    """The folder holding ``benchmarks/__main__.py``: the working directory or the source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "benchmarks" / "__main__.py").is_file():
            return root
    return None


def _cmd_bench(args) -> int:
    root = _benchmark_root()
    if root is None:
        raise UsageError("the benchmark runner (benchmarks/__main__.py) is not available: run 'gradicon-fast bench' "
                         "from the gradicon_fast source checkout")
    rest = list(args.bench_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.call([sys.executable, "-m", "benchmarks", *rest], cwd=str(root), env=env)


# ------------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------------


def _finish_subcommand(p, func, *, backend=True, threads=False):
    """The options every subcommand shares (``--backend``, ``--threads`` where asked, ``--quiet``), and its handler."""
    p.set_defaults(func=func)
    if backend:
        p.add_argument("--backend", choices=("auto", "cpu", "torch", "cuda", "triton"), default=None,
                       help="implementation of the ops (default: auto — fused kernels when available)")
    if threads:
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads (torch.set_num_threads; default: torch's choice, which follows "
                       "OMP_NUM_THREADS). Model-free registration gives the same transforms for any N. On cores "
                       "busy with other jobs, OpenMP's threads spin waiting on each other: use fewer threads "
                       "there, or set OMP_WAIT_POLICY=PASSIVE in the environment")
    p.add_argument("-q", "--quiet", action="store_true", help="print only results and errors; no progress bars")


def _add_default_value(p):
    p.add_argument("--default-value", type=float, default=0.0, metavar="V",
                   help="value of the points that fall outside the moving image (default 0, as ITK/ANTs give when "
                   "they apply the transform); see docs/conventions.md §7")


def _set_threads(args) -> None:
    """``--threads N`` if given, else torch's default: never derived from the machine's load, so that
    a command's run time does not depend on what else happened to be running (--help says how to
    avoid OpenMP stalls on busy cores)."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)


def _end_now_after_hdf5_failure(status: int) -> None:
    """After HDF5 failed to write a transform file (reported already), end the process here: HDF5's own
    exit handler would fail to close that file again, with a page of diagnostics or a crash."""
    from .io.transform import hdf5_write_failed

    if hdf5_write_failed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradicon-fast", description="GradICON registration: register, warp, inspect, train.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run 'gradicon-fast COMMAND --help' for the options of a command.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gradicon_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("register", help="register a moving image to a fixed image",
                       description="Register MOVING to FIXED. Without --model the displacement fields are optimised "
                       "directly (multi-resolution, LNCC + GradICON); with --model a trained network registers the "
                       "pair after instance optimisation. Outputs lie on the fixed image's grid (ITK/ANTs "
                       "convention; see docs/register.md).")
    p.add_argument("--fixed", required=True, metavar="F", help="fixed image (NIfTI, NRRD, MetaImage)")
    p.add_argument("--moving", required=True, metavar="M", help="moving image")
    p.add_argument("--fixed-mask", "--fixed-segmentation", metavar="MASK", help="mask or segmentation of the fixed "
                   "image (voxels > 0; same grid); multiplies the image (see --mask-use)")
    p.add_argument("--moving-mask", "--moving-segmentation", metavar="MASK", help="mask or segmentation of the moving "
                   "image (voxels > 0; same grid)")
    p.add_argument("--warped-out", metavar="W", help="moving image resampled on the fixed grid (.nii.gz, .nrrd, .mha)")
    _add_default_value(p)
    p.add_argument("--transform-out", metavar="T", help="fixed→moving displacement field: .nii.gz (ANTs-style "
                   "vector NIfTI, LPS mm), .nrrd/.mha, or .h5 (ITK DisplacementFieldTransform)")
    p.add_argument("--inverse-transform-out", metavar="T_INV", help="moving→fixed displacement field, on the moving "
                   "image's grid (same formats)")
    p.add_argument("--intensity", choices=("auto", "ct", "mri", "minmax", "none"), default="auto",
                   help="intensity normalisation of both images: ct = window [-1000, 0] HU, mri = percentiles "
                   "0.5-99.5, auto = ct if the image looks like HU (default)")
    p.add_argument("--nan-value", type=float, metavar="V", help="replace NaN and infinite voxels of both images with "
                   "V (default: such voxels are an error)")
    p.add_argument("--model", metavar="CKPT", help="trained network checkpoint (gradicon_fast.nn.save_model / "
                   "training output) or official weight file (uniGradICON, multiGradICON, the GradICON paper's models)")
    p.add_argument("--io-iterations", type=int, default=None, metavar="N",
                   help="instance-optimisation steps with --model (default 50; 0: the network's maps as they are)")
    p.add_argument("--model-preset", choices=("unigradicon", "multigradicon", "lung", "knee", "brain"),
                   help="input shape of an official weight file (icon_registration / uniGradICON regis_net state "
                   "dict): unigradicon, multigradicon and lung 175³, knee 80×192×192, brain 130×155×130; without a preset "
                   "or --model-shape: 175³")
    p.add_argument("--model-shape", type=int, nargs="+", metavar="N", help="input shape of the network: for an "
                   "official weight file instead of a preset; for a gradicon_fast model instead of its saved shape")
    p.add_argument("--init", choices=("none", "center", "moments", "affine"), default=None,
                   help="initial alignment of model-free registration, included in the output transforms: none (trust "
                   "the headers' world coordinates), center (of the image boxes), moments (centres of mass), affine "
                   "(default: an affine fitted from the best of those three; registers scans that lie far apart)")
    p.add_argument("--affine-out", metavar="A", help="the initial alignment alone as an ITK affine transform file "
                   "(.mat as ANTs writes, .txt/.tfm); --transform-out already includes it")
    p.add_argument("--jacobian-out", metavar="J", help="Jacobian determinant of the fixed→moving transform, one value "
                   "per cell of the fixed grid (.nii.gz, .nrrd, .mha), as 'gradicon-fast jacobian --out' writes it")
    g = p.add_argument_group("networks (--model): the published uniGradICON protocol")
    g.add_argument("--fixed-modality", choices=("ct", "mri"), help="preprocessing of the fixed image as "
                   "unigradicon-register does: ct clamps to [-1000, 1000] HU, mri to [minimum, 99th percentile], both "
                   "scaled to [0, 1] (default: --intensity)")
    g.add_argument("--moving-modality", choices=("ct", "mri"), help="the same for the moving image")
    g.add_argument("--io-similarity", choices=("lncc", "lncc2", "mind"), help="similarity of the instance "
                   "optimisation: lncc, lncc2 (squared) or mind (MIND-SSC, radius 2, dilation 2; 3D); default: the "
                   "model's own (LNCC σ=5 for the published models)")
    g.add_argument("--io-lr", type=float, metavar="LR", help="Adam step of the instance optimisation (default 2e-5)")
    g.add_argument("--mask-use", choices=("input", "loss", "both"), default="input",
                   help="what the masks do: input multiplies the images (default), loss restricts the instance "
                   "optimisation's similarity to them (loss-function masking; needs both masks), both does both")
    g = p.add_argument_group("model-free registration")
    g.add_argument("--iterations", type=int, nargs="+", metavar="N", help="Adam steps per level, coarse to fine "
                   "(default 100 100 50)")
    g.add_argument("--lmbda", type=float, metavar="λ", help="weight of the GradICON penalty (default 2)")
    g.add_argument("--sigma", type=int, help="LNCC Gaussian σ in voxels of each level (default 3)")
    g.add_argument("--similarity", choices=("lncc", "lncc2", "mse"), help="similarity (default lncc)")
    g.add_argument("--max-size", type=int, metavar="N", help="voxels along the longest physical axis of the loss grid, "
                   "which is near-isotropic in mm (default 80)")
    g.add_argument("--lr", type=float, help="Adam step in field voxels (default 0.1)")
    g.add_argument("--smooth", type=float, metavar="σ", help="Gaussian smoothing of the field updates, in field "
                   "voxels (default 2; 0: none)")
    g.add_argument("--seed", type=int, help="seed of the penalty's random points (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    _finish_subcommand(p, _cmd_register, threads=True)

    p = sub.add_parser("warp", help="apply a transform to an image",
                       description="Resample MOVING on the grid of REFERENCE through TRANSFORM (a displacement field "
                       "image or an ITK transform file, ITK convention: reference point p maps to p + u(p)).")
    p.add_argument("--moving", required=True, metavar="M", help="image to resample")
    p.add_argument("--transform", required=True, metavar="T", help="displacement field (.nii.gz/.nrrd/.mha) or ITK "
                   "transform file (.h5/.tfm/.txt/.mat)")
    p.add_argument("--reference", required=True, metavar="F", help="image whose grid the output takes")
    p.add_argument("--out", required=True, metavar="W", help="output image (.nii.gz, .nrrd, .mha)")
    _add_default_value(p)
    p.add_argument("--nearest", action="store_true", help="nearest-neighbour interpolation (label maps); keeps the "
                   "voxel type")
    _finish_subcommand(p, _cmd_warp)

    p = sub.add_parser("jacobian", help="Jacobian determinant and fold percentage of a transform",
                       description="Print the fold percentage (cells with negative Jacobian determinant, docs/conventions.md §4) of "
                       "a displacement field and optionally write the determinant image (one value per grid cell).")
    p.add_argument("--transform", required=True, metavar="T", help="displacement field image or ITK transform file")
    p.add_argument("--reference", metavar="F", help="sample the transform on this image's grid (needed for "
                   "transforms that are not displacement fields)")
    p.add_argument("--out", metavar="J", help="Jacobian determinant image (.nii.gz, .nrrd, .mha)")
    _finish_subcommand(p, _cmd_jacobian, backend=False)

    p = sub.add_parser("train", help="train the standard network (two-stage protocol)",
                       description="Train the paper's 4-step network on a folder of volumes with the paper's "
                       "two-stage protocol (gradicon_fast.train).")
    p.add_argument("--config", required=True, choices=sorted(TRAIN_CONFIGS), help="data set preset (input shape, "
                   "intensity preset, pairing)")
    p.add_argument("--data", metavar="DIR", help="folder of NIfTI/NRRD volumes (not needed for synthetic2d)")
    p.add_argument("--out", metavar="RUN", help="output folder (default runs/CONFIG); an existing run is resumed")
    p.add_argument("--masks", metavar="DIR", help="folder of masks with the volumes' file names (lung)")
    p.add_argument("--labels", metavar="DIR", help="folder of label maps with the volumes' file names")
    p.add_argument("--pattern", help="glob selecting the volumes in --data")
    p.add_argument("--shape", type=int, nargs="+", help="override the network input shape")
    p.add_argument("--steps-stage1", type=int, default=50_000, metavar="N")
    p.add_argument("--steps-stage2", type=int, default=50_000, metavar="N")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lmbda", type=float, default=1.5)
    p.add_argument("--width", type=float, default=1.0, help="scale of the U-Net channel counts (1 = the paper's)")
    p.add_argument("--pairs", type=int, default=None, help="number of synthetic pairs (synthetic2d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=sorted(TRAIN_PRECISIONS), default="auto", help="what the U-Nets compute "
                   "in: auto (default: bfloat16 autocast where the CPU or GPU computes it natively, else float32), "
                   "bfloat16 (autocast everywhere) or float32 (docs/training.md)")
    p.add_argument("--amp", dest="precision", action="store_const", const="bfloat16",
                   help="same as --precision bfloat16 (kept for older scripts)")
    p.add_argument("--checkpointing", choices=sorted(TRAIN_CHECKPOINTING), default="selective", help="activation "
                   "checkpointing of the U-Nets: selective (default: convolution outputs kept, the cheap ops "
                   "recomputed in backward), full (each U-Net's forward rerun) or none")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the U-Nets' activations in the usual (channels-first) layout")
    p.add_argument("--memory-budget", metavar="SIZE", help="train within SIZE of memory (RAM on the CPU, GPU memory "
                   "on a GPU), e.g. 20GB, 512MiB, 1.5G (G = 2^30 bytes, GB = 10^9): precision, activation "
                   "checkpointing and micro-batch (with gradient accumulation keeping --batch-size) are chosen by "
                   "probe steps, fastest first; the choice is printed and saved with the checkpoints "
                   "(docs/training.md)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if RUN holds checkpoints")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    _finish_subcommand(p, _cmd_train)

    p = sub.add_parser("demo", help="register a brain template to a deformed copy and save a figure",
                       description="Register the MNI ICBM152 brain template (bundled in the nilearn package, which "
                       "`make setup` installs; read offline) to the same brain under a known smooth deformation, "
                       "with a bias field and noise; print Dice per tissue, the error against the true deformation "
                       "in mm, folds and time; save a figure, a metrics JSON and the images (NIfTI).")
    p.add_argument("--out", default="demo_output", metavar="DIR", help="output folder (default demo_output)")
    p.add_argument("--size", type=int, default=None,
                   help="voxels along the brain's longest axis (default 96, about 2 mm voxels); with --synthetic, "
                   "voxels per axis of the synthetic volume (default 128)")
    p.add_argument("--synthetic", action="store_true",
                   help="register a built-in synthetic pair (textured body with labelled organs) instead: no data needed")
    p.add_argument("--seed", type=int, default=0)
    _finish_subcommand(p, _cmd_demo, threads=True)

    p = sub.add_parser("bench", help="run the benchmark suite (python -m benchmarks)", add_help=False,
                       description="Run the benchmark runner of the source checkout; arguments are passed on.")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    as_program = argv is None  # the process's entry point (called with arguments: from Python code)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        args = argparse.Namespace(command="bench", func=_cmd_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "register":
        args.io_iterations_given = args.io_iterations is not None
        if args.io_iterations is None:
            args.io_iterations = 50
    from .io import InputError

    prog = f"gradicon-fast {args.command}"
    if hasattr(args, "threads"):
        if args.threads is not None and args.threads < 1:
            _stderr(f"{prog}: error: --threads must be >= 1")
            return EXIT_USAGE
        _set_threads(args)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        _stderr(f"{prog}: error: {e}")
        return EXIT_USAGE
    except InputError as e:
        _stderr(f"{prog}: error: {e}")
        if as_program:
            _end_now_after_hdf5_failure(EXIT_INPUT)
        return EXIT_INPUT
    except KeyboardInterrupt:
        _stderr(f"{prog}: interrupted")
        return 130
    except MemoryError:
        _stderr(f"{prog}: error: out of memory")
        return EXIT_INPUT
    except Exception as e:  # one line, unless asked for the traceback
        if os.environ.get("GRADICON_FAST_DEBUG"):
            raise
        text = str(e).strip().splitlines()
        _stderr(f"{prog}: error: {type(e).__name__}: {text[0] if text else ''} (set GRADICON_FAST_DEBUG=1 for the "
                f"traceback)")
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
