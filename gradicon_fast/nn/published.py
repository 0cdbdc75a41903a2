"""Weight files of the published GradICON-family models, and reading weight files safely.

The official packages (``icon_registration``: the paper's lung, knee and brain models;
``unigradicon``: uniGradICON and multiGradICON) save a model as the ``torch.save``d state dict of
its ``regis_net``: the standard network of docs/conventions.md §5, with the module and parameter
names that :func:`gradicon_fast.nn.standard_network` uses. Such a file holds no input shape (unless
an older version saved the identity maps with it); it comes from a preset (the shape the model was
trained at) or is given.

Every published model uses the same objective: sparse GradICON, λ = 1.5, LNCC with σ = 5, and
four steps, the last at full resolution (3 steps for a stage-1 file); only the input shape differs.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch

from ..io import InputError

# Input shape of each published model, as its package builds it.
PRESET_SHAPES: dict[str, tuple[int, ...]] = {
    "unigradicon": (175, 175, 175),
    "multigradicon": (175, 175, 175),
    "lung": (175, 175, 175),
    "knee": (80, 192, 192),
    "brain": (130, 155, 130),
}
DEFAULT_PRESET = "unigradicon"
# The objective all of them were trained with (standard_network's keyword arguments).
PUBLISHED_OBJECTIVE = dict(lmbda=1.5, similarity="lncc", sigma=5, regularizer="gradicon")

OFFICIAL_FORMAT = ("the state dict of an official GradICON-family network (icon_registration / unigradicon "
                   "regis_net, 3 or 4 steps)")


def _numpy_globals() -> list:
    """The numpy types a training checkpoint's RNG state pickles (arrays of uint32), allowed by ``weights_only``."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_weights(path, *, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors, plain containers and numpy arrays only, never code.

    A file that is missing, not a PyTorch file, or holds other objects raises a one-line ``InputError``.
    """
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"model checkpoint {str(path)!r} does not exist") from None
    except (OSError, MemoryError):
        raise
    except Exception:  # UnpicklingError, RuntimeError (zip), EOFError, ... for damaged or foreign files
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise InputError(f"model checkpoint {str(path)!r} holds pickled objects ({', '.join(unsafe[:3])}) besides "
                             "tensors, plain containers and numpy arrays; refusing to load it (weight files are read "
                             "with weights_only=True)") from None
        raise InputError(f"model checkpoint {str(path)!r} is not a readable checkpoint (damaged or truncated, or not "
                         "written by torch.save)") from None


def _unsafe_globals(path) -> list:
    """The classes and functions a readable ``torch.save`` archive would need to unpickle (none for a damaged file)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_globals()}
    try:
        return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
    except Exception:
        return []


def _key_set(steps: int) -> frozenset:
    # Parameter names do not depend on the dimension or the width: a tiny network on the meta device has them all.
    from . import standard_network

    with torch.device("meta"):
        return frozenset(standard_network((8, 8), steps=steps, width=1 / 16).regis_net.state_dict())


_OFFICIAL_KEYS: dict[int, frozenset] = {}


class OfficialWeights(NamedTuple):
    steps: int                                # 4, or 3 for the stage-1 network
    state_dict: dict                          # the weights, keys as in standard_network(...).regis_net
    saved_shape: tuple[int, ...] | None       # the input shape the file was saved at, when it records one


def _is_identity_map(key: str) -> bool:
    return key == "identity_map" or key.endswith(".identity_map")


def official_state_dict(blob) -> OfficialWeights | None:
    """The weights of an official standard network in ``blob``, or None when it is something else.

    Recognised by its keys: those of the 4-step network or of the stage-1 3-step one, either bare (the
    published files) or under ``regis_net.`` (the state dict of a whole loss module such as
    ``GradientICONSparse``). Older ``icon_registration`` versions saved each module's identity map
    with the weights: those are set aside, and the network's own tells the shape it was saved at.
    """
    if not isinstance(blob, Mapping) or not blob:
        return None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items()):
        return None
    weights = {k: v for k, v in blob.items() if not _is_identity_map(k)}
    identity_maps = {k: v for k, v in blob.items() if _is_identity_map(k)}
    prefix = "regis_net."
    if weights and all(k.startswith(prefix) for k in weights):
        weights = {k[len(prefix):]: v for k, v in weights.items()}
        identity_maps = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in identity_maps.items()}
    top = identity_maps.get("identity_map")
    saved_shape = tuple(int(s) for s in top.shape[2:]) if top is not None and top.ndim in (4, 5) else None
    keys = frozenset(weights)
    for steps in (4, 3):
        if steps not in _OFFICIAL_KEYS:
            _OFFICIAL_KEYS[steps] = _key_set(steps)
        if keys == _OFFICIAL_KEYS[steps]:
            return OfficialWeights(steps, weights, saved_shape)
    return None


def official_architecture(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(dimension, image_channels) of the network an official state dict belongs to (from its first convolution)."""
    first = next(v for k, v in state_dict.items() if k.endswith("downConvs.0.weight"))
    return first.ndim - 2, first.shape[1] // 2


def input_shape_for(preset: str | None, shape: Sequence[int] | None, dimension: int, path,
                    saved_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """The network input shape for official weights of a ``dimension``-D network: ``shape``, else the
    preset's, else the shape the file was saved at (``saved_shape``, when it records one), else the
    default preset's; one-line ``InputError`` when it cannot hold those weights."""
    if preset is not None and shape is not None:
        raise InputError("give a model preset or a model shape, not both")
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        source = f"model shape {'x'.join(map(str, shape))}"
    elif preset is None and saved_shape is not None:
        shape = tuple(saved_shape)
        source = f"saved input shape {'x'.join(map(str, shape))}"
    else:
        name = DEFAULT_PRESET if preset is None else preset
        shape = preset_shape(name)
        source = f"preset {name!r} ({'x'.join(map(str, shape))})"
    if len(shape) != dimension:
        raise InputError(f"model checkpoint {str(path)!r}: the {source} has {len(shape)} axes but the weights "
                         f"are of a {dimension}D network")
    if any(s < 2 for s in shape):
        raise InputError(f"the {source} needs every axis >= 2")
    return shape


def preset_shape(name: str) -> tuple[int, ...]:
    if name not in PRESET_SHAPES:
        raise InputError(f"unknown model preset {name!r}; choose from {', '.join(PRESET_SHAPES)}")
    return PRESET_SHAPES[name]
