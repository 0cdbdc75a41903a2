"""Image and transform I/O with physical geometry (SimpleITK for every format; LPS millimetres).

    from gradicon_fast import io
    fixed = io.read_image("fixed.nii.gz")           # Image: array (i, j, k) + Geometry
    field = io.read_displacement_field("warp.nii.gz")
    warped = io.warp_image(io.read_image("moving.nii.gz"), field)
    io.write_image("warped.nii.gz", warped)          # crash-safe: temporary file, checked, then renamed
    with io.output_group():                          # several outputs: all of them or none
        ...

See ``image.py`` for the axis and coordinate conventions, ``transform.py`` for the exported
displacement fields (ITK/ANTs convention) and ``output.py`` for how files are written.
"""

from .image import (
    INTENSITY_PRESETS,
    WRITABLE_IMAGE_SUFFIXES,
    Geometry,
    Image,
    InputError,
    atomic_output,
    check_finite,
    check_writable,
    guess_modality,
    normalize_intensity,
    read_image,
    read_mask,
    read_sitk,
    replace_nonfinite,
    suffix_of,
    write_image,
    write_sitk,
)
from .output import OutputError, output_group
from .transform import (
    FIELD_IMAGE_SUFFIXES,
    TRANSFORM_FILE_SUFFIXES,
    DisplacementField,
    chain_to_field,
    displacement_to_physical,
    field_of_transform,
    physical_to_displacement,
    read_displacement_field,
    read_transform,
    warp_image,
    write_displacement_field,
)

__all__ = [
    "DisplacementField", "FIELD_IMAGE_SUFFIXES", "Geometry", "INTENSITY_PRESETS", "Image", "InputError", "OutputError",
    "TRANSFORM_FILE_SUFFIXES", "WRITABLE_IMAGE_SUFFIXES", "atomic_output", "chain_to_field", "check_finite",
    "check_writable", "displacement_to_physical", "field_of_transform", "guess_modality", "normalize_intensity",
    "output_group", "physical_to_displacement", "read_displacement_field", "read_image", "read_mask", "read_sitk",
    "read_transform", "replace_nonfinite", "suffix_of", "warp_image", "write_displacement_field", "write_image",
    "write_sitk",
]
