"""Matched forward / back projector reproducing STIR's ``ProjMatrixByBinUsingRayTracing``.

The matrix is traced by :mod:`sirf_ddip.physics.raytrace` (STIR's conventions are documented there): per
segment (``+d``/``-d`` pairs share one through z mirroring) one sparse matrix over rows ``(view, tang)`` for axial
position 0, whose elements index a plane-padded, transposed image ``Xt[yx, p]``; axial position ``a`` reads the
same elements shifted by ``a k`` planes.

Two kernels apply it, with the same numbers (``kernel="auto"`` picks numba on CPU for full-size geometries):

- ``"numba"`` (CPU): compiled row loops (``y[a] += w * Xt.flat[c + a k]`` for every element of a row), parallel
  over rows; the back projection scatters rows into one accumulator per thread.  Nothing is unfolded, so a view
  subset costs its share of the matrix: ``1/S`` of a full projection plus transposing the image (a few ms).
- ``"torch"`` (any torch device, e.g. CUDA): per segment a torch CSR matrix times the image "unfolded" over
  axial positions (``D[(q, yx), a] = x[q + a k, yx]``), chunked to bound memory; the adjoint uses the stored
  transpose.  The default on non-CPU devices.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import GeometryMismatchError
from ..geometry.image import ImageGrid
from ..geometry.sinogram import SinogramGeometry
from ..utils.device import resolve_device
from .operator import LinearOperator
from .raytrace import SystemMatrix, build_system_matrix, check_grid

__all__ = ["Projector"]

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")

_CACHE: dict = {}  # traced matrices shared by the projectors of one process
_CACHE_LOCK = threading.Lock()
KERNELS = ("auto", "numba", "torch")
#: ``kernel="auto"`` uses numba on CPU from this many axial positions per segment on average (below it MKL's
#: sparse x dense product on the small unfolded image is faster: mmr_3d6, 3.3 per segment, 0.08 s vs 0.6 s;
#: the full span-11 template, 76 per segment, is where the numba kernel wins, above all for subsets)
AUTO_NUMBA_MIN_AXIAL = 16


def _geom_key(geom: SinogramGeometry, grid: ImageGrid, num_lors: int) -> tuple:
    sc = geom.scanner
    return (sc.num_rings, sc.detectors_per_ring, round(sc.effective_radius_mm, 5), round(sc.ring_spacing_mm, 6),
            round(sc.view_offset_deg, 6), geom.num_views, geom.num_tangential,
            tuple((s.min_ring_diff, s.max_ring_diff, s.num_axial) for s in geom.segments),
            grid.shape, tuple(round(v, 6) for v in grid.voxel_size), tuple(round(o, 5) for o in grid.origin),
            num_lors)


@dataclass
class _TorchSeg:
    """One planned segment for the torch kernel: device CSR ``A`` (rows ``(v, t)``, cols ``(q - qmin, yx)``) and
    its transpose."""

    number: int
    qmin: int
    nq: int
    k: int
    num_axial: int
    zw: np.ndarray
    mirror_shift: int | None
    A: torch.Tensor
    AT: torch.Tensor



def _row_bounds(indptr: np.ndarray, rows: np.ndarray, nthr: int) -> np.ndarray:
    """``nthr + 1`` boundaries splitting ``rows`` into chunks of about equal numbers of matrix elements."""
    cum = np.concatenate([[0], np.cumsum(indptr[rows + 1] - indptr[rows])])
    bounds = np.searchsorted(cum, np.linspace(0, cum[-1], nthr + 1)).astype(np.int64)
    bounds[0], bounds[-1] = 0, rows.size
    return bounds

class Projector(LinearOperator):
    """Geometric PET projector ``A`` (no factors) matching STIR's ray-tracing matrix.

    Parameters
    ----------
    geometry : SinogramGeometry
    grid : ImageGrid
    device : str or torch.device, optional
        Resolved with :func:`sirf_ddip.utils.device.resolve_device` (CUDA when available).
    dtype : torch.dtype
        float32 (default) or float64.
    num_tangential_lors : int
        STIR's "number of rays in tangential direction to trace for each bin" (3 in the reference data).
    use_mirror : bool
        Reuse segment ``+d`` for ``-d`` (exact up to rounding ties); False builds every segment.
    cache : bool
        Share matrices between projectors of the same geometry/grid in this process.
    cpu_threads : int or None
        On CPU, threads used by a projection.  None (default): torch's current thread count (set it with
        ``torch.set_num_threads`` or the CLI's flag); the torch kernel then leaves torch's setting alone, and with a
        number it sets it for the projection and restores it afterwards.
    max_operand_bytes : int
        Torch kernel: memory bound for the unfolded image operand of one sparse product (larger segments are
        processed in chunks of axial positions).
    max_accumulator_bytes : int
        Numba kernel: memory bound for the back projection's per-thread accumulators (one padded image per
        thread and destination; fewer threads back-project when it is exceeded).
    kernel : {"auto", "numba", "torch"}
        ``auto``: numba on CPU for geometries with at least :data:`AUTO_NUMBA_MIN_AXIAL` axial positions per
        segment on average (full clinical templates), torch otherwise and on other devices.
    disk_cache : bool or None
        Keep the traced matrix in the on-disk cache (:func:`sirf_ddip.physics.raytrace.matrix_cache_dir`,
        env ``SIRF_DDIP_CACHE``); None: only for large matrices.
    setup_threads : int or None
        Views traced in parallel during set-up (default: all cores).

    Notes
    -----
    For a TOF geometry (``geometry.is_tof``) the constructor returns a :class:`sirf_ddip.physics.tof.TOFProjector`.
    ``forward(x)`` maps ``x[z, y, x]`` to ``y[sinogram, view, tang]`` (STIR/SIRF memory order); ``adjoint`` is its
    exact transpose.  Arrays may be numpy or torch; the output is a torch tensor on ``device`` (use
    :meth:`forward_numpy` / :meth:`adjoint_numpy` for numpy in/out).
    """

    def __new__(cls, geometry=None, *args, **kwargs):
        """``Projector(tof_geometry, ...)`` is a :class:`sirf_ddip.physics.tof.TOFProjector`."""
        if cls is Projector and getattr(geometry, "is_tof", False):
            from .tof import TOFProjector
            return super().__new__(TOFProjector)
        return super().__new__(cls)

    def __init__(self, geometry: SinogramGeometry, grid: ImageGrid, device=None, dtype: torch.dtype = torch.float32,
                 num_tangential_lors: int = 3, use_mirror: bool = True, cache: bool = True,
                 cpu_threads: int | None = None, max_operand_bytes: int = 256 * 2 ** 20,
                 max_accumulator_bytes: int = 2 * 2 ** 30, kernel: str = "auto",
                 disk_cache: bool | None = None, setup_threads: int | None = None):
        self.geometry = geometry
        self.grid = grid
        self.device = resolve_device(device)
        self.dtype = dtype
        self.num_tangential_lors = int(num_tangential_lors)
        if self.num_tangential_lors < 1:
            raise GeometryMismatchError("num_tangential_lors must be >= 1")
        if kernel not in KERNELS:
            raise GeometryMismatchError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "auto":  # numba pays off when rows are reused over many axial positions (full studies)
            per_segment = geometry.num_sinograms / max(1, len(geometry.segments))
            kernel = "numba" if (self.device.type == "cpu" and per_segment >= AUTO_NUMBA_MIN_AXIAL) else "torch"
        if kernel == "numba" and self.device.type != "cpu":
            raise GeometryMismatchError(f"kernel 'numba' runs on the CPU only, not on device {self.device}")
        self.kernel = kernel
        self.use_mirror = bool(use_mirror)
        self.cpu_threads = cpu_threads
        self.max_operand_bytes = int(max_operand_bytes)
        self.max_accumulator_bytes = int(max_accumulator_bytes)
        self.disk_cache = disk_cache
        self.setup_threads = setup_threads
        check_grid(geometry, grid)
        self._key = _geom_key(geometry, grid, self.num_tangential_lors) + (self.use_mirror, str(self.dtype))
        self._sm: SystemMatrix | None = None
        self._dev_ops: dict = {}
        self._bufs: dict = {}
        self._buf_lock = threading.Lock()  # the scratch buffers serve one projection at a time
        self._use_cache = cache
        self.setup_seconds = 0.0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    in_shape = image_shape  # LinearOperator
    out_shape = data_shape  # LinearOperator

    # ------------------------------------------------------------------ building
    def _np_dtype(self):
        return np.float64 if self.dtype == torch.float64 else np.float32

    def _matrix(self) -> SystemMatrix:
        """The traced matrix (from this projector, the process cache, the disk cache, or traced now)."""
        if self._sm is not None:
            return self._sm
        with _CACHE_LOCK:
            hit = _CACHE.get(self._key) if self._use_cache else None
        if hit is None:
            hit = build_system_matrix(self.geometry, self.grid, self.num_tangential_lors, self.use_mirror,
                                      self._np_dtype(), threads=self.setup_threads, disk_cache=self.disk_cache)
            if self._use_cache:
                with _CACHE_LOCK:
                    _CACHE[self._key] = hit
        self.setup_seconds = hit.setup_seconds
        self._sm = hit
        return hit

    def _views_for(self, subset, num_subsets) -> np.ndarray | None:
        if subset is None and num_subsets is None:
            return None
        if subset is None or num_subsets is None:
            raise GeometryMismatchError("give both subset and num_subsets (or neither)")
        if int(num_subsets) == 1:
            return None
        return self.geometry.subset_views(int(num_subsets), int(subset), grid=self.grid)

    def set_up(self) -> float:
        """Trace (or fetch from the process / disk cache) the matrices; returns the time in seconds."""
        import time
        t0 = time.perf_counter()
        if self.kernel == "torch":
            self._torch_ops()
        else:
            self._matrix()
        return time.perf_counter() - t0

    def nnz(self) -> int:
        """Stored matrix elements (axial position 0 of each planned segment)."""
        return self._matrix().nnz

    # ------------------------------------------------------------------ apply
    def _as_tensor(self, a, shape, what) -> torch.Tensor:
        t = torch.as_tensor(a)
        if tuple(t.shape) != tuple(shape):
            raise GeometryMismatchError(f"{what} shape {tuple(t.shape)} does not match expected {tuple(shape)}")
        return t.to(device=self.device, dtype=self.dtype)

    def _data_shape(self, views) -> tuple[int, int, int]:
        """``(n_sino, n_views_in_subset, n_tang)`` of one (non-TOF) projection of the views ``views``."""
        geom = self.geometry
        return (geom.num_sinograms, geom.num_views if views is None else len(views), geom.num_tangential)

    def _run(self, torch_fn, numba_fn, T: torch.Tensor, subset, num_subsets, views) -> torch.Tensor:
        """Apply ``torch_fn(T, subset, num_subsets, views)`` or ``numba_fn(T, views)``, as :attr:`kernel` says."""
        with _threads(self.device, self.cpu_threads, self.kernel):
            if self.kernel == "torch":
                return torch_fn(T, subset, num_subsets, views)
            with self._buf_lock:
                return numba_fn(T, views)

    def forward(self, x, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``A x`` for the views of ``subset`` (all views if None): ``[n_sino, n_views_in_subset, n_tang]``."""
        views = self._views_for(subset, num_subsets)
        X = self._as_tensor(x, self.grid.shape, "image")
        return self._run(self._forward_torch, self._forward_numba, X, subset, num_subsets, views)

    def adjoint(self, y, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``A^T y`` (back projection) for data of the views of ``subset``; returns ``[z, y, x]``."""
        views = self._views_for(subset, num_subsets)
        Y = self._as_tensor(y, self._data_shape(views), "projection data")
        return self._run(self._adjoint_torch, self._adjoint_numba, Y, subset, num_subsets, views)

    backward = adjoint

    def forward_numpy(self, x, subset=None, num_subsets=None) -> np.ndarray:
        return self.forward(x, subset, num_subsets).cpu().numpy()

    def adjoint_numpy(self, y, subset=None, num_subsets=None) -> np.ndarray:
        return self.adjoint(y, subset, num_subsets).cpu().numpy()

    # ------------------------------------------------------------------ numba kernel (CPU)
    @staticmethod
    def _src_keys(p) -> tuple:
        """Source (and back-projection destination) keys of a plan: ``(flipped, zw)``."""
        zw = tuple(float(v) for v in p.zw)
        return ((False, zw), (True, zw)) if p.mirror_shift is not None else ((False, zw),)

    def _buffer(self, name, shape: tuple, dtype) -> np.ndarray:
        """A scratch array kept between calls (re-allocating ~100 MB per call costs page faults)."""
        b = self._bufs.get(name)
        if b is None or b.shape != shape or b.dtype != dtype:
            b = np.zeros(shape, dtype)
            self._bufs[name] = b
        return b

    def _sources(self, X: np.ndarray, sm: SystemMatrix) -> dict:
        """Plane-padded transposed images ``Xt[yx, p + Z0]`` per key ``(flipped, zw)``: the (z-flipped) image
        filtered by the axial kernel, ``F[p] = sum_j zw[j] x[p + j]``."""
        nz = self.grid.shape[0]
        Xf = X.reshape(nz, sm.nyx)
        out: dict = {}
        for p in sm.plans:
            for key in self._src_keys(p):
                if key in out:
                    continue
                flipped, zw = key
                base = self._buffer(("src", flipped), (sm.nyx, sm.P), X.dtype)  # padding stays zero
                base[:, sm.Z0:sm.Z0 + nz] = (Xf[::-1] if flipped else Xf).T
                if zw != (1.0,):
                    F = self._buffer(("src", key), (sm.nyx, sm.P), X.dtype)
                    F.fill(0)
                    Ft, bt = torch.from_numpy(F), torch.from_numpy(base)
                    for j, w in enumerate(zw):  # F[:, i] = sum_j zw[j] base[:, i + j]
                        if w != 0:
                            Ft[:, :sm.P - j].add_(bt[:, j:], alpha=w)
                    base = F
                out[key] = base
        return out

    def _forward_numba(self, X: torch.Tensor, views: np.ndarray | None) -> torch.Tensor:
        from ._kernels import forward_rows
        sm = self._matrix()
        geom = self.geometry
        vsel = np.arange(geom.num_views, dtype=np.int64) if views is None else np.asarray(views, np.int64)
        nt = geom.num_tangential
        src = self._sources(np.ascontiguousarray(X.detach().numpy()), sm)
        out = np.zeros((geom.num_sinograms, vsel.size * nt), self._np_dtype())
        dummy = np.zeros(1, out.dtype)
        for p in sm.plans:
            keys = self._src_keys(p)
            mirror = p.mirror_shift is not None
            forward_rows(sm.indptr[p.number], sm.cols[p.number], sm.vals[p.number], vsel, nt,
                         src[keys[0]].reshape(-1), src[keys[1]].reshape(-1) if mirror else dummy, 0,
                         p.mirror_shift if mirror else 0, p.num_axial, p.k, out, geom.segment_offset(p.number),
                         geom.segment_offset(-p.number) if mirror else 0, mirror)
        return torch.from_numpy(out.reshape(geom.num_sinograms, vsel.size, nt))

    def _adjoint_numba(self, Y: torch.Tensor, views: np.ndarray | None) -> torch.Tensor:
        from ._kernels import adjoint_rows
        sm = self._matrix()
        geom = self.geometry
        vsel = np.arange(geom.num_views, dtype=np.int64) if views is None else np.asarray(views, np.int64)
        nt = geom.num_tangential
        Y2 = np.ascontiguousarray(Y.detach().numpy()).reshape(geom.num_sinograms, vsel.size * nt)
        dt = Y2.dtype
        acc, nthr = self._accumulators(sm, dt)
        dummy = np.zeros((1, 1), dt)
        rows_all = (vsel[:, None] * nt + np.arange(nt)[None, :]).ravel()
        for p in sm.plans:
            keys = self._src_keys(p)
            mirror = p.mirror_shift is not None
            indptr = sm.indptr[p.number]
            bounds = _row_bounds(indptr, rows_all, nthr)
            adjoint_rows(indptr, sm.cols[p.number], sm.vals[p.number], vsel, nt, Y2, geom.segment_offset(p.number),
                         geom.segment_offset(-p.number) if mirror else 0, p.num_axial, p.k, 0,
                         p.mirror_shift if mirror else 0, acc[keys[0]], acc[keys[1]] if mirror else dummy, mirror,
                         bounds)
        return torch.from_numpy(self._gather_accumulators(acc, nthr, sm, dt))

    def _accumulators(self, sm: SystemMatrix, dt) -> tuple[dict, int]:
        """Zeroed plane-padded accumulators, one per destination and thread, as many threads as the memory bound
        allows: ``({destination key: array [n_threads, nyx * P]}, n_threads)``."""
        from ._kernels import num_threads
        dests = sorted({k for p in sm.plans for k in self._src_keys(p)})
        per = sm.nyx * sm.P * np.dtype(dt).itemsize * len(dests)
        nthr = max(1, min(num_threads(), int(self.max_accumulator_bytes // max(1, per))))
        acc = {}
        for d in dests:
            acc[d] = self._buffer(("acc", d), (nthr, sm.nyx * sm.P), dt)
            acc[d].fill(0)
        return acc, nthr

    def _gather_accumulators(self, acc: dict, nthr: int, sm: SystemMatrix, dt) -> np.ndarray:
        """The image ``[z, y, x]`` from the per-thread plane-padded accumulators of :meth:`_accumulators`."""
        nz, ny, nx = self.grid.shape
        img = np.zeros((nz, sm.nyx), dt)
        Z0 = sm.Z0
        for (flipped, zw), a in acc.items():
            for i in range(1, nthr):
                np.add(a[0], a[i], out=a[0])
            g = a[0].reshape(sm.nyx, sm.P)
            tgt = img[::-1] if flipped else img  # a view: the flipped image's planes in reverse
            if zw == (1.0,):
                tgt += g[:, Z0:Z0 + nz].T
                continue
            for j, w in enumerate(zw):  # adjoint of F[i] = sum_j zw[j] x[i + j]: x[z] += zw[j] G[z - j]
                if w == 0:
                    continue
                lo = max(0, j - Z0)  # planes z with a stored G[z - j]
                tgt[lo:] += w * g[:, Z0 + lo - j:Z0 + nz - j].T
        return img.reshape(nz, ny, nx)

    # ------------------------------------------------------------------ torch kernel (any device)
    def _torch_ops(self, subset=None, num_subsets=None, views=None) -> list[_TorchSeg]:
        key = None if views is None else (int(num_subsets), int(subset))
        if key in self._dev_ops:
            return self._dev_ops[key]
        sm = self._matrix()
        nt = self.geometry.num_tangential
        ops = []
        for p in sm.plans:
            q, yx = sm.plane_range(p.number)
            qmin = int(q.min()) if q.size else 0
            nq = int(q.max()) - qmin + 1 if q.size else 1
            m = sp.csr_matrix((sm.vals[p.number], (q - qmin) * sm.nyx + yx, sm.indptr[p.number]),
                              shape=(sm.indptr[p.number].size - 1, nq * sm.nyx))
            if views is not None:
                m = m[(np.asarray(views)[:, None] * nt + np.arange(nt)[None, :]).ravel()]
            ops.append(_TorchSeg(p.number, qmin, nq, p.k, p.num_axial, p.zw, p.mirror_shift,
                                 _to_torch_csr(m, self.device, self.dtype),
                                 _to_torch_csr(m.T.tocsr(), self.device, self.dtype)))
        self._dev_ops[key] = ops
        return ops

    def _a_chunk(self, sm: _TorchSeg) -> int:
        """Axial positions per chunk so that the unfolded operand stays under ``max_operand_bytes``."""
        ny, nx = self.grid.shape[1:]
        per = sm.nq * ny * nx * torch.finfo(self.dtype).bits // 8 * (2 if sm.mirror_shift is not None else 1)
        return max(1, min(sm.num_axial, int(self.max_operand_bytes // max(per, 1))))

    def _forward_torch(self, X, subset, num_subsets, views, ops=None) -> torch.Tensor:
        """``ops``: the segments' sparse operators (default :meth:`_torch_ops`; the TOF projector passes one TOF bin's)."""
        ops = self._torch_ops(subset, num_subsets, views) if ops is None else ops
        nz, ny, nx = self.grid.shape
        Xf = X.reshape(nz, ny * nx)
        Xflip = torch.flip(Xf, dims=(0,))
        geom = self.geometry
        nvs = geom.num_views if views is None else len(views)
        nt = geom.num_tangential
        out = torch.zeros((geom.num_sinograms, nvs, nt), device=self.device, dtype=self.dtype)
        for sm in ops:
            J = len(sm.zw) - 1
            na = sm.num_axial
            Xt = _zfilter(Xf, sm.zw)
            Xtf = _zfilter(Xflip, sm.zw) if sm.mirror_shift is not None else None
            pos0 = geom.segment_offset(sm.number)
            neg0 = geom.segment_offset(-sm.number) if sm.mirror_shift is not None else None
            step = self._a_chunk(sm)
            for a0 in range(0, na, step):
                a1 = min(na, a0 + step)
                nc = a1 - a0
                cols = [_unfold(Xt, sm.qmin + J + a0 * sm.k, sm.nq, sm.k, nc)]
                if Xtf is not None:
                    cols.append(_unfold(Xtf, sm.qmin + sm.mirror_shift + J + a0 * sm.k, sm.nq, sm.k, nc))
                D = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
                Y = torch.sparse.mm(sm.A, D)  # (nvs*nt, nc or 2 nc)
                out[pos0 + a0:pos0 + a1] = Y[:, :nc].T.reshape(nc, nvs, nt)
                if Xtf is not None:  # mirrored segment: axial positions reversed
                    out[neg0 + na - a1:neg0 + na - a0] = Y[:, nc:].T.reshape(nc, nvs, nt).flip(0)
        return out

    def _adjoint_torch(self, Y, subset, num_subsets, views, ops=None) -> torch.Tensor:
        """``ops``: the segments' sparse operators (default :meth:`_torch_ops`; the TOF projector passes one TOF bin's)."""
        ops = self._torch_ops(subset, num_subsets, views) if ops is None else ops
        geom = self.geometry
        nvs = geom.num_views if views is None else len(views)
        nt = geom.num_tangential
        nz, ny, nx = self.grid.shape
        nyx = ny * nx
        acc = torch.zeros((nz, nyx), device=self.device, dtype=self.dtype)
        accf = torch.zeros((nz, nyx), device=self.device, dtype=self.dtype)
        for sm in ops:
            na = sm.num_axial
            J = len(sm.zw) - 1
            mirror = sm.mirror_shift is not None
            pos0 = geom.segment_offset(sm.number)
            neg0 = geom.segment_offset(-sm.number) if mirror else None
            acc_t = torch.zeros((nz + J, nyx), device=self.device, dtype=self.dtype)
            accf_t = torch.zeros((nz + J, nyx), device=self.device, dtype=self.dtype) if mirror else None
            step = self._a_chunk(sm)
            for a0 in range(0, na, step):
                a1 = min(na, a0 + step)
                nc = a1 - a0
                cols = [Y[pos0 + a0:pos0 + a1].reshape(nc, nvs * nt).T]
                if mirror:
                    cols.append(Y[neg0 + na - a1:neg0 + na - a0].flip(0).reshape(nc, nvs * nt).T)
                Ycat = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0].contiguous()
                G = torch.sparse.mm(sm.AT, Ycat)  # (nq*nyx, nc or 2 nc)
                _fold_add(acc_t, G[:, :nc], sm.qmin + J + a0 * sm.k, sm.nq, sm.k, nc)
                if mirror:
                    _fold_add(accf_t, G[:, nc:], sm.qmin + sm.mirror_shift + J + a0 * sm.k, sm.nq, sm.k, nc)
            _zfilter_adjoint_add(acc, acc_t, sm.zw)
            if mirror:
                _zfilter_adjoint_add(accf, accf_t, sm.zw)
        acc += torch.flip(accf, dims=(0,))
        return acc.reshape(nz, ny, nx)

    # ------------------------------------------------------------------ checks / norms
    def adjointness_test(self, num_trials: int = 3, seed: int = 0, subset=None, num_subsets=None) -> float:
        """Max over trials of ``|<Ax, y> - <x, A^T y>| / max(|<Ax, y>|, tiny)`` for random non-negative x, y."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        worst = 0.0
        views = self._views_for(subset, num_subsets)
        nvs = self.geometry.num_views if views is None else len(views)
        for _ in range(num_trials):
            x = torch.rand(self.grid.shape, generator=g, dtype=torch.float64).to(self.dtype)
            y = torch.rand((self.geometry.num_sinograms, nvs, self.geometry.num_tangential), generator=g,
                           dtype=torch.float64).to(self.dtype)
            ax = self.forward(x, subset, num_subsets)
            aty = self.adjoint(y, subset, num_subsets)
            lhs = float(torch.sum(ax.double() * y.to(ax.device).double()))
            rhs = float(torch.sum(x.to(aty.device).double() * aty.double()))
            worst = max(worst, abs(lhs - rhs) / max(abs(lhs), 1e-30))
        return worst

    def norm(self, num_iter: int = 10, seed: int = 0) -> float:
        """Operator 2-norm ``||A||`` by power iteration on ``A^T A``."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.rand(self.grid.shape, generator=g, dtype=torch.float64).to(device=self.device, dtype=self.dtype)
        x /= torch.linalg.vector_norm(x)
        lam = 0.0
        for _ in range(max(1, int(num_iter))):
            z = self.adjoint(self.forward(x))
            lam = float(torch.linalg.vector_norm(z))
            if lam == 0:
                return 0.0
            x = z / lam
        return math.sqrt(lam)


class _threads:
    """Temporarily set the CPU thread count of a projection (no-op on other devices).

    The numba kernel uses ``n`` threads (default: torch's current count); the torch kernel changes torch's count
    only when ``n`` is given, and restores it afterwards."""

    def __init__(self, device: torch.device, n: int | None, kernel: str):
        self.cpu = device.type == "cpu"
        self.kernel = kernel
        self.n = n
        self.old = None
        self.old_nb = None

    def __enter__(self):
        if not self.cpu:
            return self
        if self.kernel == "numba":
            from ._kernels import set_threads
            self.old_nb = set_threads(self.n if self.n is not None else torch.get_num_threads())
        elif self.n is not None:
            self.old = torch.get_num_threads()
            if self.old != self.n:
                torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.old is not None and self.old != self.n:
            torch.set_num_threads(self.old)
        if self.old_nb is not None:
            from ._kernels import set_threads
            set_threads(self.old_nb)
        return False


def _to_torch_csr(m: sp.csr_matrix, device, dtype) -> torch.Tensor:
    idx_dtype = np.int32 if max(m.nnz, m.shape[1]) < 2 ** 31 - 1 else np.int64
    crow = torch.from_numpy(np.ascontiguousarray(m.indptr.astype(idx_dtype)))
    col = torch.from_numpy(np.ascontiguousarray(m.indices.astype(idx_dtype)))
    val = torch.from_numpy(np.ascontiguousarray(m.data)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR is beta" / invariant-check notices
        return torch.sparse_csr_tensor(crow, col, val, size=m.shape, check_invariants=False).to(device)


def _unfold(Xf: torch.Tensor, qmin: int, nq: int, k: int, na: int) -> torch.Tensor:
    """``D[(q, yx), a] = X[qmin + q + a k, yx]`` (zero outside the image) as a dense (nq*nyx, na) tensor."""
    nz, nyx = Xf.shape
    lo = qmin
    hi = qmin + nq - 1 + (na - 1) * k
    pl = max(0, -lo)
    pu = max(0, hi - (nz - 1))
    if pl or pu:
        Xp = torch.zeros((nz + pl + pu, nyx), device=Xf.device, dtype=Xf.dtype)
        Xp[pl:pl + nz] = Xf
    else:
        Xp = Xf.contiguous()
    view = Xp.as_strided((nq, nyx, na), (nyx, 1, k * nyx), (lo + pl) * nyx)
    return view.reshape(nq * nyx, na)


def _zfilter(Xf: torch.Tensor, zw: np.ndarray) -> torch.Tensor:
    """``Xt[i] = sum_j zw[j] X[i - J + j]`` for ``i = 0 .. nz + J - 1`` (plane ``i - J``), zero outside."""
    J = len(zw) - 1
    if J == 0 and zw[0] == 1.0:
        return Xf
    nz, nyx = Xf.shape
    Xp = torch.zeros((nz + 2 * J, nyx), device=Xf.device, dtype=Xf.dtype)
    Xp[J:J + nz] = Xf
    out = torch.zeros((nz + J, nyx), device=Xf.device, dtype=Xf.dtype)
    for j, w in enumerate(zw):
        if w != 0:
            out.add_(Xp[j:j + nz + J], alpha=float(w))
    return out


def _zfilter_adjoint_add(acc: torch.Tensor, acc_t: torch.Tensor, zw: np.ndarray) -> None:
    """Adjoint of :func:`_zfilter`: ``acc[p] += sum_j zw[j] acc_t[p - j + J]``."""
    J = len(zw) - 1
    nz = acc.shape[0]
    for j, w in enumerate(zw):
        if w != 0:
            acc.add_(acc_t[J - j:J - j + nz], alpha=float(w))


def _fold_add(acc: torch.Tensor, G: torch.Tensor, qmin: int, nq: int, k: int, na: int) -> None:
    """Adjoint of :func:`_unfold`: ``acc[qmin + q + a k] += G[(q, yx), a]`` (dropping planes outside)."""
    nz, nyx = acc.shape
    G3 = G.reshape(nq, nyx, na).permute(2, 0, 1).contiguous()  # (na, nq, nyx): contiguous slabs
    for a in range(na):
        lo = qmin + a * k
        q0 = max(0, -lo)
        q1 = min(nq, nz - lo)
        if q1 > q0:
            acc[lo + q0:lo + q1] += G3[a, q0:q1]
