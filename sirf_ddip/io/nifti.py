"""NIfTI images through nibabel, with the STIR gantry ⇄ patient (RAS) convention of STIR's ITK I/O.

Convention (STIR ``ITKImageInputFileFormat`` / ``ITKOutputFileFormat``, valid for a head-first-supine
patient, STIR's and SIRF's default)
-------------------------------------------------------------------------------------------------------
STIR gantry coordinates ``(x, y, z)`` map to DICOM/ITK LPS as ``L = x, P = y, S = -z``: x points to the
patient's left, y to posterior (down, for a supine patient), z towards the patient's feet (STIR's z runs
from the gantry front into the scanner, and a head-first patient's head enters first). ITK's conversion
``ITK_coordinates_to_STIR`` is ``(z, y, x)_STIR = (-S_LPS, P_LPS, L_LPS)``. In NIfTI's RAS world frame::

    (R, A, S) = (-x, -y, -z)

STIR's position of voxel ``[k, j, i]`` (array ``[z, y, x]``) is ``origin + (k, j, i) * voxel_size`` (the
Interfile *first pixel offsets*). The NIfTI file stores the array as ``data[i, j, k]`` with affine
``diag(-vx, -vy, -vz)`` and translation ``(-ox, -oy, -oz)`` (axis codes L, P, I), sform and qform code 1
(scanner-based). NIfTI stores the affine in float32; the exact float64 grid is kept in a small JSON header
extension (``sirf_ddip_grid``) and used on reading when it agrees with the affine, so a round trip is exact.
Reading accepts any axis permutation/flip (undone exactly); oblique affines are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..data import Image
from ..errors import GeometryError, InputFileError, UnsupportedDataError
from ..geometry.image import ImageGrid
from ..utils.atomic import atomic_path
from ..utils.provenance import check_output

__all__ = ["read_nifti", "write_nifti", "stir_affine", "NIFTI_AXCODES"]

#: axis codes of the written array axes (i -> x, j -> y, k -> z in STIR)
NIFTI_AXCODES = ("L", "P", "I")
_EXT_KEY = "sirf_ddip_grid"


def _exact_grid(img, approx: ImageGrid) -> ImageGrid:
    """The float64 grid from our header extension if present and consistent with ``approx``."""
    for ext in getattr(img.header, "extensions", []):
        try:
            d = json.loads(ext.get_content().decode())[_EXT_KEY]
            g = ImageGrid(tuple(d["shape"]), tuple(d["voxel_size"]), tuple(d["origin"]))
        except Exception:
            continue
        if g.shape == approx.shape and np.allclose(g.voxel_size, approx.voxel_size, rtol=1e-5, atol=1e-5) \
                and np.allclose(g.origin, approx.origin, rtol=1e-5, atol=1e-3):
            return g
    return approx


def stir_affine(grid: ImageGrid) -> np.ndarray:
    """4×4 NIfTI (RAS) affine of a STIR grid, for an array stored ``[x, y, z]``."""
    vz, vy, vx = grid.voxel_size
    oz, oy, ox = grid.origin
    aff = np.diag([-vx, -vy, -vz, 1.0])
    aff[:3, 3] = [-ox, -oy, -oz]
    return aff


def write_nifti(path: str | os.PathLike, image: Image, overwrite: bool = False) -> Path:
    """Write ``image`` (float32) to ``path`` (``.nii`` or ``.nii.gz``) with the STIR→RAS affine, atomically."""
    import nibabel as nib

    path = Path(path)
    check_output(path, overwrite)
    data = np.asarray(image.array, dtype=np.float32).transpose(2, 1, 0)  # [z,y,x] -> [x,y,z]
    aff = stir_affine(image.grid)
    img = nib.Nifti1Image(np.ascontiguousarray(data), aff)
    img.header.set_xyzt_units("mm")
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_data_dtype(np.float32)
    g = image.grid
    ext = json.dumps({_EXT_KEY: {"shape": list(g.shape), "voxel_size": list(g.voxel_size), "origin": list(g.origin)}})
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, ext.encode()))  # 6 = comment
    with atomic_path(path) as tmp:  # same suffix, so nibabel compresses .nii.gz; renamed when complete
        nib.save(img, str(tmp))
    return path


def read_nifti(path: str | os.PathLike) -> Image:
    """Read a NIfTI image into an :class:`Image` on the STIR grid implied by its affine.

    Raises
    ------
    InputFileError
        Missing/unreadable file, not 3-D (a 4-D file with one volume is accepted).
    UnsupportedDataError
        Oblique (non axis-aligned) affine.
    """
    import nibabel as nib
    from nibabel import orientations as ori

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "NIfTI file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types
        raise InputFileError(path, f"cannot read NIfTI: {exc}") from None
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt data block (EOFError, ValueError, OSError...)
        raise InputFileError(path, f"cannot read the image data (truncated or corrupt file?): {exc}", key="dim") \
            from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputFileError(path, f"expected a 3-D image, got shape {data.shape}", key="dim")
    aff = np.asarray(img.affine, dtype=np.float64)
    ornt = ori.io_orientation(aff)
    target = ori.axcodes2ornt(NIFTI_AXCODES)
    xform = ori.ornt_transform(ornt, target)
    data = ori.apply_orientation(data, xform)
    aff = aff @ ori.inv_ornt_aff(xform, img.shape[:3])
    lin = aff[:3, :3]
    off_diag = lin - np.diag(np.diag(lin))
    if np.max(np.abs(off_diag)) > 1e-4 * np.max(np.abs(lin)):
        raise UnsupportedDataError(path, "oblique affine (rotated voxel axes) is not supported; resample to an "
                                   "axis-aligned grid first", key="sform/qform")
    vx, vy, vz = -np.diag(lin)
    ox, oy, oz = -aff[:3, 3]
    try:
        grid = ImageGrid((data.shape[2], data.shape[1], data.shape[0]), (vz, vy, vx), (oz + 0.0, oy + 0.0, ox + 0.0))
    except GeometryError as exc:
        raise InputFileError(path, f"the affine does not give a usable voxel grid: {exc}", key="sform/qform") from None
    grid = _exact_grid(img, grid)
    arr = np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0))
    return Image(arr, grid, {"source": str(path)})
