"""Time-of-flight projection: STIR 6's TOF kernel applied to the non-TOF ray-tracing matrix.

What STIR does (UCL/STIR ``ProjMatrixByBin::apply_tof_kernel`` / ``get_tof_value``, ``ProjDataInfo::
set_tof_mash_factor``), and what is reproduced here:

- The TOF matrix of bin ``(segment, view, axial, tang, k)`` is the non-TOF ray-tracing matrix of
  ``(segment, view, axial, tang)`` (:mod:`sirf_ddip.physics.raytrace`: the same elements, 3 tangential LORs)
  with every element's value multiplied by the Gaussian timing response integrated over TOF bin ``k``,
  evaluated at the element's *voxel centre*:

  ``w_k(d) = 0.5 [erf((high_k - d) / (sqrt(2) sigma)) - erf((low_k - d) / (sqrt(2) sigma))]``,

  set to 0 when both ``(low_k - d)`` and ``(high_k - d)`` are at least ``4 sqrt(2) sigma`` on the same side.
  ``sigma = c/2 * FWHM / 2.355`` (the scanner's ``TOF timing resolution (ps)``); ``[low_k, high_k]`` are
  :meth:`SinogramGeometry.tof_bin_edges_mm`.
- ``d`` is the signed distance of the voxel centre from the LOR's mid-point along the LOR, positive towards
  STIR's ``a > 0`` end of ``X = s cos(phi) + a sin(phi)``, ``Y = s sin(phi) - a cos(phi)``, ``Z = m - a tan(theta)``:
  ``d = (x sin(phi) - y cos(phi) - (z - m) tan(theta)) / sqrt(1 + tan(theta)^2)`` (x, y from the scanner axis,
  z from the scanner centre), with the bin's central ``(phi, s)`` and ``tan(theta)``.
- Summed over the TOF bins, the weights are 1 (up to the cut-off, ``erfc(4) ~ 1.5e-8``, and the bins' total
  range), so the TOF projection summed over TOF bins is the non-TOF projection.

Design: the non-TOF matrix (and its process / disk cache) is shared with the non-TOF :class:`Projector` of the
same geometry; the TOF projector keeps, per stored element, only its ``d`` (float32, one number per element,
shared by every axial position and the z-mirrored segment: ``(z - m) tan(theta)`` is the same for both) and
evaluates the kernel while projecting (compiled CPU kernels in :mod:`sirf_ddip.physics._tof_kernels`; on other
devices per TOF bin a sparse matrix whose values are ``vals * w_k(d)``, computed on the device).  Multiplicative
factors that do not depend on TOF (norm, attenuation) are broadcast over the TOF axis by the caller, never
copied per bin.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import GeometryMismatchError
from ..geometry.image import ImageGrid
from ..geometry.sinogram import SinogramGeometry
from .projector import Projector, _row_bounds, _to_torch_csr, _TorchSeg
from .raytrace import SystemMatrix

__all__ = ["TOFProjector", "tof_kernel_weights", "element_tof_coordinates", "kernel_table", "point_tof_coordinate",
           "axial_tof_offset_mm", "TOF_CUTOFF"]

#: STIR's cut-off of the integrated Gaussian: 0 once both bin edges are this many ``sqrt(2) sigma`` away
TOF_CUTOFF = 4.0

_D_CACHE: dict = {}


def tof_kernel_weights(d, edges: np.ndarray, sigma_mm: float):
    """STIR's ``get_tof_value`` for every TOF bin: ``w[..., k]`` for TOF coordinates ``d`` (mm; numpy or torch).

    Parameters
    ----------
    d : array or tensor
        Signed distances from the LOR's mid-point (mm).
    edges : (n_tof, 2) array
        Lower and upper edges of the TOF bins (mm), :meth:`SinogramGeometry.tof_bin_edges_mm`.
    sigma_mm : float
        Standard deviation of the Gaussian timing response along the LOR (mm).
    """
    r = 1.0 / (sigma_mm * math.sqrt(2.0))
    if isinstance(d, torch.Tensor):
        e = torch.as_tensor(np.asarray(edges, np.float64), device=d.device, dtype=torch.float64)
        dn1 = (e[:, 0] - d.double()[..., None]) * r
        dn2 = (e[:, 1] - d.double()[..., None]) * r
        w = 0.5 * (torch.erf(dn2) - torch.erf(dn1))
        out = ((dn1 >= TOF_CUTOFF) & (dn2 >= TOF_CUTOFF)) | ((dn1 <= -TOF_CUTOFF) & (dn2 <= -TOF_CUTOFF))
        return torch.where(out, torch.zeros_like(w), w).to(d.dtype if d.is_floating_point() else torch.float32)
    from scipy.special import erf
    d = np.asarray(d, np.float64)[..., None]
    dn1 = (np.asarray(edges, np.float64)[:, 0] - d) * r
    dn2 = (np.asarray(edges, np.float64)[:, 1] - d) * r
    w = 0.5 * (erf(dn2) - erf(dn1))
    out = ((dn1 >= TOF_CUTOFF) & (dn2 >= TOF_CUTOFF)) | ((dn1 <= -TOF_CUTOFF) & (dn2 <= -TOF_CUTOFF))
    return np.where(out, 0.0, w)


def kernel_table(edges: np.ndarray, sigma_mm: float, samples_per_bin: int = 1024):
    """STIR's TOF kernel of one bin as a function of ``u = d - centre`` on a grid, for linear interpolation.

    Returns ``(table, centre_0, U, h, M)``: ``table[j] = W(-U + j h)`` with ``W`` the integrated Gaussian of
    :func:`tof_kernel_weights` (of a bin of the geometry's width, centred on 0, zero beyond the cut-off),
    ``h = width / M``; ``U`` covers the kernel's support.  Linear interpolation errs by at most
    ``h^2 / 8 max|W''|``, below 1e-7 for ``M = 1024`` and any TOF bin width."""
    e = np.asarray(edges, np.float64)
    width = float(e[0, 1] - e[0, 0])
    centre0 = float((e[0, 0] + e[0, 1]) / 2)
    M = int(samples_per_bin)
    h = width / M
    reach = width / 2 + TOF_CUTOFF * math.sqrt(2.0) * sigma_mm
    half = int(math.ceil(reach / h)) + 2
    u = (np.arange(2 * half + 1) - half) * h
    table = tof_kernel_weights(-u, np.array([[-width / 2, width / 2]]), sigma_mm)[:, 0]
    return np.ascontiguousarray(table, np.float64), centre0, half * h, h, M


def point_tof_coordinate(geometry: SinogramGeometry, x_mm, y_mm, z_mm=0.0, segment: int = 0, axial: int = 0,
                         tang: int | None = None) -> np.ndarray:
    """TOF coordinate ``d`` (mm) of a point for every view of a bin (STIR's convention, see module docstring)."""
    phi = geometry.phi()
    t = geometry.num_tangential // 2 if tang is None else int(tang)
    tt = float(np.asarray(geometry.tantheta(segment, geometry.s()[t])))
    m = geometry.m(segment)[axial]
    return (x_mm * np.sin(phi) - y_mm * np.cos(phi) - (z_mm - m) * tt) / math.sqrt(1.0 + tt * tt)


def element_tof_coordinates(geometry: SinogramGeometry, grid: ImageGrid, sm: SystemMatrix) -> dict:
    """Per planned segment, ``d`` (float32 mm) of every stored element of the non-TOF matrix ``sm``.

    Element ``e`` of row ``view * nt + tang`` stores ``c = yx * P + q + Z0``: voxel ``yx`` of image plane ``q``
    for axial position 0; its centre is ``x = ox + ix vx``, ``y = oy + iy vy`` and, as STIR 6.4's
    ``apply_tof_kernel`` takes it, ``z = q vz + oz - (N_rings - 1) / 2 * ring_spacing`` (the voxel's physical z
    minus the scanner's axial centre); the LOR's mid-point is at ``m`` of axial position 0.  For STIR's default
    image (``2 N_rings - 1`` planes of half the ring spacing) this is the plane's offset from the scanner centre
    that the ray tracer uses (:func:`axial_tof_offset_mm` is 0)."""
    nz, ny, nx = grid.shape
    vz, vy, vx = grid.voxel_size
    oz, oy, ox = grid.origin
    nt = geometry.num_tangential
    sc = geometry.scanner
    phi = geometry.phi()
    sphi, cphi = np.sin(phi), np.cos(phi)
    s = geometry.s()
    out = {}
    for p in sm.plans:
        indptr = sm.indptr[p.number]
        nrows = indptr.size - 1
        rows = np.repeat(np.arange(nrows, dtype=np.int64), np.diff(indptr))
        v, t = rows // nt, rows % nt
        c = sm.cols[p.number].astype(np.int64)
        yx = c // sm.P
        q = c % sm.P - sm.Z0
        x = ox + (yx % nx) * vx
        y = oy + (yx // nx) * vy
        tant = np.asarray(geometry.tantheta(p.number, s), dtype=np.float64) * np.ones(nt)
        d = x * sphi[v] - y * cphi[v]
        if np.any(tant != 0):
            z = q * vz + oz - (sc.num_rings - 1) / 2.0 * sc.ring_spacing_mm
            m0 = geometry.segment(p.number).m_mm[0]
            tt = tant[t]
            d = (d - (z - m0) * tt) / np.sqrt(1.0 + tt * tt)
        out[p.number] = np.ascontiguousarray(d, dtype=np.float32)
    return out


def axial_tof_offset_mm(geometry: SinogramGeometry, grid: ImageGrid) -> float:
    """How far STIR's TOF kernel's z (voxel z minus the scanner's ring centre) is from the ray tracer's z (the
    image's index centre aligned with the scanner centre, shifted by the origin): ``(nz - 1) / 2 vz - (N_rings -
    1) / 2 ring_spacing``; 0 for STIR's default image."""
    nz, vz = grid.shape[0], grid.voxel_size[0]
    return (nz - 1) / 2.0 * vz - (geometry.scanner.num_rings - 1) / 2.0 * geometry.scanner.ring_spacing_mm


class TOFProjector(Projector):
    """Geometric TOF projector ``A_TOF`` (no factors) matching STIR 6's ``ProjMatrixByBinUsingRayTracing`` on TOF
    data: ``forward(x)`` is ``[n_tof, n_sinograms, n_views_in_subset, n_tang]``.

    Takes the arguments of :class:`Projector` (``Projector(tof_geometry, grid)`` returns one of these).  View
    subsets follow the TOF geometry (STIR disables the rotational symmetries for TOF data, so subset ``s`` of
    ``S`` is the views ``v % S == s``).  ``kernel="auto"`` is the compiled CPU kernel on the CPU and the torch
    kernel on other devices.  For an image that is not STIR's default axially (``nz != 2 N_rings - 1`` planes of
    half the ring spacing) with oblique segments, every segment is traced on its own (``use_mirror=False``):
    STIR's TOF coordinate then depends on the segment's sign (:func:`axial_tof_offset_mm`).
    """

    def __init__(self, geometry: SinogramGeometry, grid: ImageGrid, device=None, dtype: torch.dtype = torch.float32,
                 num_tangential_lors: int = 3, use_mirror: bool = True, cache: bool = True,
                 cpu_threads: int | None = None, max_operand_bytes: int = 256 * 2 ** 20,
                 max_accumulator_bytes: int = 2 * 2 ** 30, kernel: str = "auto",
                 disk_cache: bool | None = None, setup_threads: int | None = None):
        if not getattr(geometry, "is_tof", False):
            raise GeometryMismatchError(f"TOFProjector needs a TOF geometry, got [{geometry.describe()}]")
        from ..utils.device import resolve_device
        if kernel == "auto":
            kernel = "numba" if resolve_device(device).type == "cpu" else "torch"
        oblique = any(abs(sg.average_ring_diff) > 1e-4 for sg in geometry.segments)
        if use_mirror and oblique and abs(axial_tof_offset_mm(geometry, grid)) > 1e-4:
            # STIR's TOF z is not symmetric about the image centre here, so segment -d is not segment +d mirrored
            use_mirror = False
        super().__init__(geometry, grid, device, dtype, num_tangential_lors, use_mirror, cache, cpu_threads,
                         max_operand_bytes, max_accumulator_bytes, kernel, disk_cache, setup_threads)
        self.tof_edges = geometry.tof_bin_edges_mm()
        self.tof_sigma_mm = geometry.tof_sigma_mm
        self.num_tof_bins = geometry.num_tof_bins
        self._d = None

    @property
    def non_tof_shape(self) -> tuple[int, int, int]:
        return self.geometry.sinogram_shape

    def non_tof_projector(self) -> Projector:
        """The non-TOF projector of the same geometry and grid (sharing the traced matrix)."""
        return Projector(self.geometry.non_tof(), self.grid, device=self.device, dtype=self.dtype,
                         num_tangential_lors=self.num_tangential_lors, use_mirror=self.use_mirror,
                         cache=self._use_cache, cpu_threads=self.cpu_threads, disk_cache=self.disk_cache)

    def _tof_d(self) -> dict:
        if self._d is None:
            sm = self._matrix()
            key = self._key if self._use_cache else None
            d = _D_CACHE.get(key) if key is not None else None
            if d is None:
                d = element_tof_coordinates(self.geometry, self.grid, sm)
                if key is not None:
                    _D_CACHE[key] = d
            self._d = d
        return self._d

    def set_up(self) -> float:
        import time
        t0 = time.perf_counter()
        self._matrix()
        self._tof_d()
        if self.kernel == "torch":
            self._tof_structs(None, None, None)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ apply
    def forward(self, x, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``A_TOF x`` for the views of ``subset``: ``[n_tof, n_sino, n_views_in_subset, n_tang]``."""
        views = self._views_for(subset, num_subsets)
        X = self._as_tensor(x, self.grid.shape, "image")
        return self._run(self._forward_torch_tof, self._forward_numba_tof, X, subset, num_subsets, views)

    def adjoint(self, y, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``A_TOF^T y`` for TOF data ``[n_tof, n_sino, n_views_in_subset, n_tang]`` of ``subset``."""
        views = self._views_for(subset, num_subsets)
        Y = self._as_tensor(y, (self.num_tof_bins,) + self._data_shape(views), "TOF projection data")
        return self._run(self._adjoint_torch_tof, self._adjoint_numba_tof, Y, subset, num_subsets, views)

    backward = adjoint

    def forward_non_tof(self, x, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """The non-TOF projection ``A x`` (one TOF bin's shape) with this projector's matrix and view subsets."""
        return Projector.forward(self, x, subset, num_subsets)

    def adjoint_non_tof(self, y, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``A^T y`` of non-TOF data ``y`` (one TOF bin's shape): what STIR back projects for a TOF-independent
        norm (the sensitivity), equal to the TOF back projection of ``y`` repeated in every TOF bin up to the
        kernel's cut-off, without repeating it."""
        return Projector.adjoint(self, y, subset, num_subsets)

    def _kernel_args(self):
        if getattr(self, "_table", None) is None:
            self._table = kernel_table(self.tof_edges, self.tof_sigma_mm)
        return self._table

    # ------------------------------------------------------------------ numba (CPU)
    def _forward_numba_tof(self, X: torch.Tensor, views) -> torch.Tensor:
        from ._tof_kernels import tof_forward_rows
        sm = self._matrix()
        dd = self._tof_d()
        geom = self.geometry
        vsel = np.arange(geom.num_views, dtype=np.int64) if views is None else np.asarray(views, np.int64)
        nt = geom.num_tangential
        src = self._sources(np.ascontiguousarray(X.detach().numpy()), sm)
        ntof = self.num_tof_bins
        out = np.zeros((ntof, geom.num_sinograms, vsel.size * nt), self._np_dtype())
        dummy = np.zeros(1, out.dtype)
        table, c0, U, h, M = self._kernel_args()
        for p in sm.plans:
            keys = self._src_keys(p)
            mirror = p.mirror_shift is not None
            tof_forward_rows(sm.indptr[p.number], sm.cols[p.number], sm.vals[p.number], dd[p.number], table, c0, U,
                             h, M, vsel, nt, src[keys[0]].reshape(-1), src[keys[1]].reshape(-1) if mirror else dummy, 0,
                             p.mirror_shift if mirror else 0, p.num_axial, p.k, out, geom.segment_offset(p.number),
                             geom.segment_offset(-p.number) if mirror else 0, mirror)
        return torch.from_numpy(out.reshape(ntof, geom.num_sinograms, vsel.size, nt))

    def _adjoint_numba_tof(self, Y: torch.Tensor, views) -> torch.Tensor:
        from ._tof_kernels import tof_adjoint_rows
        sm = self._matrix()
        dd = self._tof_d()
        geom = self.geometry
        vsel = np.arange(geom.num_views, dtype=np.int64) if views is None else np.asarray(views, np.int64)
        nt = geom.num_tangential
        ntof = self.num_tof_bins
        Y3 = np.ascontiguousarray(Y.detach().numpy()).reshape(ntof, geom.num_sinograms, vsel.size * nt)
        dt = Y3.dtype
        acc, nthr = self._accumulators(sm, dt)
        dummy = np.zeros((1, 1), dt)
        rows_all = (vsel[:, None] * nt + np.arange(nt)[None, :]).ravel()
        table, c0, U, h, M = self._kernel_args()
        for p in sm.plans:
            keys = self._src_keys(p)
            mirror = p.mirror_shift is not None
            indptr = sm.indptr[p.number]
            bounds = _row_bounds(indptr, rows_all, nthr)
            tof_adjoint_rows(indptr, sm.cols[p.number], sm.vals[p.number], dd[p.number], table, c0, U, h, M, vsel,
                             nt, Y3,
                             geom.segment_offset(p.number), geom.segment_offset(-p.number) if mirror else 0,
                             p.num_axial, p.k, 0, p.mirror_shift if mirror else 0, acc[keys[0]],
                             acc[keys[1]] if mirror else dummy, mirror, bounds)
        return torch.from_numpy(self._gather_accumulators(acc, nthr, sm, dt))

    # ------------------------------------------------------------------ torch (any device)
    def _tof_structs(self, subset, num_subsets, views) -> list:
        """Per planned segment: CSR structure on the device, values, ``d`` and the transpose's permutation."""
        key = ("tof", None if views is None else (int(num_subsets), int(subset)))
        if key in self._dev_ops:
            return self._dev_ops[key]
        sm = self._matrix()
        dd = self._tof_d()
        nt = self.geometry.num_tangential
        out = []
        for p in sm.plans:
            q, yx = sm.plane_range(p.number)
            qmin = int(q.min()) if q.size else 0
            nq = int(q.max()) - qmin + 1 if q.size else 1
            shape = (sm.indptr[p.number].size - 1, nq * sm.nyx)
            idx = sp.csr_matrix((np.arange(1, q.size + 1, dtype=np.float64), (q - qmin) * sm.nyx + yx,
                                 sm.indptr[p.number]), shape=shape)
            if views is not None:
                idx = idx[(np.asarray(views)[:, None] * nt + np.arange(nt)[None, :]).ravel()]
            order = idx.data.astype(np.int64) - 1  # element of each stored entry (row subset)
            idxT = idx.T.tocsr()
            orderT = idxT.data.astype(np.int64) - 1
            dev = self.device

            def t(a, dt=torch.int64):
                return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dt)

            out.append(dict(p=p, qmin=qmin, nq=nq, shape=(idx.shape[0], shape[1]),
                            crow=t(idx.indptr), col=t(idx.indices), crowT=t(idxT.indptr), colT=t(idxT.indices),
                            vals=t(sm.vals[p.number][order], self.dtype),
                            valsT=t(sm.vals[p.number][orderT], self.dtype),
                            d=t(dd[p.number][order], torch.float32), dT=t(dd[p.number][orderT], torch.float32)))
        self._dev_ops[key] = out
        return out

    def _bin_ops(self, structs: list, k: int) -> list:
        e = self.tof_edges[k:k + 1]
        ops = []
        for s in structs:
            w = tof_kernel_weights(s["d"], e, self.tof_sigma_mm)[..., 0].to(self.dtype) * s["vals"]
            wT = tof_kernel_weights(s["dT"], e, self.tof_sigma_mm)[..., 0].to(self.dtype) * s["valsT"]
            A = torch.sparse_csr_tensor(s["crow"], s["col"], w, size=s["shape"], check_invariants=False)
            AT = torch.sparse_csr_tensor(s["crowT"], s["colT"], wT, size=(s["shape"][1], s["shape"][0]),
                                         check_invariants=False)
            p = s["p"]
            ops.append(_TorchSeg(p.number, s["qmin"], s["nq"], p.k, p.num_axial, p.zw, p.mirror_shift, A, AT))
        return ops

    def _forward_torch_tof(self, X, subset, num_subsets, views) -> torch.Tensor:
        structs = self._tof_structs(subset, num_subsets, views)
        return torch.stack([self._forward_torch(X, subset, num_subsets, views, ops=self._bin_ops(structs, k))
                            for k in range(self.num_tof_bins)])

    def _adjoint_torch_tof(self, Y, subset, num_subsets, views) -> torch.Tensor:
        structs = self._tof_structs(subset, num_subsets, views)
        acc = None
        for k in range(self.num_tof_bins):
            b = self._adjoint_torch(Y[k], subset, num_subsets, views, ops=self._bin_ops(structs, k))
            acc = b if acc is None else acc + b
        return acc

    # ------------------------------------------------------------------ checks
    def adjointness_test(self, num_trials: int = 3, seed: int = 0, subset=None, num_subsets=None) -> float:
        g = torch.Generator(device="cpu").manual_seed(seed)
        worst = 0.0
        views = self._views_for(subset, num_subsets)
        nvs = self.geometry.num_views if views is None else len(views)
        geom = self.geometry
        for _ in range(num_trials):
            x = torch.rand(self.grid.shape, generator=g, dtype=torch.float64).to(self.dtype)
            y = torch.rand((self.num_tof_bins, geom.num_sinograms, nvs, geom.num_tangential), generator=g,
                           dtype=torch.float64).to(self.dtype)
            lhs = float(torch.sum(self.forward(x, subset, num_subsets).double() * y.to(self.device).double()))
            rhs = float(torch.sum(x.to(self.device).double() * self.adjoint(y, subset, num_subsets).double()))
            worst = max(worst, abs(lhs - rhs) / max(abs(lhs), 1e-30))
        return worst
