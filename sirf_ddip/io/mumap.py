"""μ-maps (linear attenuation coefficients at 511 keV): reading, units check, resampling onto a grid.

Formats
-------
- STIR Interfile ``.hv`` (:func:`sirf_ddip.io.interfile.read_image`);
- NIfTI ``.nii`` / ``.nii.gz`` (:func:`sirf_ddip.io.nifti.read_nifti`, STIR's gantry ⇄ RAS convention);
- the Siemens μ-map export ``.v.hdr`` (``%SMS-MI header name space := image subheader``): Interfile 3.3 keys
  ``matrix size [i]``, ``scale factor (mm/pixel) [i]``, ``%x-offset (mm)`` / ``%y-offset (mm)``,
  ``%image slope`` / ``%image intercept``, ``quantification units`` (``1/cm``), ``%patient orientation`` and
  ``%image orientation`` (as Siemens e7 tools and the scanner write them; ``%image zoom`` is already in the voxel
  size). Siemens reconstructs images centred on the scanner axis, moved transaxially by
  the x/y offsets, axially centred on the scanner (as STIR's default placement): voxel ``[k, j, i]`` is at
  ``x = (i - (nx - 1) / 2) vx + x_offset``, ``y = (j - (ny - 1) / 2) vy + y_offset``. Only head-first supine
  (``HFS``), axis-aligned images are accepted. No real ``.v.hdr`` export was available to validate the
  transaxial placement and axis directions: they are assumed to be those of STIR's Interfile images (the shared
  ``mu_map.hv``, converted from such an export, has no offsets).

Units
-----
STIR expects cm⁻¹ (``BinNormalisationFromAttenuationImage.cxx`` warns when the maximum is outside
``[0.08, 0.2]``; water is 0.096 cm⁻¹). :func:`check_mu_units` goes further and refuses values that cannot be
cm⁻¹, naming the units they look like: mm⁻¹ (maximum ~0.01), Siemens' integer 10⁻⁴ cm⁻¹ (maximum ~1000-2000),
Hounsfield units (negative values down to -1000). Other declared units are converted to cm⁻¹.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..data import Image
from ..errors import DataValueError, GeometryMismatchError, InputFileError, UnsupportedDataError
from ..geometry.image import ImageGrid
from .header import InterfileHeader

__all__ = ["read_mu_map", "read_siemens_mu_map", "check_mu_units", "check_mu_in_fov", "mu_fraction_in_fov",
           "resample_to_grid", "MU_UNITS", "MU_MAX_RANGE_CM", "MU_FOV_REFUSE", "MU_FOV_WARN"]

#: Declared units -> factor to cm⁻¹.
MU_UNITS = {"cm-1": 1.0, "mm-1": 10.0, "1e-4cm-1": 1e-4}

#: Plausible maximum of a 511 keV μ-map in cm⁻¹ (lung/soft tissue ~0.03-0.1, cortical bone ~0.17, metal higher).
MU_MAX_RANGE_CM = (0.02, 0.6)


#: Fractions of a μ-map's attenuation (sum of μ) inside the scanner's field of view below which it is refused
#: (the attenuation factors would be ~1: a μ-map placed outside the scanner, e.g. a wrong offset or a NIfTI origin
#: at a corner) or warned about (a part of the body outside the scanner: legitimate for a long CT, else misplaced).
MU_FOV_REFUSE = 0.05
MU_FOV_WARN = 0.5


#: Siemens ``quantification units`` -> our unit names
_SIEMENS_UNITS = {"1/cm": "cm-1", "1/mm": "mm-1", "cm-1": "cm-1", "mm-1": "mm-1"}


def _siemens_orientation(hdr: InterfileHeader) -> None:
    ori = (hdr.get("%patient orientation") or "HFS").strip().upper()
    if ori != "HFS":
        raise UnsupportedDataError(hdr.path, f"patient orientation {ori!r}: only HFS μ-maps are supported "
                                   "(reorient the image to HFS first)", key="%patient orientation")
    io = hdr.get_list("%image orientation")
    if io is not None and [round(v, 6) for v in io] != [1, 0, 0, 0, 1, 0]:
        raise UnsupportedDataError(hdr.path, f"image orientation {hdr.get('%image orientation')}: only axis-aligned "
                                   "images ({1,0,0,0,1,0}) are supported", key="%image orientation")


def _finite(hdr: InterfileHeader, key: str, default: float) -> float:
    v = hdr.get_float(key, default)
    if not math.isfinite(v):
        raise InputFileError(hdr.path, f"expected a finite number, got {hdr.get(key)!r}", key=key)
    return v


def read_siemens_mu_map(path: str | os.PathLike) -> Image:
    """Read a Siemens ``.v.hdr`` μ-map export into an :class:`Image` on STIR's gantry grid.

    Raises
    ------
    InputFileError
        Missing keys, a missing or short data file, an unknown number format.
    UnsupportedDataError
        Not HFS, more than 3 dimensions.
    """
    from .interfile import _read_raw

    hdr = InterfileHeader.read(path)
    _siemens_orientation(hdr)
    ndim = hdr.get_int("number of dimensions", 3)
    if ndim != 3:
        raise UnsupportedDataError(hdr.path, f"{ndim} dimensions; a μ-map has 3", key="number of dimensions")
    sizes, vox = [], []
    for i in (1, 2, 3):
        n = hdr.get_int(f"matrix size [{i}]", required=True)
        if n < 1:
            raise InputFileError(hdr.path, f"matrix size must be >= 1, got {n}", key=f"matrix size [{i}]")
        sizes.append(n)
        v = hdr.get_float(f"scale factor (mm/pixel) [{i}]")
        if v is None:
            v = hdr.get_float(f"scaling factor (mm/pixel) [{i}]", required=True)
        if not (math.isfinite(v) and v > 0):
            raise InputFileError(hdr.path, f"voxel size must be a finite positive number of mm, got {v}",
                                 key=f"scale factor (mm/pixel) [{i}]")
        vox.append(v)
    nx, ny, nz = sizes
    vx, vy, vz = vox
    xo, yo, slope, intercept = (_finite(hdr, k, d) for k, d in (("%x-offset (mm)", 0.0), ("%y-offset (mm)", 0.0),
                                                                 ("%image slope", 1.0), ("%image intercept", 0.0)))
    origin = (0.0, -(ny - 1) / 2.0 * vy + yo, -(nx - 1) / 2.0 * vx + xo)
    grid = ImageGrid((nz, ny, nx), (vz, vy, vx), origin)
    order = hdr.get("image data byte order")  # Siemens spelling of STIR's "imagedata byte order"
    raw_hdr = hdr
    if order is not None and hdr.get("imagedata byte order") is None:
        raw_hdr = InterfileHeader(hdr.path, list(hdr.entries) + [("imagedata byte order", order)])
    arr = _read_raw(raw_hdr, nx * ny * nz).reshape(nz, ny, nx)
    if slope != 1.0 or intercept != 0.0:
        arr = (arr.astype(np.float64) * slope + intercept).astype(np.float32)
    meta = {"source": str(hdr.path)}
    declared = " ".join((hdr.get("quantification units") or "").lower().split())
    if declared:
        meta["declared_units"] = _SIEMENS_UNITS.get(declared, declared)
    return Image(arr, grid, meta)


def read_mu_map(path: str | os.PathLike, units: str = "cm-1") -> Image:
    """Read a μ-map (``.hv``, ``.nii``, ``.nii.gz`` or Siemens ``.v.hdr``), check its units, return it in cm⁻¹.

    Parameters
    ----------
    path : path
    units : {"cm-1", "mm-1", "1e-4cm-1"}
        The units the file is in (STIR's convention, and the default, is cm⁻¹).

    Raises
    ------
    InputFileError
        Unknown format or unreadable file.
    DataValueError
        Values that are not a μ-map in ``units`` (see :func:`check_mu_units`).
    """
    name = Path(path).name.lower()
    if name.endswith(".v.hdr") or name.endswith(".h33"):
        img = read_siemens_mu_map(path)
    elif name.endswith(".hv"):
        from .interfile import read_image

        img = read_image(path)
    elif name.endswith(".nii") or name.endswith(".nii.gz"):
        from .nifti import read_nifti

        img = read_nifti(path)
    else:
        raise InputFileError(path, "unknown μ-map format: expected .hv (STIR Interfile), .nii/.nii.gz or a Siemens "
                             ".v.hdr")
    declared = img.meta.get("declared_units")
    if declared is not None and declared != units:
        raise DataValueError(f"{path}: the header says the μ-map is in {declared!r} ('quantification units'), but "
                             f"{units!r} was asked for; pass the units the values are in (--mu-units)")
    arr = check_mu_units(img.array, units, path)
    out = img.with_array(arr)
    out.meta["units"] = "cm-1"
    return out


def check_mu_units(values: np.ndarray, units: str = "cm-1", path: str | os.PathLike = "<array>") -> np.ndarray:
    """Values in cm⁻¹ (float32) after checking that ``values`` are a 511 keV μ-map in ``units``.

    Raises
    ------
    DataValueError
        NaN/Inf; negative values (HU?); a maximum outside :data:`MU_MAX_RANGE_CM` once converted, with the units
        the values look like instead.
    ValueError
        Unknown ``units``.
    """
    if units not in MU_UNITS:
        raise ValueError(f"unknown μ-map units {units!r}; known: {', '.join(MU_UNITS)}")
    a = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise DataValueError(f"{path}: μ-map has NaN or Inf values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -100:
        raise DataValueError(f"{path}: μ-map minimum is {lo:.4g}: this looks like a CT in Hounsfield units "
                             "(air = -1000), not μ at 511 keV; convert it to cm⁻¹ first (e.g. STIR's ctac_to_mu_values)")
    if lo < -1e-3 * max(hi, 1e-12):
        raise DataValueError(f"{path}: μ-map has negative values (minimum {lo:.4g}); μ must be >= 0")
    cm = hi * MU_UNITS[units]
    lo_ok, hi_ok = MU_MAX_RANGE_CM
    if not lo_ok <= cm <= hi_ok:
        guess = ""
        for u, f in MU_UNITS.items():
            if u != units and lo_ok <= hi * f <= hi_ok:
                guess = f"; the values look like {u} (use units={u!r} / --mu-units {u})"
        if hi > 500 and not guess:
            guess = "; this looks like Hounsfield units or a scaled integer map"
        raise DataValueError(f"{path}: μ-map maximum is {hi:.4g} {units} = {cm:.4g} cm⁻¹, outside the plausible range "
                             f"{lo_ok}-{hi_ok} cm⁻¹ of a 511 keV μ-map (water: 0.096 cm⁻¹){guess}")
    return (a * np.float32(MU_UNITS[units])).astype(np.float32)


def mu_fraction_in_fov(mu: Image, scanner) -> float:
    """Fraction of the μ-map's total μ in voxels whose centres lie in ``scanner``'s field of view.

    The field of view: the cylinder of the scanner's axial length (``num_rings x ring_spacing``, centred as the
    projector centres images) and of the radius its non-arc-corrected bins reach,
    ``R sin(pi (bins / 2) / detectors per ring)`` (the effective radius ``R`` if the bins are not given).
    """
    g = mu.grid
    z = _scanner_coords(g, 0)
    y = _scanner_coords(g, 1)
    x = _scanner_coords(g, 2)
    R = float(scanner.effective_radius_mm)
    nb = int(scanner.max_num_non_arc_corrected_bins or 0)
    radius = R * math.sin(min(math.pi / 2, math.pi * (nb / 2) / scanner.detectors_per_ring)) if nb else R
    half = scanner.num_rings * scanner.ring_spacing_mm / 2.0
    a = np.asarray(mu.array, dtype=np.float64)
    total = float(a.sum())
    if not total > 0:
        return 0.0
    inside_xy = (y[:, None] ** 2 + x[None, :] ** 2) <= radius ** 2
    inside_z = np.abs(z) <= half
    return float(a[inside_z][:, inside_xy].sum()) / total


def check_mu_in_fov(mu: Image, scanner, path: str | os.PathLike = "<μ-map>") -> float:
    """:func:`mu_fraction_in_fov`, refused below :data:`MU_FOV_REFUSE` and warned about below :data:`MU_FOV_WARN`
    (an :class:`~sirf_ddip.errors.InputFileWarning`; ``--strict`` refuses it); returns the fraction.

    Raises
    ------
    DataValueError
        Almost none of the μ-map lies in the field of view: the attenuation factors would be ~1 everywhere.
    """
    from ..utils.leniency import lenient

    f = mu_fraction_in_fov(mu, scanner)
    where = f"its grid {mu.grid.describe()}"
    if f < MU_FOV_REFUSE:
        raise DataValueError(f"{path}: only {100 * f:.3g} % of the μ-map's attenuation lies in the field of view of "
                             f"the {scanner.name} ({where}): the attenuation factors would be ~1; check the image "
                             "position (offsets / origin / affine)")
    if f < MU_FOV_WARN:
        lenient(path, f"only {100 * f:.3g} % of the μ-map's attenuation lies in the field of view of the "
                f"{scanner.name} ({where}); the rest does not attenuate any line of response: check the image "
                "position (offsets / origin / affine) if the body should be in the scanner")
    return f


def _scanner_coords(grid: ImageGrid, axis: int) -> np.ndarray:
    """Voxel-centre coordinates (mm) along ``axis`` in the frame the projector uses: transaxially the grid
    coordinates, axially the index centre at the scanner centre shifted by ``origin z``."""
    if axis == 0:
        return (np.arange(grid.shape[0]) - (grid.shape[0] - 1) / 2.0) * grid.voxel_size[0] + grid.origin[0]
    return grid.coords(axis)


def resample_to_grid(image: Image, grid: ImageGrid, what: str = "μ-map") -> Image:
    """Trilinear resampling of ``image`` onto ``grid`` (values, not integrals, are kept; 0 outside).

    Positions are compared in the projector's frame (:mod:`sirf_ddip.geometry.image`): transaxially the
    first-pixel offsets, axially the image index centre at the scanner centre plus ``origin z``. Used for
    μ-maps and for the MR (:func:`sirf_ddip.prior.grid.mr_on_pet_grid`); ``what`` names the image in errors.

    Raises
    ------
    GeometryMismatchError
        The two grids do not overlap.
    """
    from scipy.ndimage import map_coordinates

    if image.grid.matches(grid):
        return Image(np.asarray(image.array, dtype=np.float32), grid, dict(image.meta))
    src = image.grid
    idx = []
    for ax in range(3):
        c = _scanner_coords(grid, ax)
        c0 = _scanner_coords(src, ax)[0]
        idx.append((c - c0) / src.voxel_size[ax])
    overlap = [np.any((i >= -0.5) & (i <= n - 0.5)) for i, n in zip(idx, src.shape)]
    if not all(overlap):
        raise GeometryMismatchError(f"{what} grid {src.describe()} does not overlap the image grid {grid.describe()}")
    zz, yy, xx = np.meshgrid(*idx, indexing="ij")
    out = map_coordinates(np.asarray(image.array, dtype=np.float64), [zz, yy, xx], order=1, mode="constant",
                          cval=0.0)
    meta = dict(image.meta)
    meta["resampled_from"] = src.describe()
    return Image(out.astype(np.float32), grid, meta)
