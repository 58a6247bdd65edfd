"""Geometry of a STIR projection-data template (``.hs`` whose data file may be empty or absent).

STIR's templates (e.g. ``examples/Siemens-mMR/template_span11.hs``) only describe a geometry; their data file
is empty. :func:`read_template_geometry` reads the header alone, with the same checks as
:func:`sirf_ddip.io.interfile.read_projdata` (TOF, arc correction, axis order, segment table).
"""

from __future__ import annotations

import os

from ..errors import InputFileError
from ..geometry.sinogram import SinogramGeometry
from .header import InterfileHeader
from .sinogram_header import geometry_from_header

__all__ = ["read_template_geometry"]


def read_template_geometry(path: str | os.PathLike) -> SinogramGeometry:
    """The :class:`SinogramGeometry` described by a projection-data header; the data file is not read.

    Raises
    ------
    InputFileError
        Missing header, not projection data, inconsistent segment keys (naming the key).
    UnsupportedDataError
        TOF or arc-corrected projection data, more than one time frame.
    """
    hdr = InterfileHeader.read(path)
    if hdr.get("number of dimensions") is None:
        raise InputFileError(hdr.path, "not a projection-data header (no number of dimensions)",
                             key="number of dimensions")
    from .interfile import _check_single_frame, segment_layout_from_header

    _check_single_frame(hdr)
    segment_layout_from_header(hdr)  # TOF and axis-order checks, as when reading data
    return geometry_from_header(hdr)
