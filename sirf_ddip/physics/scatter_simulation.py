"""STIR's ``ScatterSimulation`` set-up around the single scatter kernel: the down-sampled scanner, the
scatter-point grid and :func:`simulate_scatter` on a template geometry.

What STIR does (UCL/STIR ``src/scatter_buildblock/ScatterSimulation.cxx``: ``downsample_scanner``,
``downsample_density_image_for_scatter_points``, ``set_up``; ``sample_scatter_points.cxx``), reproduced from its
rules, not its code:

- **Down-sampled scanner** (``use scanner downsampling in scatter simulation := 1``, the default of
  ``ScatterEstimation``): ``round(num_rings * ring_spacing / 20 mm + 0.5)`` rings (at least 2) over the same axial
  length (ring spacing ``num_rings * ring_spacing / new_rings``), 64 detectors per ring, the same radius, depth of
  interaction and view offset, ``ceil(num_tangential * 64 / detectors_per_ring) + 1`` tangential positions,
  default bin size ``R_eff pi / 64``; a span-1 template with ``detectors / 2`` views and, when the original
  template has one segment (the SSRB data of the estimation loop), only segment 0, else all ring differences.
- **Scatter points**: the μ-map is zoomed (mean over each output voxel) to a grid whose xy voxel is the
  template's default bin size (size ``int(n_xy * zoom + 1)`` made odd) and whose z has ``(2 R - 1 + 1) / 2 = R``
  planes spanning the larger of the μ-map's and the template image's ``(n + 1) vz``, first and last plane centres
  kept (``zoom_z = (nz_new - 1) / (nz - 1)``); every voxel with ``μ >= attenuation threshold`` (0.01 cm⁻¹) is a
  scatter point at its centre (STIR's ``randomly place scatter points := 0``; STIR's default jitters the points
  with ``srand(time)``, which no one can reproduce).
- **Images**: activity and μ (cm⁻¹) may have different grids; line integrals are traced on each. Images are
  placed as STIR places them: transaxially by their first-voxel offset, axially with the index centre on the
  scanner's centre plus ``origin[0]``.

The result is STIR's *normalised, unscaled* estimate (see :mod:`.scatter` and ``../shared/scatter/cylinder_mmr``):
to be scaled to the data by the tail fit (:mod:`.scatter_fit`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..data import Image, ProjData
from ..errors import GeometryError, GeometryMismatchError
from ..geometry.image import ImageGrid
from ..geometry.scanner import Scanner
from ..geometry.sinogram import SinogramGeometry
from ..utils.device import resolve_device
from . import scatter as _sss

__all__ = ["DEFAULT_DOWNSAMPLED_DETECTORS", "downsampled_scanner", "downsample_scanner", "scatter_point_grid",
           "zoom_preserving_values", "scatter_points_for", "ScatterSimulator", "simulate_scatter",
           "energy_resolution_of"]

#: STIR's default number of detectors per ring of the down-sampled (cylindrical) scanner
DEFAULT_DOWNSAMPLED_DETECTORS = 64


def _stir_round(x: float) -> int:
    """STIR's ``round`` (half away from zero)."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def downsampled_scanner(scanner: Scanner, num_tangential: int, num_rings: int | None = None,
                        num_detectors: int | None = None) -> Scanner:
    """STIR's down-sampled copy of a cylindrical ``scanner`` for scatter simulation.

    Parameters
    ----------
    scanner : the scanner of the data.
    num_tangential : the number of tangential positions of the data's template (sets the new number of bins).
    num_rings, num_detectors : STIR's ``override number of downsampled rings / detectors per ring``; ``None``
        (or <= 0) gives STIR's defaults, ``round(axial length / 20 mm + 0.5)`` (>= 2) and 64.

    Returns
    -------
    Scanner : same name, radius, depth of interaction, view offset and energy keys; new rings, ring spacing
        (same axial length ``num_rings * ring_spacing``), detectors, maximum non-arc-corrected bins and default bin
        size ``R_eff pi / num_detectors``.
    """
    if num_rings is None or num_rings <= 0:
        length = scanner.num_rings * scanner.ring_spacing_mm
        num_rings = max(_stir_round(np.float32(length) / np.float32(20.0) + np.float32(0.5)), 2)
    if num_detectors is None or num_detectors <= 0:
        num_detectors = DEFAULT_DOWNSAMPLED_DETECTORS
    num_rings, num_detectors = int(num_rings), int(num_detectors)
    if num_detectors % 2 or num_detectors < 4:
        raise GeometryError(f"down-sampled scanner: detectors per ring must be even and >= 4, got {num_detectors}")
    n_bins = int(math.ceil(num_tangential * float(num_detectors) / scanner.detectors_per_ring)) + 1
    length = scanner.num_rings * scanner.ring_spacing_mm
    return dataclasses.replace(
        scanner, num_rings=num_rings, detectors_per_ring=num_detectors, ring_spacing_mm=length / num_rings,
        max_num_non_arc_corrected_bins=n_bins, default_num_arc_corrected_bins=n_bins,
        default_bin_size_mm=scanner.effective_radius_mm * math.pi / num_detectors,
        extra=dict(scanner.extra))


def downsample_scanner(geometry: SinogramGeometry, num_rings: int | None = None,
                       num_detectors: int | None = None) -> SinogramGeometry:
    """STIR's ``ScatterSimulation::downsample_scanner``: the template geometry the scatter is simulated on.

    Span 1, ``num_detectors / 2`` views, the new scanner's maximum number of non-arc-corrected bins, and ring
    differences up to 0 when ``geometry`` has a single segment (the SSRB data of the estimation loop), else up to
    ``num_rings - 1``.

    Examples
    --------
    >>> g = downsample_scanner(SinogramGeometry("Siemens mMR", span=121, max_ring_diff=60))  # doctest: +SKIP
    >>> g.scanner.num_rings, g.num_views, g.num_tangential  # doctest: +SKIP
    (14, 32, 45)
    """
    if geometry.is_tof:
        geometry = geometry.non_tof()
    sc = downsampled_scanner(geometry.scanner, geometry.num_tangential, num_rings, num_detectors)
    delta = 0 if geometry.num_segments == 1 else sc.num_rings - 1
    return SinogramGeometry(sc, span=1, max_ring_diff=delta, num_tangential=sc.max_num_non_arc_corrected_bins)


def _template_image_grid(template: SinogramGeometry) -> tuple[int, float, float]:
    """(nz, vz, vxy) of STIR's ``VoxelsOnCartesianGrid(template)`` (zoom 1)."""
    sc = template.scanner
    seg0 = template.segment(0)
    nz = seg0.num_axial if seg0.max_ring_diff > seg0.min_ring_diff else 2 * seg0.num_axial - 1
    return nz, sc.ring_spacing_mm / 2.0, sc.default_bin_size_mm


def scatter_point_grid(mu_grid: ImageGrid, template: SinogramGeometry, zoom_xy: float | None = None,
                       zoom_z: float | None = None, size_xy: int | None = None,
                       size_z: int | None = None) -> ImageGrid:
    """STIR's ``downsample_density_image_for_scatter_points``: the grid of the μ image the scatter points sit in.

    Parameters
    ----------
    mu_grid : the μ-map's grid.
    template : the (down-sampled) template geometry.
    zoom_xy, zoom_z, size_xy, size_z : STIR's ``zoom XY/Z for attenuation image for scatter points`` and
        ``XY/Z size of downsampled image for scatter points``; ``None`` gives STIR's automatic choice (xy voxel =
        the template's default bin size, z: half the template image's planes over the axial length).

    Returns
    -------
    ImageGrid : centred transaxially (odd xy sizes), same axial offset as the μ-map.

    Raises
    ------
    GeometryError : a fixed ``zoom_z`` that STIR would refuse (it must equal ``(nz_new - 1) / (nz - 1)`` to 0.1).
    """
    nz_old, ny_old, nx_old = mu_grid.shape
    vz_old, vy_old, vx_old = mu_grid.voxel_size
    if zoom_xy is None or zoom_z is None:
        t_nz, t_vz, t_vxy = _template_image_grid(template)
        if zoom_xy is None:
            zoom_xy = vx_old / t_vxy
        if zoom_z is None:
            z_length = max((nz_old + 1) * vz_old, (t_nz + 1) * t_vz)
            if size_z is None:
                size_z = (t_nz + 1) // 2
            zz = vz_old / (z_length / size_z)
        else:
            zz = zoom_z
    else:
        zz = zoom_z
    new_x = int(size_xy) if size_xy is not None else int(np.float32(nx_old) * np.float32(zoom_xy) + 1)
    new_y = int(size_xy) if size_xy is not None else int(np.float32(ny_old) * np.float32(zoom_xy) + 1)
    new_z = int(size_z) if size_z is not None else int(np.float32(nz_old) * np.float32(zz) + 1)
    new_x += 1 - new_x % 2
    new_y += 1 - new_y % 2
    final_zz = (new_z - 1) / (nz_old - 1) if nz_old > 1 else 1.0
    if zoom_z is not None and abs(final_zz - zoom_z) > 0.1:
        raise GeometryError(f"scatter-point image: zoom_z must be -1 (automatic) or {final_zz:g} (STIR's limitation), "
                            f"got {zoom_z}")
    vz = vz_old / final_zz if nz_old > 1 else vz_old * nz_old / max(new_z, 1)
    vxy = vx_old / zoom_xy
    vy = vy_old / zoom_xy
    return ImageGrid((new_z, new_y, new_x), (vz, vy, vxy),
                     (mu_grid.origin[0], -(new_y // 2) * vy, -(new_x // 2) * vxy))


def _axis_centres(grid: ImageGrid, axis: int) -> np.ndarray:
    """Voxel centres along ``axis`` in the scanner frame (z: index centre on the scanner centre + origin)."""
    if axis == 0:
        n, v = grid.shape[0], grid.voxel_size[0]
        return (np.arange(n) - (n - 1) / 2.0) * v + grid.origin[0]
    return grid.coords(axis)


def _overlap(c_in: np.ndarray, v_in: float, c_out: np.ndarray, v_out: float) -> np.ndarray:
    lo = np.maximum((c_in - v_in / 2)[None, :], (c_out - v_out / 2)[:, None])
    hi = np.minimum((c_in + v_in / 2)[None, :], (c_out + v_out / 2)[:, None])
    return np.clip(hi - lo, 0.0, None) / v_out


def zoom_preserving_values(array: np.ndarray, grid_in: ImageGrid, grid_out: ImageGrid) -> np.ndarray:
    """STIR's ``zoom_image(..., ZoomOptions::preserve_values)``: each output voxel is the mean of the input over its
    extent (overlap interpolation per axis), placed by physical coordinates (:func:`_axis_centres`)."""
    W = [_overlap(_axis_centres(grid_in, a), grid_in.voxel_size[a], _axis_centres(grid_out, a),
                  grid_out.voxel_size[a]) for a in range(3)]
    out = np.asarray(array, dtype=np.float64)
    out = np.tensordot(out, W[2], axes=([2], [1]))           # (z, y, c): one axis at a time, not a 7-fold loop
    out = np.tensordot(out, W[1], axes=([1], [1]))           # (z, c, b)
    out = np.tensordot(out, W[0], axes=([0], [1]))           # (c, b, a)
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def scatter_points_for(mu: Image, template: SinogramGeometry, attenuation_threshold: float = 0.01,
                       grid: ImageGrid | None = None) -> tuple[_sss.ScatterPoints, np.ndarray, ImageGrid]:
    """The scatter points STIR samples for ``mu`` on ``template``: ``(points, zoomed_mu, grid)``."""
    if grid is None:
        grid = scatter_point_grid(mu.grid, template)
    small = zoom_preserving_values(mu.array, mu.grid, grid)
    idx = np.argwhere(small >= attenuation_threshold)
    cz, cy, cx = (_axis_centres(grid, a) for a in range(3))
    pos = np.stack([cz[idx[:, 0]], cy[idx[:, 1]], cx[idx[:, 2]]], axis=1)
    pts = _sss.ScatterPoints(pos, small[tuple(idx.T)], float(np.prod(grid.voxel_size)))
    return pts, small, grid


def energy_resolution_of(scanner: Scanner) -> tuple[float, float]:
    """The scanner's ``(energy resolution, reference energy keV)`` (STIR's scanner keys).

    Raises
    ------
    GeometryError : the scanner has no (positive) energy resolution, which STIR's ``ScatterSimulation::set_up``
        refuses ("scanner energy resolution information not set").
    """
    res = scanner.extra.get("energy_resolution")
    ref = scanner.extra.get("reference_energy_kev") or 511.0
    if res is None or not res > 0:
        raise GeometryError(f"scanner {scanner.name!r}: no energy resolution (key 'Energy resolution'); the scatter "
                            "simulation needs it (as STIR)")
    return float(res), float(ref)


def _image_centre(grid: ImageGrid) -> tuple[float, float, float]:
    """Centre of the image's index box in the scanner frame (z, y, x) mm."""
    return tuple(float(_axis_centres(grid, a)[[0, -1]].mean()) for a in range(3))


def _template_rings(template: SinogramGeometry) -> np.ndarray:
    """Ring pairs ``(A, B)`` per sinogram (memory order) of a span-1 template (STIR: ring difference B - A)."""
    pairs = []
    for k in template.segment_sequence:
        seg = template.segment(k)
        d = seg.min_ring_diff
        for a in range(seg.num_axial):
            ra = a if d >= 0 else a - d
            pairs.append((ra, ra + d))
    return np.asarray(pairs, dtype=np.int64)


class ScatterSimulator:
    """STIR's single scatter simulation on one template for one μ-map, re-run for new activity images.

    The scatter points, the detector positions and the μ integrals from each scatter point to each detector are
    computed once (STIR's attenuation cache); :meth:`simulate` traces only the activity.

    Parameters
    ----------
    mu : attenuation image in cm⁻¹.
    template : a span-1, non-TOF, unmashed template (normally :func:`downsample_scanner`'s).
    energy_window : ``(lower, upper)`` keV (STIR's ``energy window lower/upper level``).
    energy_resolution, reference_energy_kev : default: the template scanner's keys.
    attenuation_threshold : μ (cm⁻¹) from which a scatter-point voxel counts (STIR's default 0.01).
    scatter_grid : the scatter-point grid (default :func:`scatter_point_grid`).
    device : torch device (None/"auto": CUDA if available); ``dtype`` of the computation.

    Raises
    ------
    GeometryError : a TOF, mashed or span > 1 template; a scanner without energy resolution; a bad window.
    """

    def __init__(self, mu: Image, template: SinogramGeometry, energy_window: tuple[float, float],
                 energy_resolution: float | None = None, reference_energy_kev: float | None = None,
                 attenuation_threshold: float = 0.01, scatter_grid: ImageGrid | None = None, device=None,
                 dtype: torch.dtype = torch.float64, chunk: int = 8192):
        if (template.is_tof or template.view_mashing != 1
                or template.num_views * 2 != template.scanner.detectors_per_ring):
            raise GeometryError(f"scatter simulation template must be non-TOF and unmashed "
                                f"({template.num_views} views for {template.scanner.detectors_per_ring} detectors)")
        if any(sg.min_ring_diff != sg.max_ring_diff for sg in template.segments):
            raise GeometryError("scatter simulation template must have span 1 (one ring difference per segment)")
        lo, hi = (float(v) for v in energy_window)
        if not (0 < lo < hi):
            raise GeometryError(f"energy window must be 0 < lower < upper keV, got {tuple(energy_window)}")
        if energy_resolution is None or reference_energy_kev is None:
            r, ref = energy_resolution_of(template.scanner)
            energy_resolution = r if energy_resolution is None else energy_resolution
            reference_energy_kev = ref if reference_energy_kev is None else reference_energy_kev
        self.template, self.mu = template, mu
        self.energy_window = (lo, hi)
        self.energy_resolution, self.reference_energy_kev = float(energy_resolution), float(reference_energy_kev)
        self.device, self.dtype, self.chunk = resolve_device(device), dtype, int(chunk)
        self.points, self.scatter_mu, self.scatter_grid = scatter_points_for(mu, template, attenuation_threshold,
                                                                             scatter_grid)
        sc = template.scanner
        xy, self._ia, self._ib = _sss.detector_positions(template.num_views, template.tangential_positions(),
                                                         sc.detectors_per_ring, sc.effective_radius_mm,
                                                         sc.view_offset_rad)
        ring_z = (np.arange(sc.num_rings) - (sc.num_rings - 1) / 2.0) * sc.ring_spacing_mm
        self._detectors = _sss.detector_grid(xy, ring_z)
        self._pairs = _template_rings(template)
        self._mu_integrals = None

    @property
    def num_scatter_points(self) -> int:
        return int(len(self.points.mu))

    def _mu_int(self) -> torch.Tensor:
        if self._mu_integrals is None:
            self._mu_integrals = _sss.point_detector_integrals(
                np.asarray(self.mu.array, dtype=np.float64), self.mu.grid.voxel_size, self.points, self._detectors,
                _image_centre(self.mu.grid), self.device, self.dtype, self.chunk)
        return self._mu_integrals

    def simulate(self, activity: Image, check_cover: bool = True) -> ProjData:
        """The unscaled single scatter estimate of ``activity`` on the template.

        ``check_cover``: refuse an activity that lies outside the μ-map (off in the estimation loop, where the
        reconstructed image is positive over the whole field of view and STIR treats the outside as vacuum).

        Returns
        -------
        ProjData : ``template.shape`` float32 (memory order); ``meta["scatter_points"]``, ``meta["total"]`` (the
            sum, STIR's log "TOTAL SCATTER counts before upsampling and norm").

        Raises
        ------
        GeometryMismatchError : the μ-map does not cover the voxels where the activity is > 0 (1 mm tolerance).
        """
        if check_cover:
            _check_cover(activity, self.mu.grid)
        out = np.zeros(self.template.shape, dtype=np.float32)
        if self.num_scatter_points:
            act = _sss.point_detector_integrals(np.asarray(activity.array, dtype=np.float64),
                                                activity.grid.voxel_size, self.points, self._detectors,
                                                _image_centre(activity.grid), self.device, self.dtype, self.chunk)
            est = _sss.single_scatter_from_integrals(
                act, self._mu_int(), activity.grid.voxel_size[2], self.points, self._detectors,
                self.template.scanner.detectors_per_ring, self._ia, self._ib, self._pairs, *self.energy_window,
                self.energy_resolution, self.reference_energy_kev)
            out[:] = est.permute(1, 0, 2).cpu().numpy().astype(np.float32)   # (views, sinos, tang) -> memory order
        return ProjData(out, self.template, {"scatter_points": self.num_scatter_points,
                                             "total": float(out.sum(dtype=np.float64))})


def simulate_scatter(activity: Image, mu: Image, template: SinogramGeometry, energy_window: tuple[float, float],
                     energy_resolution: float | None = None, reference_energy_kev: float | None = None,
                     attenuation_threshold: float = 0.01, scatter_grid: ImageGrid | None = None,
                     device=None, dtype: torch.dtype = torch.float64, chunk: int = 8192) -> ProjData:
    """STIR's unscaled single scatter simulation (``simulate_scatter``) of ``activity`` in ``mu`` on ``template``.

    One-shot :class:`ScatterSimulator` (see there for the parameters and errors); μ in cm⁻¹, the activity in any
    units (the estimate is linear in it). Returns a :class:`~sirf_ddip.data.ProjData` on ``template``.

    Examples
    --------
    >>> t = downsample_scanner(prompts.geometry)  # doctest: +SKIP
    >>> s = simulate_scatter(activity, mu, t, (430.0, 610.0))  # doctest: +SKIP
    """
    return ScatterSimulator(mu, template, energy_window, energy_resolution, reference_energy_kev,
                            attenuation_threshold, scatter_grid, device, dtype, chunk).simulate(activity)


def _check_cover(activity: Image, mu: ImageGrid, tol_mm: float = 1.0) -> None:
    """The μ-map must cover where the activity is (STIR would silently treat the outside as vacuum)."""
    act = activity.grid
    arr = np.asarray(activity.array)
    nz = np.argwhere(arr > 0)
    if not len(nz):
        return
    for a, name in ((0, "z"), (1, "y"), (2, "x")):
        ca, cm = _axis_centres(act, a), _axis_centres(mu, a)
        alo, ahi = ca[nz[:, a].min()] - act.voxel_size[a] / 2, ca[nz[:, a].max()] + act.voxel_size[a] / 2
        mlo, mhi = cm[0] - mu.voxel_size[a] / 2, cm[-1] + mu.voxel_size[a] / 2
        if mlo > alo + tol_mm or mhi < ahi - tol_mm:
            raise GeometryMismatchError(
                f"the μ-map ({name} from {mlo:.1f} to {mhi:.1f} mm) does not cover the activity ({name} from "
                f"{alo:.1f} to {ahi:.1f} mm)")
