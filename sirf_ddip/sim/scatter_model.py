"""Scatter of a simulated study from STIR's single scatter simulation (``scatter_model: sss``).

The shape is what STIR's scatter estimation would compute from the true activity: the single scatter simulation
(:mod:`sirf_ddip.physics.scatter_simulation`) of the activity in the μ-map on STIR's down-sampled scatter scanner of
the data's SSRB geometry, up-sampled to that SSRB geometry (STIR's interpolation,
:func:`~sirf_ddip.physics.scatter_fit.upsample_and_fit_scatter` with the scale fixed to 1), inverse-SSRB'd to every
sinogram of the data and multiplied by the detection efficiencies, as STIR's ``ScatterEstimation`` turns its 2D
estimate into the 3D one. Its scale is set by the caller (the study's scatter fraction).
"""

from __future__ import annotations

import numpy as np

from ..data import Image, ProjData
from ..errors import ConfigError

__all__ = ["sss_scatter_shape", "default_energy_window"]


def default_energy_window(scanner_name: str) -> tuple[float, float]:
    """The scanner preset's usual energy window (keV) (:data:`sirf_ddip.io.energy_window.SCANNER_ENERGY_WINDOWS_KEV`).

    Raises
    ------
    ConfigError
        A scanner without a known window.
    """
    from ..io.energy_window import SCANNER_ENERGY_WINDOWS_KEV

    if scanner_name not in SCANNER_ENERGY_WINDOWS_KEV:
        raise ConfigError(f"simulation: scatter_model 'sss' needs the energy window of scanner {scanner_name!r}, "
                          f"which is not known (known: {', '.join(SCANNER_ENERGY_WINDOWS_KEV)}); use "
                          "scatter_model 'smooth'")
    return SCANNER_ENERGY_WINDOWS_KEV[scanner_name]


def sss_scatter_shape(activity: Image, mu: Image, geometry, energy_window: tuple[float, float],
                      efficiencies: np.ndarray | None = None, device=None) -> tuple[np.ndarray, dict]:
    """The unscaled single-scatter sinogram of ``activity`` in ``mu`` (cm⁻¹) on ``geometry`` (non-TOF).

    Parameters
    ----------
    activity, mu : images (any grids the scanner encloses; μ in cm⁻¹).
    geometry : the data's :class:`~sirf_ddip.geometry.sinogram.SinogramGeometry`.
    energy_window : ``(lower, upper)`` keV.
    efficiencies : detection efficiencies on ``geometry`` (None: 1).
    device : torch device of the simulation.

    Returns
    -------
    (array, info) : float64 ``geometry.shape`` (STIR's normalised units times the efficiencies) and
        ``{"scatter_points", "unscaled_total", "template"}``.

    Raises
    ------
    ConfigError
        TOF data, or a scanner without energy resolution (naming the key ``scatter_model``).
    """
    from ..errors import GeometryError
    from ..physics.scatter_fit import upsample_and_fit_scatter
    from ..physics.scatter_simulation import downsample_scanner, simulate_scatter
    from ..physics.ssrb import inverse_ssrb, ssrb_geometry

    if geometry.is_tof:
        raise ConfigError("simulation: scatter_model 'sss' is for non-TOF data; use scatter_model 'smooth' for TOF")
    geo2 = ssrb_geometry(geometry)
    try:
        template = downsample_scanner(geo2)
        est = simulate_scatter(activity, mu, template, energy_window, device=device)
    except GeometryError as exc:
        raise ConfigError(f"simulation: scatter_model 'sss': {exc}") from None
    zeros = ProjData(np.zeros(geo2.shape, np.float32), geo2, {})
    up2 = upsample_and_fit_scatter(est, zeros, np.ones(geo2.shape, np.float32), None, 1.0, 1.0).scatter.array
    out = np.asarray(inverse_ssrb(up2, geo2, geometry), dtype=np.float64)
    if efficiencies is not None:
        out = out * np.asarray(efficiencies, dtype=np.float64)
    return out, {"scatter_points": int(est.meta["scatter_points"]), "unscaled_total": float(est.meta["total"]),
                 "template": template.describe()}
