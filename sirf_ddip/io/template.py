"""Geometry of a STIR projection-data template (``.hs`` whose data file may be empty or absent).

STIR's templates (e.g. ``examples/Siemens-mMR/template_span11.hs``) only describe a geometry; their data file
is empty. STIR's ``forward_project`` and SIRF's ``AcquisitionData(template)`` use only the template's
``ProjDataInfo``. :func:`read_template_geometry` is the one reader of every argument that is only a geometry
template (``forward --template``, ``prepare --template``, the export commands' ``--template``): it reads the
header alone, with exactly the checks of :func:`sirf_ddip.io.interfile.read_projdata` (both call
:func:`sirf_ddip.io.interfile.projdata_layout`), and never opens the data file, so an empty, absent or
full-size data file gives the same geometry. Files whose data are read keep ``read_projdata``'s exact-size
check.
"""

from __future__ import annotations

import os

from ..errors import InputFileError
from ..geometry.sinogram import SinogramGeometry
from .header import InterfileHeader

__all__ = ["read_template_geometry", "TEMPLATE_HELP", "DATA_HELP"]

#: Words for the help text of an option whose file only gives a geometry (read with :func:`read_template_geometry`).
TEMPLATE_HELP = "geometry only; data file may be empty or absent"
#: Words for the help text of an option whose data are read (``read_projdata``: exact-size check).
DATA_HELP = "data read; must match header size"


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
    from .interfile import projdata_layout

    return projdata_layout(hdr).geometry
