"""Images from a STIR ``generate_image`` parameter file (ellipsoidal cylinders), as STIR's test pack makes its phantoms.

What STIR does (UCL/STIR ``src/Shape_buildblock/GenerateImage.cxx``, ``Shape3D.cxx`` ``construct_volume`` /
``get_voxel_weight``, ``EllipsoidalCylinder.cxx`` ``is_inside_shape``), reproduced from its rules, not its code:

- the image has STIR index ranges ``z = 0 .. nz - 1``, ``y = -(ny / 2) ..``, ``x = -(nx / 2) ..`` and origin 0, so a
  voxel centre is at ``index * voxel size`` (mm, ``{z, y, x}``), and the shapes' ``origin (in mm) := {z, y, x}`` is
  in that frame;
- a point is inside an ellipsoidal cylinder when ``|z - oz| < length / 2`` and
  ``((x - ox) / rx)^2 + ((y - oy) / ry)^2 <= 1``;
- each voxel is first 1/0 by its centre; voxels whose value differs from one of their 26 neighbours (outside the
  image counts as 0) are recomputed as the fraction of ``nz x ny x nx`` sub-samples inside (sub-sample offsets
  ``(i + 1/2) / n - 1/2`` voxels); the shape's mask times its ``value`` is added to the image.

Only the keys of STIR's ``recon_test_pack`` phantoms are read (sizes, voxel sizes, samples per voxel, ellipsoidal
cylinders with their value); any other shape type is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..data import Image
from ..errors import ConfigError, InputFileError
from ..geometry.image import ImageGrid

__all__ = ["read_generate_image_par", "generate_image", "ellipsoidal_cylinder"]


def _norm_key(k: str) -> str:
    return re.sub(r"\s+", " ", k.strip().lower().lstrip("!"))


def read_generate_image_par(path: str | os.PathLike) -> dict:
    """The keys of a ``generate_image`` parameter file: the image keys and a list of ``shapes``
    (``{"type", "params", "value"}``), keys lower-cased with single spaces.

    Raises
    ------
    InputFileError
        A line without ``:=`` inside a block, or a shape block that is not closed.
    """
    path = Path(path)
    top: dict = {"shapes": []}
    shape = None
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if ":=" not in line:
            raise InputFileError(path, f"line {n}: expected 'key := value', got {raw.strip()!r}")
        key, value = (s.strip() for s in line.split(":=", 1))
        key = _norm_key(key)
        if key in ("generate_image parameters", "end"):
            continue
        if key == "shape type":
            shape = {"type": value.strip().lower(), "params": {}, "value": None}
            top["shapes"].append(shape)
        elif shape is not None and key.endswith(" parameters") and not value:
            continue
        elif key == "value":
            if shape is None:
                raise InputFileError(path, f"line {n}: 'value' before any 'shape type'", key="value")
            shape["value"] = value
        elif shape is not None and key not in _IMAGE_KEYS:
            shape["params"][key] = value
        else:
            top[key] = value
    return top


_IMAGE_KEYS = {"output filename", "output file format", "image duration (sec)", "image relative start time (sec)",
               "x output image size (in pixels)", "y output image size (in pixels)", "z output image size (in pixels)",
               "x voxel size (in mm)", "y voxel size (in mm)", "z voxel size (in mm)",
               "z number of samples to take per voxel", "y number of samples to take per voxel",
               "x number of samples to take per voxel", "originating system", "patient orientation",
               "patient rotation"}


def _float(path, d: dict, key: str, default=None) -> float:
    if key not in d:
        if default is not None:
            return float(default)
        raise InputFileError(path, "missing key", key=key)
    try:
        return float(d[key])
    except ValueError:
        raise InputFileError(path, f"not a number: {d[key]!r}", key=key) from None


def _triple(path, d: dict, key: str) -> tuple[float, float, float]:
    """A STIR ``{z, y, x}`` coordinate."""
    v = d.get(key, "{0,0,0}")
    parts = [p for p in v.strip().strip("{}").split(",") if p.strip()]
    if len(parts) != 3:
        raise InputFileError(path, f"expected {{z, y, x}}, got {v!r}", key=key)
    return tuple(float(p) for p in parts)  # type: ignore[return-value]


def _centres(grid: ImageGrid) -> list[np.ndarray]:
    """STIR's voxel centres of a generate_image image: index * voxel size, z from 0, y and x from -(n / 2)."""
    nz, ny, nx = grid.shape
    vz, vy, vx = grid.voxel_size
    return [np.arange(nz) * vz, (np.arange(ny) - ny // 2) * vy, (np.arange(nx) - nx // 2) * vx]


def ellipsoidal_cylinder(grid: ImageGrid, radius_x: float, radius_y: float, length_z: float,
                         origin_zyx: tuple[float, float, float], num_samples=(1, 1, 1)) -> np.ndarray:
    """STIR's ``EllipsoidalCylinder::construct_volume`` on ``grid`` (STIR's generate_image frame, see the module
    docstring): float32 ``(z, y, x)`` weights in 0..1."""
    cz, cy, cx = _centres(grid)
    oz, oy, ox = origin_zyx

    def inside(z, y, x):
        return (np.abs(z - oz) < length_z / 2) & (((x - ox) / radius_x) ** 2 + ((y - oy) / radius_y) ** 2 <= 1)

    Z, Y, X = np.meshgrid(cz, cy, cx, indexing="ij")
    crude = inside(Z, Y, X).astype(np.float32)
    ns = tuple(int(n) for n in num_samples)
    if ns == (1, 1, 1):
        return crude
    from scipy.ndimage import maximum_filter, minimum_filter

    hi = maximum_filter(crude, size=3, mode="constant", cval=0.0)
    lo = minimum_filter(crude, size=3, mode="constant", cval=0.0)
    redo = np.argwhere((hi != crude) | (lo != crude))
    offs = [(np.arange(n) + 0.5) / n - 0.5 for n in ns]
    oz_, oy_, ox_ = np.meshgrid(*offs, indexing="ij")
    vz, vy, vx = grid.voxel_size
    out = crude.copy()
    for k, j, i in redo:
        out[k, j, i] = inside(cz[k] + oz_ * vz, cy[j] + oy_ * vy, cx[i] + ox_ * vx).mean()
    return out


def generate_image(par: str | os.PathLike | dict, path: str | os.PathLike = "<generate_image>") -> Image:
    """STIR's ``generate_image`` of a parameter file (path or :func:`read_generate_image_par`'s dict).

    Returns an :class:`~sirf_ddip.data.Image` on the grid STIR writes (``origin`` = STIR's first-pixel offsets:
    ``(0, -(ny / 2) vy, -(nx / 2) vx)``, images centred axially on the scanner as STIR's projectors place them).

    Raises
    ------
    InputFileError
        A missing or non-numeric key; ConfigError: a shape type other than ``ellipsoidal cylinder``.
    """
    if not isinstance(par, dict):
        path = par
        par = read_generate_image_par(par)
    n = [int(_float(path, par, f"{a} output image size (in pixels)")) for a in "zyx"]
    v = [_float(path, par, f"{a} voxel size (in mm)") for a in "zyx"]
    ns = [int(_float(path, par, f"{a} number of samples to take per voxel", 5)) for a in "zyx"]
    grid = ImageGrid(tuple(n), tuple(v))
    img = np.zeros(grid.shape, np.float32)
    if not par["shapes"]:
        raise InputFileError(path, "no shape", key="shape type")
    for s in par["shapes"]:
        if s["type"] != "ellipsoidal cylinder":
            raise ConfigError(f"{path}: shape type {s['type']!r} is not supported (only 'ellipsoidal cylinder')")
        p = s["params"]
        value = float(s["value"]) if s["value"] is not None else 1.0
        img += value * ellipsoidal_cylinder(grid, _float(path, p, "radius-x (in mm)"), _float(path, p, "radius-y (in mm)"),
                                            _float(path, p, "length-z (in mm)"), _triple(path, p, "origin (in mm)"), ns)
    return Image(img, grid)
