"""Data: pairs of NIfTI/NRRD volumes with the paper's intensity presets, and seeded synthetic pairs."""

from .synthetic import (SyntheticPairDataset, random_smooth_displacement, random_subject, synthetic_pair)
from .volumes import (PRESETS, VOLUME_SUFFIXES, VolumePairDataset, default_subject, list_volumes, load_volume,
                      normalize, read_volume, resize)

__all__ = [
    "PRESETS", "SyntheticPairDataset", "VOLUME_SUFFIXES", "VolumePairDataset", "default_subject", "list_volumes",
    "load_volume", "normalize", "random_smooth_displacement", "random_subject", "read_volume", "resize",
    "synthetic_pair",
]
