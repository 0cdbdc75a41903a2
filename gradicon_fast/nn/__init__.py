"""Registration networks on the fused ops: the paper's standard network and its objective.

    import gradicon_fast.nn as gnn
    model = gnn.standard_network((175, 175, 175))      # GradICON objective around the 4-step net
    terms = model(image_A, image_B)                     # LossTerms(total, similarity, regularization, fold_percentage)
    result = model.register(image_A, image_B)           # RegistrationResult: chain_AB, chain_BA
    warped_A = result.warp(image_A)                     # A ∘ φ_AB ≈ B

Convention: φ_AB maps B's grid into A (``A ∘ φ_AB ≈ B``), as in the paper.
"""

from __future__ import annotations

from typing import Sequence

from .networks import (
    Downsample,
    DisplacementField,
    RegistrationModule,
    RegistrationResult,
    TwoStep,
    configure,
    displacement_fields,
    fast_defaults,
)
from .objective import REGULARIZERS, GradICON, LossTerms
from .similarity import Similarity, gaussian_blur, gaussian_taps, lncc, lncc_loss, mse_loss, squared_lncc_loss
from .unet import DECODER_CHANNELS, ENCODER_CHANNELS, TallUNet, scaled_channels

__all__ = [
    "DECODER_CHANNELS", "ENCODER_CHANNELS", "REGULARIZERS",
    "Downsample", "DisplacementField", "GradICON", "LossTerms", "RegistrationModule", "RegistrationResult",
    "Similarity", "TallUNet", "TwoStep",
    "build_model", "configure", "displacement_fields", "fast_defaults", "gaussian_blur", "gaussian_taps", "grow",
    "lncc", "lncc_loss", "load_model", "mse_loss", "save_model", "squared_lncc_loss", "standard_network", "unet_step",
]


def unet_step(dimension: int, *, image_channels: int = 1, width: float = 1.0) -> DisplacementField:
    """A displacement-field step around a tall U-Net fed ``cat[moving, fixed]``.

    ``width`` scales every channel count (1.0 = the paper's network; smaller only for quick tests).
    """
    unet = TallUNet(dimension, input_channels=2 * image_channels, output_channels=dimension,
                    encoder_channels=scaled_channels(ENCODER_CHANNELS, width),
                    decoder_channels=scaled_channels(DECODER_CHANNELS, width))
    return DisplacementField(unet)


def standard_network(input_shape: Sequence[int], *, steps: int = 4, lmbda: float = 1.5, similarity: str = "lncc",
                     sigma: int = 5, regularizer: str = "gradicon", image_channels: int = 1, width: float = 1.0,
                     backend: str | None = None) -> GradICON:
    """The paper's network ``TwoStep(TwoStep(Down(TwoStep(Down(U1), U2)), U3), U4)`` in its GradICON objective.

    ``steps=4`` is the full network; ``steps=3`` leaves out U4 (stage 1 of the protocol; see
    :func:`grow`). U1 runs at ¼ resolution, U2 at ½, U3 and U4 at full. ``input_shape`` is the
    spatial shape of the images (2 or 3 axes); it is also the penalty grid.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) not in (2, 3):
        raise ValueError(f"input_shape must have 2 or 3 entries, got {input_shape}")
    if steps not in (3, 4):
        raise ValueError(f"steps must be 3 or 4, got {steps}")
    d = len(input_shape)

    def U():
        return unet_step(d, image_channels=image_channels, width=width)

    net = TwoStep(Downsample(TwoStep(Downsample(U()), U())), U())
    if steps == 4:
        net = TwoStep(net, U())
    model = GradICON(net, input_shape, lmbda=lmbda, similarity=similarity, sigma=sigma, regularizer=regularizer,
                     backend=backend)
    model.config = dict(kind="standard", input_shape=list(input_shape), steps=steps, lmbda=lmbda,
                        similarity=similarity, sigma=sigma, regularizer=regularizer, image_channels=image_channels,
                        width=width)
    return model


def grow(model: GradICON) -> GradICON:
    """Stage 2 of the protocol: the 3-step network ``model`` with a new full-resolution step U4 appended.

    Returns a new :class:`GradICON` whose network is ``TwoStep(model.regis_net, U4)``: the trained
    steps are shared (same parameters, not copied), U4 is freshly initialised (zero last layer, so
    the grown network initially computes exactly what ``model`` did).
    """
    if model.config.get("kind") != "standard" or model.config.get("steps") != 3:
        raise ValueError("grow() takes a 3-step standard network (standard_network(..., steps=3))")
    cfg = dict(model.config)
    first = displacement_fields(model.regis_net)[0]
    param = next(first.parameters())
    step = unet_step(model.dimension, image_channels=cfg["image_channels"], width=cfg["width"]).to(param.device)
    configure(step, amp_dtype=first.amp_dtype, checkpoint=first.checkpoint, channels_last=first.channels_last)
    grown = GradICON(TwoStep(model.regis_net, step), model.input_shape, lmbda=model.lmbda,
                     similarity=model.similarity.name, sigma=model.similarity.sigma, regularizer=model.regularizer,
                     stride=model.stride, symmetric=model.symmetric, backend=model.backend)
    cfg["steps"] = 4
    grown.config = cfg
    return grown


def build_model(config: dict, **overrides) -> GradICON:
    """Rebuild a model from its ``config`` (as saved by :func:`save_model` or in training checkpoints)."""
    cfg = dict(config)
    cfg.update(overrides)
    if cfg.pop("kind", "standard") != "standard":
        raise ValueError(f"unknown model kind in {config!r}")
    shape = cfg.pop("input_shape")
    return standard_network(shape, **cfg)


def save_model(model: GradICON, path) -> None:
    """Save weights and config (atomically) so that :func:`load_model` rebuilds the model."""
    from ..train.checkpoint import atomic_save

    model = getattr(model, "module", model)
    atomic_save({"format": "gradicon_fast.model/1", "config": model.config, "model": model.state_dict()}, path)


def load_model(path, *, map_location="cpu", backend: str | None = None, preset: str | None = None,
               shape: Sequence[int] | None = None, **overrides) -> GradICON:
    """Load a model from a weight file; the file is read with ``weights_only=True`` (never code).

    Accepted formats:

    - a file of :func:`save_model` or a training checkpoint of ``gradicon_fast.train``;
    - the state dict of an official GradICON-family network (``torch.save(net.regis_net.state_dict())``
      in ``icon_registration`` / ``unigradicon``: the published lung, knee, brain, uniGradICON and
      multiGradICON weights), 4-step or stage-1 3-step, loaded strictly into :func:`standard_network`
      with the published objective (:mod:`gradicon_fast.nn.published`).

    Official files hold no input shape: it is ``shape``, or that of ``preset``
    (``unigradicon``, ``multigradicon``, ``lung``: 175³; ``knee``: 80×192×192; ``brain``: 130×155×130),
    by default 175³ (or the shape of the identity maps that older ``icon_registration`` versions
    saved with the weights). For gradicon_fast files ``shape`` replaces the saved input shape. ``overrides``
    replace other :func:`standard_network` arguments. Bad files and shapes raise a one-line
    ``gradicon_fast.io.InputError`` (a ``ValueError``).
    """
    from ..io import InputError
    from .published import OFFICIAL_FORMAT, PUBLISHED_OBJECTIVE, input_shape_for, official_architecture, \
        official_state_dict, preset_shape, read_weights

    if preset is not None:
        preset_shape(preset)  # an unknown name fails before the file is read
    blob = read_weights(path, map_location=map_location)
    if isinstance(blob, dict) and "config" in blob and "model" in blob:
        saved_shape = [int(s) for s in blob["config"].get("input_shape", ())]
        if preset is not None:
            raise InputError(f"model checkpoint {str(path)!r} is a gradicon_fast model (input shape "
                             f"{'x'.join(map(str, saved_shape))}); presets name the input shapes of official "
                             "weight files (give a model shape to change it)")
        if shape is not None:
            if len(shape) != len(saved_shape) or any(int(s) < 2 for s in shape):
                raise InputError(f"model checkpoint {str(path)!r} holds a {len(saved_shape)}D model; the model "
                                 f"shape must be {len(saved_shape)} sizes >= 2, got {'x'.join(map(str, shape))}")
            overrides["input_shape"] = [int(s) for s in shape]
        model = build_model(blob["config"], backend=backend, **overrides)
        model.load_state_dict(blob["model"])
        return model
    official = official_state_dict(blob)
    if official is None:
        raise InputError(f"model checkpoint {str(path)!r} is not a model: expected a gradicon_fast model or "
                         f"training checkpoint (a dict with 'config' and 'model') or {OFFICIAL_FORMAT}")
    steps, state_dict, saved_shape = official
    dimension, image_channels = official_architecture(state_dict)
    input_shape = input_shape_for(preset, shape, dimension, path, saved_shape)
    config = dict(PUBLISHED_OBJECTIVE, steps=steps, image_channels=image_channels)
    config.update(overrides)
    model = standard_network(input_shape, backend=backend, **config)
    try:
        model.regis_net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InputError(f"model checkpoint {str(path)!r}: the weights do not fit the standard network: "
                         f"{details[1] if len(details) > 1 else details[0]}") from None
    # trained on numpy arrays of itk images (axes reversed from ours): gradicon_fast.published_protocol
    model.weights_format = "official"
    return model
