"""sirf_ddip.io: STIR Interfile and NIfTI.

:func:`read_image` / :func:`write_image` dispatch on the suffix (``.hv`` Interfile, ``.nii`` / ``.nii.gz``
NIfTI); projection data are Interfile only (:func:`read_projdata`, :func:`write_projdata`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputFileError

__all__ = ["read_image", "write_image", "read_projdata", "write_projdata", "image_format"]


def image_format(path: str | os.PathLike) -> str:
    """``"interfile"`` or ``"nifti"`` from the file name; raises :class:`InputFileError` otherwise."""
    name = Path(path).name.lower()
    if name.endswith(".hv"):
        return "interfile"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    raise InputFileError(path, "unknown image format: expected .hv (STIR Interfile), .nii or .nii.gz")


def read_image(path: str | os.PathLike):
    """Read an image (``.hv``, ``.nii``, ``.nii.gz``) into a :class:`sirf_ddip.data.Image`."""
    if image_format(path) == "interfile":
        from .interfile import read_image as _r
    else:
        from .nifti import read_nifti as _r
    return _r(path)


def write_image(path: str | os.PathLike, image, overwrite: bool = False):
    """Write an image; the format follows the suffix. Refuses to overwrite unless ``overwrite``."""
    if image_format(path) == "interfile":
        from .interfile import write_image as _w
    else:
        from .nifti import write_nifti as _w
    return _w(path, image, overwrite=overwrite)


def read_projdata(path: str | os.PathLike):
    """Read STIR Interfile projection data (``.hs``)."""
    from .interfile import read_projdata as _r

    return _r(path)


def write_projdata(path: str | os.PathLike, projdata, overwrite: bool = False):
    """Write STIR Interfile projection data (``.hs`` + ``.s``)."""
    from .interfile import write_projdata as _w

    return _w(path, projdata, overwrite=overwrite)
