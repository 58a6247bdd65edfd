"""STIR's scatter estimation loop (``ScatterEstimation``) and a SIRF-style ``ScatterEstimator`` on top of it.

What STIR does (UCL/STIR ``src/scatter_buildblock/ScatterEstimation.cxx``: ``set_up``, ``set_up_iterative``,
``process_data``, ``project_mask_image``; the mMR settings of ``examples/Siemens-mMR/scatter_estimation_par_files``;
SIRF's ``PETScatterEstimator`` in ``src/xSTIR/cSTIR/include/sirf/STIR/stir_x.h``), reproduced from its rules:

Set-up, all in 2D (STIR's ``run in 2d projdata := 1``):

- prompts, randoms: SSRB sums (:func:`~sirf_ddip.physics.ssrb.ssrb`); 2D efficiencies ``S = SSRB(eff)`` (the sum,
  at least 1e-20); 2D ACFs: the SSRB *mean* of the ACFs ``1 / att``; so the 2D model is
  ``y2 ~ (S / acf2) (A x + a2)`` with ``a2 = randoms2 acf2 / S`` and the data to fit ``y2 - randoms2``;
- tail mask: the μ-map smoothed (Gaussian FWHM 15 mm axially, 20 mm transaxially), thresholded at 0.003 cm⁻¹,
  forward projected (ray tracing, 1 ray, lengths in x voxels), plus 1, then
  :func:`~sirf_ddip.physics.scatter_fit.tail_mask_from_acfs` (threshold 1.1, safety margin 4);
- the activity image: STIR's ``VoxelsOnCartesianGrid(prompts, zoom 0.2)`` (ring spacing / 2 planes, xy voxel the
  default bin size / 0.2, ``2 ceil(FOV radius / voxel) + 1`` voxels), all ones, so that STIR first reconstructs it;
- the scatter template: :func:`~sirf_ddip.physics.scatter_simulation.downsample_scanner` of the 2D geometry.

Loop (``process_data``): reconstruct the initial image (OSEM, 5 tangential rays, Gaussian post-filter 15 mm);
keep a copy; for ``i = 1 .. N``: at ``i = 2`` the image becomes the mean of the current and the initial one
(``do average at 2``); simulate; up-sample and fit to the 2D data with the 2D efficiencies
(:func:`~sirf_ddip.physics.scatter_fit.upsample_and_fit_scatter`); when exported or at the last iteration, the 3D
estimate is ``eff * inverse_SSRB(max(s2 - 1e-9, 0) / S)`` (in prompt counts, on the prompts' geometry); the
additive term becomes ``(s2 + randoms2) acf2 / S`` and the image is reconstructed again, warm-started from the
current (post-filtered) one. STIR also reconstructs after the last simulation; that image is never used, so it
is skipped here.

Departures (documented): scatter points at voxel centres (STIR's default jitters them with ``srand(time)``, which no
one can reproduce); the reconstruction uses this package's STIR-faithful OSEM and projector.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..data import Image, ProjData
from ..errors import ConfigError, DataValueError, GeometryMismatchError
from ..geometry.image import ImageGrid
from ..geometry.sinogram import SinogramGeometry
from ..physics.attenuation import attenuation_factors, projector_grid_for
from ..physics.model import EngineLogLikelihood
from ..physics.projector import Projector
from ..physics.scatter_fit import ScatterFit, tail_mask_from_acfs, upsample_and_fit_scatter
from ..physics.scatter_simulation import ScatterSimulator, downsample_scanner
from ..physics.ssrb import inverse_ssrb, ssrb, ssrb_geometry
from ..utils.device import resolve_device
from .osem import OSEMReconstructor, gaussian_filter_mm

__all__ = ["ScatterEstimationSettings", "ScatterEstimate", "stir_zoomed_image_grid", "tail_mask_from_mu",
           "mu_covering_reconstruction", "check_osem_subsets", "estimate_scatter", "ScatterEstimator"]


@dataclass
class ScatterEstimationSettings:
    """Settings of the estimation loop; the defaults are STIR's mMR parameter files
    (``examples/Siemens-mMR/scatter_estimation_par_files`` with ``scatter_and_recon.sh``), except the number of
    scatter iterations, STIR's class default 5.

    Attributes
    ----------
    num_iterations : scatter iterations (STIR's ``number of scatter iterations``).
    do_average_at_2 : average the initial and the first image at iteration 2.
    min_scale_factor, max_scale_factor : clip of the tail-fit factors (mMR files: 0.1 and 0.4; STIR's class, and so
        SIRF's ScatterEstimator without a parameter file: 0.05 and 100).
    half_filter_width : axial running mean of the factors over ``2 h + 1`` sinograms.
    remove_interleaving : de-interleave before up-sampling.
    osem_num_subsets, osem_num_subiterations : the 2D OSEM (mMR script: 21 and 21; SIRF: 7 and 8).
    osem_num_tangential_lors : rays per bin of the OSEM projector (mMR files: 5).
    osem_postfilter_fwhm_mm : Gaussian post-filter (z, y, x) of each reconstruction (15 mm).
    zoom : xy zoom of the activity image (0.2).
    mask_filter_fwhm_mm : Gaussian (z, y, x) applied to the μ-map for the tail mask (15, 20, 20).
    mask_min_threshold : μ (cm⁻¹) above which the smoothed μ-map is object (0.003).
    acf_threshold, safety_margin : :func:`~sirf_ddip.physics.scatter_fit.tail_mask_from_acfs` (1.1, 4).
    attenuation_threshold : μ (cm⁻¹) of a scatter point (0.01).
    downsampled_rings, downsampled_detectors : STIR's overrides (None: STIR's defaults).
    restart_reconstruction_every_iteration : restart OSEM from ones at every iteration (STIR's default 0).
    """

    num_iterations: int = 5
    do_average_at_2: bool = True
    min_scale_factor: float = 0.1
    max_scale_factor: float = 0.4
    half_filter_width: int = 3
    remove_interleaving: bool = True
    osem_num_subsets: int = 21
    osem_num_subiterations: int = 21
    osem_num_tangential_lors: int = 5
    osem_postfilter_fwhm_mm: tuple[float, float, float] = (15.0, 15.0, 15.0)
    zoom: float = 0.2
    mask_filter_fwhm_mm: tuple[float, float, float] = (15.0, 20.0, 20.0)
    mask_min_threshold: float = 0.003
    acf_threshold: float = 1.1
    safety_margin: int = 4
    attenuation_threshold: float = 0.01
    downsampled_rings: int | None = None
    downsampled_detectors: int | None = None
    restart_reconstruction_every_iteration: bool = False

    @classmethod
    def sirf_defaults(cls) -> "ScatterEstimationSettings":
        """SIRF's ``ScatterEstimator()`` without a parameter file: STIR's class defaults (scale factors 0.05..100)
        and SIRF's OSEM (7 subsets, 8 sub-iterations)."""
        return cls(min_scale_factor=0.05, max_scale_factor=100.0, osem_num_subsets=7, osem_num_subiterations=8)

    def check(self) -> None:
        """Raises :class:`ConfigError` for settings STIR would refuse or that cannot work."""
        if int(self.num_iterations) < 1:
            raise ConfigError(f"scatter estimation: number of scatter iterations must be >= 1, got {self.num_iterations}")
        if not (0 <= self.min_scale_factor <= self.max_scale_factor):
            raise ConfigError(f"scatter estimation: need 0 <= minimum <= maximum scatter scaling factor, got "
                              f"{self.min_scale_factor}, {self.max_scale_factor}")
        if self.half_filter_width < 0:
            raise ConfigError(f"scatter estimation: upsampling half filter width must be >= 0, got "
                              f"{self.half_filter_width}")
        if self.osem_num_subsets < 1 or self.osem_num_subiterations < 1:
            raise ConfigError("scatter estimation: OSEM subsets and sub-iterations must be >= 1")
        if not self.zoom > 0:
            raise ConfigError(f"scatter estimation: zoom must be > 0, got {self.zoom}")
        if not self.acf_threshold > 1:
            raise ConfigError(f"scatter estimation: ACF-threshold must be larger than 1, got {self.acf_threshold}")


@dataclass
class ScatterEstimate:
    """Result of :func:`estimate_scatter`.

    Attributes
    ----------
    scatter : the last iteration's scatter on the prompts' geometry, in prompt counts (the additive term is
        ``(randoms + scatter) / mult``).
    iterations : every iteration's 3D estimate (only with ``return_iterations``; the last one is ``scatter``).
    scatter_2d : the last scaled 2D (SSRB) estimate; ``unscaled`` the last down-sampled simulation.
    scale_factors : per iteration, the factor of each 2D sinogram; ``raw_scale_factors`` before clip and smoothing.
    mask : the 2D tail mask (a ProjData on the SSRB geometry).
    activity : the activity image of the last simulation.
    """

    scatter: ProjData
    iterations: list[ProjData] = field(default_factory=list)
    scatter_2d: ProjData | None = None
    unscaled: ProjData | None = None
    scale_factors: list[np.ndarray] = field(default_factory=list)
    raw_scale_factors: list[np.ndarray | None] = field(default_factory=list)
    mask: ProjData | None = None
    activity: Image | None = None


def stir_zoomed_image_grid(geometry: SinogramGeometry, zoom: float = 0.2) -> ImageGrid:
    """STIR's ``VoxelsOnCartesianGrid(proj_data_info, zoom)`` with default sizes (what SIRF's ScatterEstimator
    reconstructs on): planes ``ring spacing / 2`` (segment 0's count for span > 1, else ``2 n - 1``), xy voxel
    ``default bin size / zoom``, ``2 ceil(R_FOV / voxel) + 1`` voxels with ``R_FOV = max(s_max, -s_min)``."""
    sc = geometry.scanner
    seg0 = geometry.segment(0)
    nz = seg0.num_axial if seg0.max_ring_diff > seg0.min_ring_diff else 2 * seg0.num_axial - 1
    vxy = sc.default_bin_size_mm / zoom
    s = geometry.s()
    r = max(float(s[-1]), float(-s[0]))
    nxy = 2 * int(math.ceil(np.float32(r) / np.float32(vxy))) + 1
    return ImageGrid((nz, nxy, nxy), (sc.ring_spacing_mm / 2.0, vxy, vxy))


def _axial_extent(grid: ImageGrid) -> tuple[float, float]:
    """(first, last) axial edge (mm) of ``grid`` in the scanner frame (index centre on the scanner centre + origin)."""
    nz, vz = grid.shape[0], grid.voxel_size[0]
    half = nz * vz / 2.0
    return grid.origin[0] - half, grid.origin[0] + half


def mu_covering_reconstruction(mu: Image, geometry: SinogramGeometry, zoom: float = 0.2) -> Image:
    """The μ-map zero-padded transaxially to cover the loop's activity image (:func:`stir_zoomed_image_grid`,
    the whole transaxial field of view); refused when it does not cover that image axially.

    STIR treats μ outside the μ-map's grid as 0 (vacuum): the loop reconstructs the whole field of view, so a
    μ-map cut close to the head transaxially (a simulated study's) is padded with that 0. Axially the prompts
    hold activity over the whole axial field of view; a μ-map shorter than it leaves that activity without
    attenuation or scatter points, which STIR would not notice, so it is refused. Returns ``mu`` itself when it
    already covers the image.

    Raises
    ------
    ConfigError
        The μ-map's planes do not span the axial field of view (more than half an image plane, or 1 mm, short at
        either end), naming both extents.
    """
    rec = stir_zoomed_image_grid(geometry, zoom)
    g = mu.grid
    rlo, rhi = _axial_extent(rec)
    mlo, mhi = _axial_extent(g)
    tol = max(1.0, rec.voxel_size[0] / 2.0)
    if mlo > rlo + tol or mhi < rhi - tol:
        raise ConfigError(f"scatter estimation: the μ-map (z from {mlo:.1f} to {mhi:.1f} mm, "
                          f"{g.shape[0]} planes) does not cover the axial field of view of the {geometry.scanner.name} "
                          f"(z from {rlo:.1f} to {rhi:.1f} mm) where the reconstructed activity is; give a μ-map of "
                          "the whole axial field of view")
    pads = []
    for a in (1, 2):
        half = (rec.shape[a] / 2.0) * rec.voxel_size[a]            # the reconstruction is centred on the axis
        lo = g.origin[a] - g.voxel_size[a] / 2.0
        hi = g.origin[a] + (g.shape[a] - 0.5) * g.voxel_size[a]
        pads.append((max(0, int(np.ceil((lo + half) / g.voxel_size[a] - 1e-6))),
                     max(0, int(np.ceil((half - hi) / g.voxel_size[a] - 1e-6)))))
    if not any(p for pair in pads for p in pair):
        return mu
    arr = np.pad(np.asarray(mu.array, dtype=np.float32), ((0, 0), pads[0], pads[1]))
    origin = (g.origin[0], g.origin[1] - pads[0][0] * g.voxel_size[1], g.origin[2] - pads[1][0] * g.voxel_size[2])
    meta = dict(mu.meta)
    meta["padded_from"] = g.describe()
    return Image(arr, ImageGrid(arr.shape, g.voxel_size, origin), meta)


def check_osem_subsets(geometry: SinogramGeometry, num_subsets: int, zoom: float = 0.2,
                       setting: str = "osem_num_subsets") -> None:
    """The loop's 2D OSEM must split the SSRB views of ``geometry`` into ``num_subsets`` balanced subsets (STIR's
    OSMAPOSL refuses unbalanced ones).

    Raises
    ------
    ConfigError
        Naming ``setting`` (the settings key, SIRF's ``set_OSEM_num_subsets``), the subsets and the views.
    """
    geo2 = ssrb_geometry(geometry)
    try:
        geo2.subset_views(int(num_subsets), 0, grid=stir_zoomed_image_grid(geometry, zoom))
    except ValueError as exc:
        raise ConfigError(f"scatter estimation: {setting} = {num_subsets} cannot split the {geo2.num_views} views of "
                          f"the prompts into balanced OSEM subsets, as STIR's OSMAPOSL requires ({exc}); choose a "
                          "number of subsets that does (set_OSEM_num_subsets)") from None


def tail_mask_from_mu(mu: Image, geometry: SinogramGeometry, filter_fwhm_mm=(15.0, 20.0, 20.0),
                      min_threshold: float = 0.003, acf_threshold: float = 1.1, safety_margin: int = 4,
                      device=None) -> np.ndarray:
    """STIR's ``ScatterEstimation`` tail mask: smooth μ, threshold to a 0/1 object mask, forward project it (ray
    tracing, 1 ray; x-voxel units), add 1 and apply :func:`tail_mask_from_acfs`. Returns float32 ``geometry.shape``.
    """
    dev = resolve_device(device)
    m = torch.as_tensor(np.asarray(mu.array, dtype=np.float32), device=dev)
    sm = gaussian_filter_mm(m, tuple(filter_fwhm_mm), mu.grid.voxel_size)
    obj = (sm >= min_threshold).to(torch.float32)
    grid = projector_grid_for(mu, geometry)
    if grid != mu.grid:
        from ..io.mumap import resample_to_grid
        obj_np = resample_to_grid(Image(obj.cpu().numpy(), mu.grid), grid).array
        obj = torch.as_tensor(np.asarray(obj_np, dtype=np.float32), device=dev)
    proj = Projector(geometry, grid, device=dev, num_tangential_lors=1).forward(obj)
    acf_like = proj.cpu().numpy() + 1.0
    return tail_mask_from_acfs(acf_like, acf_threshold, safety_margin)


def _array(x, shape, what) -> np.ndarray | None:
    if x is None:
        return None
    a = np.asarray(x.array if isinstance(x, ProjData) else x, dtype=np.float32)
    if a.shape != tuple(shape):
        raise GeometryMismatchError(f"scatter estimation: {what} shape {a.shape} does not match the prompts {shape}")
    if not np.isfinite(a).all():
        raise DataValueError(f"scatter estimation: {what} holds NaN or Inf")
    return a


def estimate_scatter(prompts: ProjData, mu: Image, energy_window: tuple[float, float],
                     randoms: ProjData | np.ndarray | None = None,
                     efficiencies: ProjData | np.ndarray | None = None,
                     attenuation: ProjData | np.ndarray | None = None,
                     settings: ScatterEstimationSettings | None = None, return_iterations: bool = False,
                     mask: np.ndarray | None = None, device=None,
                     callback: Callable[[int, dict], None] | None = None) -> ScatterEstimate:
    """STIR's ``ScatterEstimation`` on the prompts: the scatter sinogram in prompt counts.

    Parameters
    ----------
    prompts : measured prompts (non-TOF, non-arc-corrected).
    mu : μ-map in cm⁻¹ (STIR's unit); it sets the scatter points, the tail mask and (if ``attenuation`` is None) the
        attenuation factors. Zero-padded transaxially to the whole field of view (STIR's vacuum outside the map,
        :func:`mu_covering_reconstruction`); it must span the axial field of view.
    energy_window : ``(lower, upper)`` keV of the acquisition.
    randoms : the randoms (background) in prompt counts; None: 0.
    efficiencies : the multiplicative normalisation (detection efficiencies, *without* attenuation); None: 1 (STIR
        warns that this only suits simple simulations; so does this).
    attenuation : attenuation factors ``exp(-∫μ)`` (<= 1) on the prompts' geometry; None: computed from ``mu``.
    settings : :class:`ScatterEstimationSettings` (default: STIR's mMR parameter files).
    return_iterations : keep each iteration's 3D estimate (STIR's ``export scatter estimates of each iteration``).
    mask : a 2D tail mask (SSRB geometry) to use instead of the one from ``mu``.
    device : torch device of the simulation and the reconstruction.
    callback : called as ``callback(iteration, info)`` after each iteration (``info``: scale factors, totals).

    Raises
    ------
    NoTailBinsError : the tail mask has no bin.
    GeometryMismatchError : inputs of other shapes; GeometryError : TOF prompts or a scanner without energy
        resolution.
    ConfigError : bad settings; OSEM subsets that do not split the views evenly (naming ``osem_num_subsets``); a
        μ-map that does not span the axial field of view.
    """
    st = settings or ScatterEstimationSettings()
    st.check()
    geo3 = prompts.geometry
    check_osem_subsets(geo3, st.osem_num_subsets, st.zoom)
    mu = mu_covering_reconstruction(mu, geo3, st.zoom)
    shape3 = geo3.shape
    y3 = _array(prompts, shape3, "prompts")
    r3 = _array(randoms, shape3, "randoms")
    eff3 = _array(efficiencies, shape3, "efficiencies")
    if eff3 is None:
        warnings.warn("scatter estimation: no normalisation given; using 1 (only appropriate for simple "
                      "simulations, as STIR says)", stacklevel=2)
        eff3 = np.ones(shape3, dtype=np.float32)
    att3 = _array(attenuation, shape3, "attenuation factors")
    dev = resolve_device(device)
    if att3 is None:
        att3 = np.asarray(attenuation_factors(mu, geo3, device=dev).array, dtype=np.float32)
    if (att3 <= 0).any():
        raise DataValueError("scatter estimation: attenuation factors must be > 0 (exp(-∫μ))")
    geo2 = ssrb_geometry(geo3)
    y2 = ssrb(y3, geo3, out_geometry=geo2)
    r2 = ssrb(r3, geo3, out_geometry=geo2) if r3 is not None else np.zeros(geo2.shape, np.float32)
    S2 = np.maximum(ssrb(eff3, geo3, out_geometry=geo2), np.float32(1e-20))
    acf2 = ssrb(1.0 / att3, geo3, normalise=True, out_geometry=geo2)
    mult2 = (S2 / acf2).astype(np.float32)
    data_to_fit = ProjData((y2 - r2).astype(np.float32), geo2, {})
    if mask is None:
        mask2 = tail_mask_from_mu(mu, geo2, st.mask_filter_fwhm_mm, st.mask_min_threshold, st.acf_threshold,
                                  st.safety_margin, device=dev)
    else:
        mask2 = _array(mask, geo2.shape, "tail mask")
    template = downsample_scanner(geo2, st.downsampled_rings, st.downsampled_detectors)
    simulator = ScatterSimulator(mu, template, energy_window, attenuation_threshold=st.attenuation_threshold,
                                 device=dev)
    grid = stir_zoomed_image_grid(geo3, st.zoom)
    projector = Projector(geo2, grid, device=dev, num_tangential_lors=st.osem_num_tangential_lors)
    y2_pd = ProjData(y2, geo2, {"source": prompts.meta.get("source", "prompts") + " (SSRB)"})

    def reconstruct(x: torch.Tensor, additive: np.ndarray) -> torch.Tensor:
        lik = EngineLogLikelihood(y2_pd, mult=mult2, additive=additive, grid=grid, device=dev, projector=projector)
        rec = OSEMReconstructor(lik, num_subsets=st.osem_num_subsets, num_subiterations=st.osem_num_subiterations,
                                postfilter_fwhm=st.osem_postfilter_fwhm_mm)
        rec.set_up(x)
        rec.set_current_estimate(x)
        rec.process(progress=False)
        return rec.get_output_tensor().detach().clone()

    add2 = (r2 / mult2).astype(np.float32)
    x = reconstruct(torch.ones(grid.shape, dtype=torch.float32, device=dev), add2)
    x0 = x.clone()
    out = ScatterEstimate(scatter=None, mask=ProjData(mask2, geo2, {}))  # type: ignore[arg-type]
    n = int(st.num_iterations)
    for it in range(1, n + 1):
        if st.do_average_at_2 and it == 2:
            x = (x + x0) / 2
        act = Image(x.cpu().numpy().astype(np.float32), grid)
        unscaled = simulator.simulate(act, check_cover=False)
        fit: ScatterFit = upsample_and_fit_scatter(unscaled, data_to_fit, mask2, S2, st.min_scale_factor,
                                                   st.max_scale_factor, st.half_filter_width, st.remove_interleaving)
        s2 = fit.scatter.array
        out.scale_factors.append(fit.scale_factors)
        out.raw_scale_factors.append(fit.raw_scale_factors)
        if return_iterations or it == n:
            t = np.maximum(np.maximum(s2, np.float32(1e-9)) - np.float32(1e-9), 0).astype(np.float32) / S2
            s3 = (inverse_ssrb(t, geo2, geo3) * eff3).astype(np.float32)
            est = ProjData(s3, geo3, {"iteration": it})
            if return_iterations:
                out.iterations.append(est)
            if it == n:
                out.scatter = est
        if callback is not None:
            callback(it, {"scale_factors": fit.scale_factors, "total_2d": float(s2.sum(dtype=np.float64)),
                          "unscaled_total": unscaled.meta["total"]})
        out.scatter_2d, out.unscaled, out.activity = fit.scatter, unscaled, act
        if it < n:
            if st.restart_reconstruction_every_iteration:
                x = torch.ones_like(x)
            x = reconstruct(x, ((s2 + r2) / mult2).astype(np.float32))
    _warn_clipped(out.raw_scale_factors[-1], st, prompts.meta.get("source", "prompts"))
    return out


def _warn_clipped(raw: np.ndarray | None, st: ScatterEstimationSettings, source: str) -> None:
    """STIR clips the tail-fit factors to [minimum, maximum scatter scaling factor] and only logs it; a fit that
    wanted more (or less) is said, naming the key and both values (the estimate is then off by that ratio)."""
    if raw is None:
        return
    r = np.asarray(raw, dtype=np.float64)
    r = r[np.isfinite(r)]
    if not r.size:
        return
    from ..errors import InputFileWarning

    for key, bad, lim, ext, word in (("maximum scatter scaling factor", r > st.max_scale_factor,
                                      st.max_scale_factor, float(r.max()), "up to"),
                                     ("minimum scatter scaling factor", r < st.min_scale_factor,
                                      st.min_scale_factor, float(r.min()), "down to")):
        if bad.any():
            warnings.warn(InputFileWarning(source, f"the last scatter tail fit asked for factors {word} {ext:.4g} in "
                                           f"{int(bad.sum())} of {r.size} sinograms; clipped to {lim:g} as STIR does, so "
                                           "the scatter there is off by that ratio (check the data's scale or the "
                                           "setting)", key=key), stacklevel=3)


class ScatterEstimator:
    """SIRF's ``sirf.STIR.ScatterEstimator`` surface on :func:`estimate_scatter`.

    SIRF's method names: :meth:`set_input`, :meth:`set_attenuation_image`, :meth:`set_background` (SIRF's Python
    ``set_randoms``), :meth:`set_asm` (the normalisation without attenuation), :meth:`set_attenuation_correction_factors`,
    :meth:`set_mask_acq_data`, :meth:`set_num_iterations`, :meth:`set_OSEM_num_subsets`,
    :meth:`set_OSEM_num_subiterations`, :meth:`set_max_scale_value`, :meth:`set_min_scale_value`, :meth:`set_up`,
    :meth:`process`, :meth:`get_output`, :meth:`get_scatter_estimate`. Defaults are SIRF's (STIR's class defaults
    and OSEM 7 subsets / 8 sub-iterations, :meth:`ScatterEstimationSettings.sirf_defaults`).

    Inputs are this package's :class:`~sirf_ddip.data.ProjData` / :class:`~sirf_ddip.data.Image` (or arrays for
    the sinograms). The energy window is :meth:`set_energy_window` or the prompts' ``meta["energy_window_kev"]``
    (what :func:`~sirf_ddip.io.read_projdata` reads from the header keys ``energy window lower/upper level[1]``).
    """

    def __init__(self, settings: ScatterEstimationSettings | None = None, device=None):
        self.settings = dataclasses.replace(settings) if settings is not None else \
            ScatterEstimationSettings.sirf_defaults()
        self.device = device
        self._prompts: ProjData | None = None
        self._mu: Image | None = None
        self._randoms = None
        self._eff = None
        self._att = None
        self._mask = None
        self._window: tuple[float, float] | None = None
        self._export = False
        self._result: ScatterEstimate | None = None
        self._set_up = False

    # ------------------------------------------------------------------ inputs (SIRF names)
    def set_input(self, prompts: ProjData) -> None:
        self._prompts, self._set_up = prompts, False

    def set_attenuation_image(self, mu: Image) -> None:
        self._mu, self._set_up = mu, False

    def set_background(self, randoms) -> None:
        self._randoms, self._set_up = randoms, False

    set_randoms = set_background

    def set_asm(self, efficiencies) -> None:
        """The acquisition sensitivity model *without* attenuation: a ProjData/array of efficiencies or an object
        with ``forward`` applied to a sinogram of ones (SIRF's AcquisitionSensitivityModel)."""
        if hasattr(efficiencies, "forward") and self._prompts is not None and not isinstance(efficiencies, ProjData):
            efficiencies = np.asarray(efficiencies.forward(np.ones(self._prompts.geometry.shape, np.float32)))
        self._eff, self._set_up = efficiencies, False

    def set_attenuation_correction_factors(self, acfs) -> None:
        """ACFs ``exp(+∫μ)`` (STIR's ``attenuation correction factors``); otherwise computed from the μ-map."""
        a = np.asarray(acfs.array if isinstance(acfs, ProjData) else acfs, dtype=np.float32)
        if (a <= 0).any():
            raise DataValueError("attenuation correction factors must be > 0")
        self._att, self._set_up = (1.0 / a).astype(np.float32), False

    def set_mask_acq_data(self, mask) -> None:
        """A 2D (SSRB) tail mask to use instead of the one computed from the μ-map."""
        self._mask = np.asarray(mask.array if isinstance(mask, ProjData) else mask, dtype=np.float32)
        self._set_up = False

    def set_energy_window(self, lower_kev: float, upper_kev: float) -> None:
        self._window = (float(lower_kev), float(upper_kev))

    def get_energy_window(self) -> tuple[float, float] | None:
        """The window (keV) the estimate uses: :meth:`set_energy_window`'s, else (after :meth:`set_up`) the prompts'."""
        return self._window

    def set_num_iterations(self, n: int) -> None:
        self.settings.num_iterations = int(n)

    def get_num_iterations(self) -> int:
        return int(self.settings.num_iterations)

    def set_OSEM_num_subsets(self, n: int) -> None:  # noqa: N802 (SIRF's name)
        self.settings.osem_num_subsets = int(n)

    def get_OSEM_num_subsets(self) -> int:  # noqa: N802
        return int(self.settings.osem_num_subsets)

    def set_OSEM_num_subiterations(self, n: int) -> None:  # noqa: N802
        self.settings.osem_num_subiterations = int(n)

    def get_OSEM_num_subiterations(self) -> int:  # noqa: N802
        return int(self.settings.osem_num_subiterations)

    def set_max_scale_value(self, v: float) -> None:
        self.settings.max_scale_factor = float(v)

    def set_min_scale_value(self, v: float) -> None:
        self.settings.min_scale_factor = float(v)

    def set_export_scatter_estimates_of_each_iteration(self, flag: bool) -> None:
        self._export = bool(flag)

    # ------------------------------------------------------------------ running
    def set_up(self) -> None:
        """Check the inputs (SIRF: all inputs are set before ``set_up``).

        Raises
        ------
        ConfigError : no prompts, no attenuation image or no energy window; bad settings.
        """
        if self._prompts is None:
            raise ConfigError("ScatterEstimator: No input proj_data have been set (set_input)")
        if self._mu is None:
            raise ConfigError("ScatterEstimator: No attenuation image has been set (set_attenuation_image)")
        if self._window is None:
            # read_projdata keeps the header's window as meta["energy_window_kev"] (io/interfile.py)
            w = self._prompts.meta.get("energy_window_kev", self._prompts.meta.get("energy_window"))
            if w is None:
                raise ConfigError("ScatterEstimator: no energy window (set_energy_window, or the prompts' header keys "
                                  "'energy window lower level[1]' / 'energy window upper level[1]')")
            self._window = (float(w[0]), float(w[1]))
        self.settings.check()
        self._set_up = True

    def process(self) -> None:
        if not self._set_up:
            raise ConfigError("ScatterEstimator: set_up() must be called before process()")
        self._result = estimate_scatter(self._prompts, self._mu, self._window, randoms=self._randoms,
                                        efficiencies=self._eff, attenuation=self._att, settings=self.settings,
                                        return_iterations=self._export, mask=self._mask, device=self.device)

    def get_output(self) -> ProjData:
        """The last scatter estimate (prompt counts on the prompts' geometry)."""
        if self._result is None:
            raise ConfigError("ScatterEstimator: output not yet computed (process)")
        return self._result.scatter

    def get_scatter_estimate(self, est_num: int = -1) -> ProjData:
        """Iteration ``est_num``'s estimate (1-based; -1 the last); earlier ones need
        :meth:`set_export_scatter_estimates_of_each_iteration`."""
        n = self.get_num_iterations()
        if est_num in (-1, n):
            return self.get_output()
        if self._result is None or not self._result.iterations:
            raise ConfigError("ScatterEstimator: estimates of each iteration were not kept "
                              "(set_export_scatter_estimates_of_each_iteration(True))")
        if not 1 <= est_num <= n:
            raise ConfigError(f"ScatterEstimator: estimate {est_num} is not in 1..{n}")
        return self._result.iterations[est_num - 1]

    def get_result(self) -> ScatterEstimate:
        """Everything :func:`estimate_scatter` returned (masks, scale factors, activity)."""
        if self._result is None:
            raise ConfigError("ScatterEstimator: output not yet computed (process)")
        return self._result
