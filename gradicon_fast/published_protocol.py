"""How a registration network sees a pair of images, and how its maps become physical transforms:
the protocol of the published uniGradICON pipeline (``unigradicon-register`` and the official ITK
wrapper of ``icon_registration``), reproduced exactly.

- **Intensities** (``modality``): CT is clamped to [-1000, 1000] HU, MRI to [its minimum, its 99th
  percentile] (the k-th smallest voxel, k = int(0.99·count), at least 1), then scaled to [0, 1];
  a mask (voxels > 0) then multiplies the image.
- **Network grid**: each image's own voxel box is stretched onto the network's input grid, as
  ``F.interpolate(mode="(bi/tri)linear", align_corners=False)`` resamples (no anti-aliasing): network
  index x and image index v are related by ``v + ½ = (n / N)·(x + ½)`` per axis (n the image's
  size, N the network's). Each image keeps its own box: no resampling of one onto the other first.
- **Axis order**: the published networks were trained on ``itk``'s numpy arrays, whose axes are the
  reverse of ours (docs/conventions.md §6): their input is our array transposed, and their maps'
  axes and components are reversed back.
- **Back to physical space**: the fixed point p has fixed index v, network index x_B; the network's
  displacement (in network voxels, interpolated linearly, clamped to its grid) sends it to x_A; the
  moving index is then ``w + ½ = (n_A / N)·(x_A + ½)`` and the moving point follows from the moving
  image's header. This is the composite transform the official wrapper builds (its resampling
  transform of the moving image, the displacement field in network index space, the inverse
  resampling transform of the fixed image). Every fixed voxel centre lies within half a network voxel
  of the network grid, where ITK's field interpolation also clamps to the border.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

MODALITIES = ("ct", "mri")
CT_WINDOW = (-1000.0, 1000.0)
MRI_UPPER_QUANTILE = 0.99


def kth_quantile(values: np.ndarray, q: float) -> float:
    """The k-th smallest value, k = int(q·count) kept within [1, count] (the published pipeline's percentile)."""
    flat = np.asarray(values, dtype=np.float32).ravel()
    k = max(1, min(int(q * flat.size), flat.size))
    return float(np.partition(flat, k - 1)[k - 1])


def intensity_window(array: np.ndarray, modality: str) -> tuple[float, float]:
    """The (low, high) intensities that ``modality`` maps to 0 and 1."""
    if modality == "ct":
        return CT_WINDOW
    if modality == "mri":
        array = np.asarray(array, dtype=np.float32)
        return float(array.min()), kth_quantile(array, MRI_UPPER_QUANTILE)
    raise ValueError(f"unknown modality {modality!r}: use 'ct' or 'mri'")


def preprocess(array: np.ndarray, modality: str, mask: np.ndarray | None = None, *, what: str = "image") -> np.ndarray:
    """Clamp to the modality's window, scale to [0, 1] (float32), multiply by ``mask > 0`` when given."""
    from .io import InputError

    array = np.asarray(array, dtype=np.float32)
    low, high = intensity_window(array, modality)
    if not high > low:
        raise InputError(f"the {what} has no intensity range to normalise as {modality.upper()} (its {modality} "
                         f"window is [{low:g}, {high:g}])")
    scaled = ((np.clip(array, low, high).astype(np.float64) - low) * (1.0 / (high - low))).astype(np.float32)
    if mask is not None:
        scaled = scaled * (np.asarray(mask) > 0).astype(np.float32)
    return scaled


# ------------------------------------------------------------------------------------------------
# The network grid
# ------------------------------------------------------------------------------------------------


def uses_reversed_axes(model) -> bool:
    """True for a network of an official weight file (trained on arrays in numpy's reversed axis order)."""
    return getattr(model, "weights_format", None) == "official"


def network_shape_in_image_order(model) -> tuple[int, ...]:
    shape = tuple(int(s) for s in model.input_shape)
    return shape[::-1] if uses_reversed_axes(model) else shape


def network_input(array: np.ndarray, model, *, mode: str = "linear", device=None) -> Tensor:
    """``array`` (our axis order) as the network's input ``(1, 1, *input_shape)``: transposed for an official
    network, then resampled box onto box (``mode="linear"``, or ``"nearest"`` for masks, as the official
    wrapper resizes them)."""
    array = np.asarray(array, dtype=np.float32)
    if uses_reversed_axes(model):
        array = array.transpose(tuple(reversed(range(array.ndim))))
    t = torch.from_numpy(np.ascontiguousarray(array))[None, None].to(device)
    shape = tuple(int(s) for s in model.input_shape)
    if tuple(t.shape[2:]) == shape:
        return t
    if mode == "nearest":
        return F.interpolate(t, size=shape, mode="nearest")
    return F.interpolate(t, size=shape, mode="trilinear" if t.ndim == 5 else "bilinear", align_corners=False)


def network_index(image_index: np.ndarray, image_size: int, network_size: int) -> np.ndarray:
    """Network index of an image index along one axis: ``x + ½ = (N / n)·(v + ½)``."""
    return (network_size / image_size) * (image_index + 0.5) - 0.5


def image_index(net_index, image_size: int, network_size: int):
    """Image index of a network index along one axis: ``v + ½ = (n / N)·(x + ½)``."""
    return (image_size / network_size) * (net_index + 0.5) - 0.5


def displacement_in_voxels(displacement: Tensor, model) -> Tensor:
    """A network displacement ``(1, d, *input_shape)`` in [0, 1] units, as network voxels in our axis order."""
    d = displacement.shape[1]
    sizes = torch.tensor(model.input_shape, dtype=torch.float64).reshape(1, d, *([1] * d))
    voxels = displacement.double().cpu() * (sizes - 1)
    if uses_reversed_axes(model):
        voxels = voxels.flip(1).permute(0, 1, *range(d + 1, 1, -1))
    return voxels.contiguous()


def target_points(voxels: Tensor, source, target, *, rows_per_block: int = 8) -> np.ndarray:
    """The physical points (target image, mm) of every voxel centre of the ``source`` grid, through the
    network displacement ``voxels`` (network voxels, our axis order, on the network grid): shape
    ``(*source.shape, d)``. ``source``/``target`` are :class:`~gradicon_fast.io.Geometry` s."""
    d = voxels.shape[1]
    net_shape = voxels.shape[2:]
    axes = [network_index(np.arange(n, dtype=np.float64), n, net) for n, net in zip(source.shape, net_shape)]
    # grid_sample's normalised coordinates (align_corners=True: -1 and 1 are the first and last node),
    # border-clamped like ITK's field interpolation within half a voxel of the grid
    normalised = [torch.from_numpy(2 * a / max(net - 1, 1) - 1) for a, net in zip(axes, net_shape)]
    out = np.empty(tuple(source.shape) + (d,), dtype=np.float64)
    for start in range(0, source.shape[0], rows_per_block):
        stop = min(start + rows_per_block, source.shape[0])
        coords = torch.meshgrid(normalised[0][start:stop], *normalised[1:], indexing="ij")
        grid = torch.stack(coords[::-1], dim=-1)[None]  # grid_sample wants the last spatial axis first
        sampled = F.grid_sample(voxels, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        index = []
        for k in range(d):
            x = torch.from_numpy(axes[k] if k else axes[0][start:stop])
            x = x.reshape([-1 if j == k else 1 for j in range(d)])
            index.append(image_index(x + sampled[k], target.shape[k], net_shape[k]))
        block = torch.stack(index, dim=-1).numpy()
        out[start:stop] = target.index_to_physical(block.reshape(-1, d)).reshape(block.shape)
    return out


# ------------------------------------------------------------------------------------------------
# Registering a pair with a network
# ------------------------------------------------------------------------------------------------

# --io-similarity names (the published command line's) to gradicon_fast.nn.Similarity names
IO_SIMILARITIES = {"lncc": "lncc", "lncc2": "squared_lncc", "mind": "mind"}
IO_LEARNING_RATE = 2e-5  # the published pipeline's instance-optimisation step (Adam)


def register_with_network(model, fixed, moving, fixed_array: np.ndarray, moving_array: np.ndarray, *,
                          fixed_loss_mask: np.ndarray | None = None, moving_loss_mask: np.ndarray | None = None,
                          io_iterations: int = 50, io_similarity: str | None = None, io_lr: float = IO_LEARNING_RATE,
                          backend: str | None = None, log=None):
    """The network's fixed→moving and moving→fixed transforms of the pair, as the published pipeline makes them.

    ``fixed``/``moving`` are the :class:`~gradicon_fast.io.Image` s (their grids place the result),
    ``fixed_array``/``moving_array`` their preprocessed intensities. ``io_iterations`` Adam steps of the
    model's objective on this pair (``io_similarity``: one of :data:`IO_SIMILARITIES`, default the model's
    own; the loss masks, when given, restrict each direction's similarity to its target's mask) come
    first; the model is left unchanged. Returns ``(forward, inverse, result)``: the two
    :class:`~gradicon_fast.io.DisplacementField` s (on the fixed and on the moving grid) and the network's
    :class:`~gradicon_fast.nn.RegistrationResult` (in the network grid's coordinates and axis order).
    """
    from . import functional as gfn
    from . import io
    from .nn.similarity import Similarity

    log = log or (lambda message: None)
    shape = tuple(int(s) for s in model.input_shape)
    if len(shape) != fixed.ndim:
        raise io.InputError(f"the model registers {len(shape)}D images but the images are {fixed.ndim}D")
    if io_similarity is not None and io_similarity not in IO_SIMILARITIES:
        raise ValueError(f"unknown instance-optimisation similarity {io_similarity!r}: use "
                         f"{', '.join(IO_SIMILARITIES)}")
    if io_similarity == "mind" and fixed.ndim != 3:
        raise io.InputError("the MIND-SSC similarity is defined for 3D images only")
    device = next(model.parameters()).device
    image_B = network_input(fixed_array, model, device=device)
    image_A = network_input(moving_array, model, device=device)
    mask_B = None if fixed_loss_mask is None else network_input(fixed_loss_mask, model, mode="nearest", device=device)
    mask_A = None if moving_loss_mask is None else network_input(moving_loss_mask, model, mode="nearest",
                                                                 device=device)
    if backend is not None:
        model.backend = backend
    log(f"network registration at {'x'.join(map(str, shape))}, {io_iterations} instance-optimisation steps"
        + (f" ({io_similarity})" if io_similarity and io_iterations else "")
        + (", masked similarity" if (mask_A is not None or mask_B is not None) and io_iterations else ""))
    own_similarity = model.similarity
    if io_similarity is not None:
        model.similarity = Similarity(IO_SIMILARITIES[io_similarity], sigma=getattr(own_similarity, "sigma", 5))
    try:
        if io_iterations > 0:
            from .nn.networks import fast_defaults_while_plain
            from .train import instance_optimize

            # bf16 where native, selective recomputation, channels-last (docs/performance.md)
            with fast_defaults_while_plain(model):
                result = instance_optimize(model, image_A, image_B, steps=io_iterations, lr=io_lr, mask_A=mask_A,
                                           mask_B=mask_B)
        else:
            training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    result = model.register(image_A, image_B).detach()
            finally:
                model.train(training)
    finally:
        model.similarity = own_similarity
    fields = []
    for chain, source, target in ((result.chain_AB, fixed, moving), (result.chain_BA, moving, fixed)):
        voxels = displacement_in_voxels(gfn.compose([c.detach().float() for c in chain], shape), model)
        fields.append(io.DisplacementField.from_target_points(target_points(voxels, source.geometry, target.geometry),
                                                              source.geometry))
    return fields[0], fields[1], result
