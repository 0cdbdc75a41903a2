"""gradicon_fast: fused GradICON registration losses and networks for PyTorch.

    import gradicon_fast as gf
    loss = gf.gradicon_loss(chain_AB, chain_BA, shape=(175, 175, 175), stride=2)

See README.md for the conventions and backends, and docs/conventions.md for the exact semantics.
"""

from . import convert, reference
from .backend_registry import backends, current_backend, use_backend
from .functional import (
    bending_energy,
    compose,
    diffusion_energy,
    fold_percentage,
    gradicon_loss,
    icon_loss,
    identity_map,
    jacobian_determinant,
    transform_points,
    warp,
)

from .pair_registration import register

__version__ = "0.1.0"

__all__ = [
    "backends",
    "bending_energy",
    "compose",
    "convert",
    "current_backend",
    "diffusion_energy",
    "fold_percentage",
    "gradicon_loss",
    "icon_loss",
    "identity_map",
    "jacobian_determinant",
    "reference",
    "register",
    "transform_points",
    "use_backend",
    "warp",
]
