"""The energy window of PET data from its Interfile header, and the scanners' usual windows.

STIR keeps the window in the data's ``ExamInfo`` (``energy window lower level[1]`` /
``energy window upper level[1]`` in keV, STIR 6 key names; Siemens exports spell them
``%energy window lower level (keV) [1]``). Its scatter simulation needs it (the detection efficiency of a
scattered photon of energy E′ is the Gaussian mass inside the window), so a sinogram without it cannot be
scatter-corrected unless the user says which window to use. :data:`SCANNER_ENERGY_WINDOWS_KEV` holds the
manufacturers' default windows, used only when asked for (``--energy-window-from-scanner``).
"""

from __future__ import annotations

import os

from ..errors import InputFileError
from .header import InterfileHeader

__all__ = ["energy_window_from_header", "scanner_energy_window", "energy_window_lines",
           "SCANNER_ENERGY_WINDOWS_KEV", "LOWER_KEY", "UPPER_KEY"]

#: STIR 6's key names (as STIR writes them)
LOWER_KEY = "energy window lower level[1]"
UPPER_KEY = "energy window upper level[1]"

#: the key spellings read, in order of preference: STIR 6, STIR < 6 (no index), Siemens exports
_SPELLINGS = {
    "lower": ("energy window lower level [1]", "energy window lower level",
              "%energy window lower level (kev) [1]"),
    "upper": ("energy window upper level [1]", "energy window upper level",
              "%energy window upper level (kev) [1]"),
}

#: Default energy windows (keV) of the scanner presets (STIR's ``examples/Siemens-mMR`` for the mMR; the
#: manufacturers' clinical defaults for the others).
SCANNER_ENERGY_WINDOWS_KEV = {
    "Siemens mMR": (430.0, 610.0),
    "Siemens mCT": (435.0, 650.0),
    "Siemens Vision 600": (435.0, 585.0),
    "GE Discovery 690": (425.0, 650.0),
    "GE Discovery MI 4 rings": (425.0, 650.0),
    "GE Discovery MI 3 rings": (425.0, 650.0),
}


def _value(hdr: InterfileHeader, which: str) -> tuple[float | None, str]:
    for key in _SPELLINGS[which]:
        if hdr.get(key) is not None:
            return hdr.get_float(key), key
    return None, _SPELLINGS[which][0]


def energy_window_from_header(header: InterfileHeader | str | os.PathLike,
                              required: bool = True) -> tuple[float, float] | None:
    """``(lower, upper)`` keV of the data's (first) energy window.

    Parameters
    ----------
    header : a parsed header or the path of one (``.hs``, ``.l.hdr``, ``.n.hdr``).
    required : raise when the keys are absent (else return None).

    Raises
    ------
    InputFileError
        A key absent (``required``), a value that is not a number, ``lower <= 0`` or ``upper <= lower``
        (STIR's values of an unset window are -1), naming the file and the key.
    """
    hdr = header if isinstance(header, InterfileHeader) else InterfileHeader.read(header)
    lo, lo_key = _value(hdr, "lower")
    hi, hi_key = _value(hdr, "upper")
    if lo is None or hi is None:
        if not required:
            return None
        key = LOWER_KEY if lo is None else UPPER_KEY
        raise InputFileError(hdr.path, "no energy window in the header (the scatter simulation needs it, as STIR's); "
                             "add the keys 'energy window lower level[1]' and 'energy window upper level[1]' (keV), "
                             "or pass --energy-window-from-scanner to use the scanner's default window", key=key)
    if not lo > 0:
        raise InputFileError(hdr.path, f"energy window lower level must be > 0 keV, got {lo:g} (not set?)", key=lo_key)
    if not hi > lo:
        raise InputFileError(hdr.path, f"energy window upper level ({hi:g} keV) must exceed the lower level "
                             f"({lo:g} keV)", key=hi_key)
    return float(lo), float(hi)


def scanner_energy_window(scanner_name: str, path: str | os.PathLike = "<data>") -> tuple[float, float]:
    """The default window of a scanner preset (:data:`SCANNER_ENERGY_WINDOWS_KEV`).

    Raises
    ------
    InputFileError
        The scanner has no known default window (naming ``path`` and the header key it would come from).
    """
    from ..geometry.scanner import get_scanner

    try:
        name = get_scanner(scanner_name).name
    except KeyError:
        name = scanner_name
    if name not in SCANNER_ENERGY_WINDOWS_KEV:
        raise InputFileError(path, f"scanner {scanner_name!r} has no known default energy window (known: "
                             f"{', '.join(SCANNER_ENERGY_WINDOWS_KEV)}); add the energy window keys to the header",
                             key=LOWER_KEY)
    return SCANNER_ENERGY_WINDOWS_KEV[name]


def energy_window_lines(window: tuple[float, float]) -> dict[str, str]:
    """The header keys STIR 6 writes for one energy window (for ``header_lines(extra=...)``)."""
    lo, hi = window
    return {"number of energy windows": "1", LOWER_KEY: f"{float(lo):g}", UPPER_KEY: f"{float(hi):g}"}
