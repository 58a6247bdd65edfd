"""A small numpy **stand-in** for the part of ``sirf.STIR`` that sirf_ddip uses — behaving as SIRF does.

This is *not* SIRF and its projector is not STIR's; it exists so that the SIRF adapter and the SIRF-style
reconstructor surface can be tested in CI where SIRF cannot be installed (SIRF is distributed through conda-forge
and Docker only). The rule: wherever SIRF 3.10 / STIR 6.4 define a behaviour the adapter or a script can see, the
stand-in does the same, with the source file and line in a comment, so that a test passing here means the same for
real SIRF. ``tests/test_sirf_real.py`` runs the same test bodies against ``sirf.STIR`` where it is installed.

Sources (read through the project's search/fetch tools): ``SyneRBI/SIRF`` tag v3.10.0 — ``src/xSTIR/pSTIR/STIR.py``
("STIR.py"), ``src/common/SIRF.py`` ("SIRF.py"), ``src/xSTIR/cSTIR/cstir.cpp``, ``cstir_p.cpp``, ``stir_x.cpp``,
``include/sirf/STIR/stir_x.h``, ``include/sirf/STIR/stir_data_containers.h``; ``UCL/STIR`` tag rel_6.4.0 —
``src/recon_buildblock/IterativeReconstruction.cxx``, ``src/iterative/OSMAPOSL/OSMAPOSLReconstruction.cxx``,
``src/buildblock/recon_array_functions.cxx``, ``src/include/stir/numerics/divide.inl``,
``src/recon_buildblock/find_basic_vs_nums_in_subset.cxx``, ``ForwardProjectorByBin.cxx``,
``DataSymmetriesForBins_PET_CartesianGrid.{cxx,inl}``, ``GeneralisedObjectiveFunction.cxx``,
``src/buildblock/num_threads.cxx``.

Faithful to SIRF/STIR
---------------------
- layouts ``ImageData (nz, ny, nx)``, ``AcquisitionData (n_tof, n_sinograms, n_views, n_tang)``; ``clone``,
  ``fill`` (returns ``self``), ``as_array`` (copy), ``asarray`` (a view when ``supports_array_view``, else a copy,
  SIRF.py:93-106); ``supports_array_view`` is True for images and in-memory acquisition data (STIR ≥ 6.2,
  stir_data_containers.h:1001-1004 and 1255-1262) and False for file-backed acquisition data;
- ``AcquisitionData(file)`` is read-only under the ``'file'`` scheme; ``AcquisitionData(other)`` is a template with
  uninitialised values (NaN here); ``get_subset`` needs ``'memory'``;
- acquisition model ``y = S (G x + a) + b``; ``set_up`` keeps the templates themselves as ``acq_templ`` /
  ``img_templ`` (STIR.py:1623-1624), ``range_geometry``/``domain_geometry`` alias them (stir_x.cpp:497-498,
  cstir_p.cpp:570-573) and are null handles before ``set_up``; a subset ``forward`` leaves ``S a + b`` in the other
  views (stir_x.cpp:520-566); ``forward/backward(..., out=)`` return None; ``direct``/``adjoint`` raise if affine;
- subsets: views ``v ≡ s (mod S)`` that are basic for the ray-tracing matrix's symmetries, each with its related
  views (find_basic_vs_nums_in_subset.cxx:45-53; 90°/180° symmetries as in DataSymmetriesForBins_PET_CartesianGrid);
- objective: ``set_acquisition_model`` copies the model's terms then (``a + b/S`` as additive term,
  stir_x.cpp:611-649); ``set_up`` sets up its own projector, not the model's templates; the EM ratio uses STIR's
  ``divide_and_truncate`` and ``value`` STIR's ``accumulate_loglikelihood`` per viewgram
  (recon_array_functions.cxx:172-260, 336-377); ``value = data term − penalty`` and ``gradient`` subtracts the
  prior's gradient (``/ S`` per subset, GeneralisedObjectiveFunction.cxx:128-157, 240-251);
- ``OSMAPOSLReconstructor`` (no prior): STIR's loop and numbering (module docstring of the class below).
- TOF (SIRF 3.10 on STIR 6.4): ``AcquisitionData(scanner, ..., tof_mash_factor=1)`` calls STIR's
  ``set_tof_mash_factor`` (cstir.cpp:956-967), so the default of 1 gives TOF data on a TOF-ready scanner
  (``max_num_timing_poss / f`` bins; ``f > max`` and an even count are errors; ``f <= 0`` or a non-TOF scanner: non-TOF,
  ProjDataInfo.cxx:174-259 of rel_6.4.0); ``dimensions()`` is ``(n_tof, non-TOF sinograms, views, tang)``
  (STIR.py:1109-1122, cstir.cpp:980-988), TOF bins by ``timing_pos_num`` ascending (the ``TOF_LOOP`` of
  stir_data_containers.cpp:38); ``get_tof_mash_factor()`` is STIR's (0 for non-TOF data; STIR.py:1124-1126,
  cstir_p.cpp:104-105); a non-TOF normalisation of TOF data multiplies every TOF bin, TOF factors must match the
  data's TOF bins (BinNormalisationFromProjData.cxx:88-121, rel_6.4.0); the sensitivity of a non-TOF normalisation is
  the non-TOF back projection (STIR 6.2 release notes), here equal to the TOF one summed over bins.
- ``set_max_omp_threads`` / ``get_max_omp_threads`` / ``set_default_num_omp_threads`` /
  ``get_default_num_omp_threads``: STIR's thread setting as SIRF shows it (the stand-in itself uses one thread).

Not STIR
--------
The projector ``G`` is a pixel-driven 2-D parallel-beam matrix (scipy.sparse) per direct plane (one sinogram per
image plane, segment 0 only) restricted to the inscribed cylinder; its TOF version weights each element by a Gaussian
integrated over the TOF bin at the pixel's position along the LOR (outer bins open-ended, so the weights sum to 1 and
the TOF projection summed over bins is the non-TOF one); files are ``.npz`` archives written under the
exact name given (``.hv``, ``.hs``), not Interfile; listmode files are a stand-in format (see
:func:`standin_write_listmode`) and ``estimate_randoms`` is a delayeds average, not STIR's singles fit; scanners are
stand-in presets (:data:`SCANNERS`). OSMAPOSL with a prior is not implemented.
"""

from __future__ import annotations

import copy as _copy
import math
import os
import types
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

FLT_MAX = float(np.finfo(np.float32).max)
#: STIR's SMALL_NUM (recon_array_functions.cxx) and OSMAPOSL's small_num (OSMAPOSLReconstruction.cxx:270, 378)
SMALL_NUM = 1e-6
#: STIR's max_quotient (recon_array_functions.cxx:235, 357)
MAX_QUOTIENT = 10000.0

#: stand-in of ``sirf.config`` (build-time feature flags)
config = types.SimpleNamespace(SIRF_HAS_Parallelproj=False, SIRF_HAS_NiftyPET=False, STIR_WITH_CUDA=False)


class error(Exception):
    """Stand-in of ``sirf.Utilities.error`` (what SIRF raises)."""


def set_verbosity(v):
    """``sirf.STIR.set_verbosity`` (no-op here)."""


class MessageRedirector:
    """``sirf.STIR.MessageRedirector`` (no-op here)."""

    def __init__(self, info=None, warn="stdout", errr="stderr"):
        pass


# ------------------------------------------------------------------------------------------- OpenMP threads
# sirf.STIR.set_max_omp_threads / get_max_omp_threads / set_default_num_omp_threads / get_default_num_omp_threads
# (STIR.py:111-130 at v3.10.0) call cSTIR_setOMPThreads ... (cstir.cpp:114-137), i.e. STIR's set_num_threads,
# get_max_num_threads, set_default_num_threads, get_default_num_threads (num_threads.cxx:33-91 at rel_6.4.0).
# The stand-in computes in one thread whatever the setting (numpy/scipy); it keeps the setting so that a script
# sees what SIRF shows it.
_omp = {"max_threads": None, "already_set_once": False}


def _omp_num_procs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def get_default_num_omp_threads() -> int:
    """``max(floor(0.9 * processors), 2)`` (1 on one processor), or ``$OMP_NUM_THREADS`` when it is set
    (num_threads.cxx:70-83)."""
    n = 1 if _omp_num_procs() == 1 else max(math.floor(_omp_num_procs() * 0.9), 2)
    env = os.environ.get("OMP_NUM_THREADS")
    if env is not None:
        try:
            n = int(env.strip().split(",")[0])  # C atoi of the leading number
        except ValueError:
            n = 0
    return n


def set_max_omp_threads(threads) -> None:
    """STIR's ``set_num_threads`` (num_threads.cxx:43-67): 0 means the default the first time only, a positive
    number is ``omp_set_num_threads`` (a non-positive one is taken as 1, as libgomp does)."""
    n = int(threads)
    if n == 0:
        if not _omp["already_set_once"]:
            _omp["max_threads"] = max(get_default_num_omp_threads(), 1)
    else:
        _omp["max_threads"] = max(n, 1)
    _omp["already_set_once"] = True


def get_max_omp_threads() -> int:
    """``omp_get_max_threads()`` (num_threads.cxx:33-40): before any setting, OpenMP's own default
    (``$OMP_NUM_THREADS``, else the number of processors)."""
    if _omp["max_threads"] is not None:
        return _omp["max_threads"]
    env = os.environ.get("OMP_NUM_THREADS", "")
    try:
        return max(int(env.split(",")[0]), 1)
    except ValueError:
        return _omp_num_procs()


def set_default_num_omp_threads() -> None:
    """``set_num_threads(get_default_num_threads())`` (num_threads.cxx:87-91)."""
    set_max_omp_threads(get_default_num_omp_threads())


def get_STIR_version_string():
    return "stand-in (follows STIR 6.4)"


@dataclass(frozen=True)
class ProjInfo:
    """Geometry of stand-in projection data (one direct sinogram per ring, non-TOF)."""

    scanner: str
    n_rings: int
    n_views: int
    n_tang: int
    bin_size_mm: float
    ring_spacing_mm: float
    n_tof: int = 1
    modality: str = "PT"
    #: STIR's "Maximum number of (unmashed) TOF time bins" (0: not TOF-ready), unmashed bin width along the LOR
    #: and the timing kernel's sigma along the LOR (stand-in scanner parameters)
    max_num_timing_poss: int = 0
    tof_bin_mm: float = 0.0
    tof_sigma_mm: float = 0.0
    tof_mash_factor: int = 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n_tof, self.n_rings, self.n_views, self.n_tang)


#: stand-in scanners usable as ``AcquisitionData(name)``
SCANNERS: dict[str, ProjInfo] = {
    "StandIn Tiny": ProjInfo("StandIn Tiny", n_rings=2, n_views=12, n_tang=17, bin_size_mm=4.0,
                             ring_spacing_mm=4.0),
    "StandIn Small": ProjInfo("StandIn Small", n_rings=1, n_views=28, n_tang=33, bin_size_mm=3.0,
                              ring_spacing_mm=4.0),
    # a TOF-ready stand-in scanner: 9 unmashed TOF bins of 12 mm along the LOR, sigma 15 mm
    "StandIn Small TOF": ProjInfo("StandIn Small TOF", n_rings=1, n_views=28, n_tang=33, bin_size_mm=3.0,
                                  ring_spacing_mm=4.0, max_num_timing_poss=9, tof_bin_mm=12.0, tof_sigma_mm=15.0),
}


def _with_tof_mash_factor(info: ProjInfo, f: int) -> ProjInfo:
    """STIR 6.4 ``ProjDataInfo::set_tof_mash_factor`` (ProjDataInfo.cxx:174-259, rel_6.4.0)."""
    f = int(f)
    if info.max_num_timing_poss > 0 and f > 0:
        if f > info.max_num_timing_poss:
            raise error(f"ProjDataInfo::set_tof_mash_factor: TOF mashing factor ({f}) must be smaller than or equal "
                        f"to the scanner's number of max timing bins ({info.max_num_timing_poss}).")
        n = info.max_num_timing_poss // f
        if n % 2 == 0:
            raise error("ProjDataInfo: Number of TOF bins should be an odd number. Abort.")
        return replace(info, n_tof=n, tof_mash_factor=f)
    return replace(info, n_tof=1, tof_mash_factor=0)


def scanner_names() -> str:
    return "\n".join(SCANNERS)


def _related_views(v: int, n: int) -> list[int]:
    """Views related to basic view ``v`` by the ray-tracing matrix's view symmetries.

    ``DataSymmetriesForBins_PET_CartesianGrid`` uses the 90° symmetry when ``n % 4 == 0`` (and square pixels,
    no transaxial shift: true for the stand-in's centred images) and the 180° one when ``n % 2 == 0``
    (DataSymmetriesForBins_PET_CartesianGrid.cxx:250-310); basic views are ``0..n/4`` resp. ``0..n/2``
    (DataSymmetriesForBins_PET_CartesianGrid.inl:149-174, 824-838), related ones ``v, n/2 − v, n/2 + v, n − v``.
    """
    if n % 4 == 0:
        cand = [v, n // 2 - v, n // 2 + v, n - v]
    elif n % 2 == 0:
        cand = [v, n - v]
    else:
        cand = [v]
    return sorted({c for c in cand if 0 <= c < n})


def _basic_views(n: int) -> range:
    if n % 4 == 0:
        return range(0, n // 4 + 1)
    if n % 2 == 0:
        return range(0, n // 2 + 1)
    return range(n)


def subset_views(n_views: int, subset_num: int, num_subsets: int, symmetries: bool = True) -> np.ndarray:
    """Views of subset ``subset_num`` of ``num_subsets`` as STIR forms them.

    STIR loops ``view = subset_num, subset_num + S, …``, keeps the basic ones and processes each with its related
    views (find_basic_vs_nums_in_subset.cxx:45-53, used by the forward projector, ForwardProjectorByBin.cxx:193,
    and the objective, distributable.cxx:394). ``symmetries=False`` (parallelproj's trivial symmetries): plain
    ``v ≡ s (mod S)``.
    """
    if num_subsets < 1 or not 0 <= subset_num < num_subsets:
        raise error(f"subset {subset_num} out of range for {num_subsets} subsets")
    if num_subsets == 1:
        return np.arange(n_views)
    if not symmetries:
        return np.arange(subset_num, n_views, num_subsets)
    vs: set[int] = set()
    for v in _basic_views(n_views):
        if v % num_subsets == subset_num:
            vs.update(_related_views(v, n_views))
    return np.asarray(sorted(vs), dtype=np.int64)


def subsets_are_balanced(n_views: int, num_subsets: int) -> bool:
    """STIR's OSMAPOSL refuses unbalanced subsets (OSMAPOSLReconstruction.cxx:281-289)."""
    sizes = {len(subset_views(n_views, s, num_subsets)) for s in range(num_subsets)}
    return len(sizes) == 1


def _viewgram_small_values(y: np.ndarray) -> np.ndarray:
    """Per viewgram (one segment, one view: here all sinograms at one view) ``max(max(y) · SMALL_NUM, 0)``."""
    mx = y.max(axis=(1, 3), keepdims=True) if y.size else y
    return np.maximum(mx * SMALL_NUM, 0.0)


def _divide_and_truncate(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """STIR's ``divide_and_truncate`` (recon_array_functions.cxx:185-257): per viewgram ``small`` threshold;
    ``num ≤ small`` → 0 (includes 0/0 and num < 0); otherwise ``min(num/den, 10000)`` (via ``num > 10000·den``,
    which also covers den ≤ 0)."""
    small = _viewgram_small_values(num)
    out = np.zeros_like(num)
    pos = num > small
    big = pos & (num > MAX_QUOTIENT * den)
    ok = pos & ~big
    out[big] = MAX_QUOTIENT
    out[ok] = num[ok] / den[ok]
    return out


def _accumulate_loglikelihood(y: np.ndarray, yhat: np.ndarray) -> float:
    """STIR's ``accumulate_loglikelihood`` (recon_array_functions.cxx:356-372): ``ŷ' = max(ŷ, y/10000)``;
    ``y log ŷ' − ŷ'``, or ``−ŷ'`` where ``y ≤ small`` (per viewgram), in double precision."""
    small = _viewgram_small_values(y)
    new = np.maximum(yhat, y / MAX_QUOTIENT)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(y <= small, -new, y * np.log(np.where(y <= small, 1.0, new)) - new)
    return float(term.sum())


class _NullHandle:
    """What SIRF returns for a C++ null pointer (e.g. ``range_geometry()`` of a model that was never set up):
    any use raises (SIRF: ``check_status`` on a null handle)."""

    def __init__(self, what):
        self._what = what

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise error(f"{self._what}: null handle (the object was never set up)")


# ---------------------------------------------------------------------------------------------------- containers
def _save(filename: str, arr: np.ndarray, meta: dict) -> None:
    """Write the stand-in's file format under exactly ``filename`` (SIRF writes Interfile under the name given)."""
    with open(filename, "wb") as f:
        np.savez(f, arr=arr, meta=np.array(repr(meta), dtype=object))


def _load(filename: str):
    try:
        with np.load(filename, allow_pickle=True) as f:
            return np.ascontiguousarray(f["arr"], dtype=np.float32), eval(str(f["meta"]))  # noqa: S307 - own format
    except (OSError, ValueError, KeyError) as exc:
        raise error(f"cannot read {filename!r}: {exc}") from None


class DataContainer:
    """Common container behaviour (``sirf.SIRF.DataContainer``)."""

    _arr: np.ndarray
    _readonly = False

    def _new(self, arr: np.ndarray):
        out = _copy.copy(self)
        out._arr = np.ascontiguousarray(arr, dtype=np.float32)
        out._readonly = False
        return out

    # --- copies / values
    def clone(self):
        return self._new(self._arr.copy())

    def copy(self):
        return self.clone()

    def get_uniform_copy(self, value=1.0):
        return self._new(np.full(self._arr.shape, value, dtype=np.float32))

    def allocate(self, value=0, **kwargs):
        return self.get_uniform_copy(value)

    def fill(self, value):
        if self._readonly:
            raise error(f"{type(self).__name__}: cannot fill read-only (file-backed) data; clone() it first")
        if isinstance(value, DataContainer):
            value = value._arr
        if isinstance(value, np.ndarray):
            if value.shape != self._arr.shape:
                raise error(f"fill: array shape {value.shape} != {self._arr.shape}")
            self._arr[...] = value.astype(np.float32)
        elif isinstance(value, (int, float, np.floating, np.integer)):
            self._arr[...] = float(value)
        else:
            raise error("wrong fill value. Should be numpy.ndarray, DataContainer, float or int")
        return self

    def as_array(self) -> np.ndarray:
        return self._arr.copy()

    @property
    def supports_array_view(self) -> bool:
        return True

    def asarray(self, xp=np, copy=None):
        """A view when ``supports_array_view``, else a copy (``copy=False`` then raises), SIRF.py:93-106."""
        if not self.supports_array_view:
            if copy is False:
                raise error("views not supported, please consider using `asarray()` or `as_array()`")
            return self._arr.copy()
        if copy:
            return self._arr.copy()
        arr = self._arr.view()
        if self._readonly:
            arr.flags.writeable = False
        return arr

    @property
    def shape(self):
        return self._arr.shape

    @property
    def size(self):
        return self._arr.size

    @property
    def dtype(self):
        return self._arr.dtype

    def dimensions(self):
        return self._arr.shape

    # --- reductions
    def norm(self):
        return float(np.linalg.norm(self._arr.ravel().astype(np.float64)))

    def dot(self, other):
        return float(np.dot(self._arr.ravel().astype(np.float64), other._arr.ravel().astype(np.float64)))

    def sum(self):
        return float(self._arr.sum(dtype=np.float64))

    def max(self):
        return float(self._arr.max())

    def min(self):
        return float(self._arr.min())

    # --- arithmetic (element-wise, as in SIRF >= 3)
    def _other(self, other):
        if isinstance(other, DataContainer):
            if other._arr.shape != self._arr.shape:
                raise error(f"shape mismatch {other._arr.shape} vs {self._arr.shape}")
            return other._arr
        return other

    def __add__(self, other):
        return self._new(self._arr + self._other(other))

    __radd__ = __add__

    def __sub__(self, other):
        return self._new(self._arr - self._other(other))

    def __rsub__(self, other):
        return self._new(self._other(other) - self._arr)

    def __mul__(self, other):
        return self._new(self._arr * self._other(other))

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._new(self._arr / self._other(other))

    def __neg__(self):
        return self._new(-self._arr)

    def maximum(self, other, out=None):
        r = np.maximum(self._arr, self._other(other))
        if out is None:
            return self._new(r)
        out.fill(r)

    def write(self, filename):
        _save(filename, self._arr, self._meta())

    def _meta(self):  # pragma: no cover - overridden
        return {}


class ImageData(DataContainer):
    """Stand-in of ``sirf.STIR.ImageData`` ``(nz, ny, nx)`` with voxel sizes ``(vz, vy, vx)`` in mm."""

    def __init__(self, arg=None):
        self._modality = "PT"
        self._vsize = (1.0, 1.0, 1.0)
        self._origin = (0.0, 0.0, 0.0)
        self._arr = np.zeros((0, 0, 0), np.float32)
        if isinstance(arg, str):
            self._arr, meta = _load(arg)
            self._vsize, self._origin, self._modality = meta["vsize"], meta["origin"], meta["modality"]
        elif isinstance(arg, AcquisitionData):
            info = arg._info
            self.initialise((info.n_rings, info.n_tang, info.n_tang),
                            (info.ring_spacing_mm / 2, info.bin_size_mm, info.bin_size_mm))
        elif arg is not None:
            raise error("wrong argument " + repr(arg) + " for ImageData constructor")

    def _meta(self):
        return {"vsize": tuple(self._vsize), "origin": tuple(self._origin), "modality": self._modality}

    def initialise(self, dim, vsize=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
        self._arr = np.zeros(tuple(int(d) for d in dim), np.float32)
        self._vsize = tuple(float(v) for v in vsize)
        self._origin = tuple(float(o) for o in origin)
        return self

    def voxel_sizes(self):
        return self._vsize

    @property
    def spacing(self):
        return self._vsize

    def transf_matrix(self):
        """4×4 index → mm matrix (STIR.py:506-510; here axis-aligned, the origin as first-voxel offset)."""
        tm = np.eye(4, dtype=np.float32)
        for i in range(3):
            tm[i, i] = self._vsize[i]
            tm[i, 3] = self._origin[i]
        return tm

    @property
    def modality(self):
        return self._modality

    def set_modality(self, mod):
        self._modality = str(mod)

    def get_info(self):
        nz, ny, nx = self._arr.shape
        return (f"Modality: {self._modality}\nDimensions: {nx} {ny} {nz}\n"
                f"Voxel sizes: {self._vsize[2]} {self._vsize[1]} {self._vsize[0]}\n")


class AcquisitionData(DataContainer):
    """Stand-in of ``sirf.STIR.AcquisitionData`` ``(n_tof, n_sinograms, n_views, n_tang)``."""

    _storage_scheme = "file"

    def __init__(self, src=None, span=1, max_ring_diff=-1, view_mash_factor=1, tof_mash_factor=1):
        self._info: ProjInfo | None = None
        self._arr = np.zeros((0, 0, 0, 0), np.float32)
        self._in_file = False
        if src is None:
            return
        if isinstance(src, str) and "." in src:
            self._arr, meta = _load(src)
            self._info = ProjInfo(**meta)
            # file scheme: STIRAcquisitionDataInFile, read-only (cstir.cpp:399-404)
            self._in_file = AcquisitionData._storage_scheme == "file"
            self._readonly = self._in_file
        elif isinstance(src, str):
            if src not in SCANNERS:
                raise error(f"unknown scanner {src!r} (stand-in scanners: {list(SCANNERS)})")
            if span != 1 or view_mash_factor != 1:
                raise error("stand-in scanners support span 1, no view mashing only")
            self._info = _with_tof_mash_factor(SCANNERS[src], tof_mash_factor)  # cstir.cpp:965
            self._arr = np.zeros(self._info.shape, np.float32)
        elif isinstance(src, AcquisitionData):
            self._info = src._info
            # SIRF: same geometry, new storage, values NOT initialised (fill before use)
            self._arr = np.full(src._arr.shape, np.nan, np.float32)
        else:
            raise error("wrong source in AcquisitionData constructor")

    def _new(self, arr):
        out = super()._new(arr)
        out._in_file = False  # clones and results live in memory
        return out

    @property
    def supports_array_view(self) -> bool:
        """In-memory data: True (STIR ≥ 6.2, stir_data_containers.h:1001-1004); file-backed: False."""
        return not self._in_file

    def _meta(self):
        return {k: getattr(self._info, k) for k in ProjInfo.__dataclass_fields__}

    @staticmethod
    def set_storage_scheme(scheme):
        if scheme not in ("file", "memory"):
            raise error(f"unknown storage scheme {scheme!r}")
        AcquisitionData._storage_scheme = scheme

    @staticmethod
    def get_storage_scheme():
        return AcquisitionData._storage_scheme

    @property
    def modality(self):
        return self._info.modality if self._info else "Unknown"

    def get_info(self):
        i = self._info
        return (f"Modality: {i.modality}\nScanner type := {i.scanner}\n"
                f"number of views {i.n_views}, tangential positions {i.n_tang}, sinograms {i.n_rings}\n")

    def get_tof_mash_factor(self):
        """STIR's TOF mashing factor: 0 for non-TOF data (STIR.py:1124-1126, cstir_p.cpp:104-105)."""
        return self._info.tof_mash_factor

    def create_uniform_image(self, value=0, xy=None):
        img = ImageData(self)
        if xy is not None:
            nx, ny = (xy, xy) if isinstance(xy, int) else xy
            img.initialise((self._info.n_rings, ny, nx), img.voxel_sizes())
        img.fill(float(value))
        return img

    def get_subset(self, views):
        if AcquisitionData._storage_scheme != "memory":
            raise error("get_subset requires the 'memory' storage scheme (SyneRBI/SIRF#1217)")
        views = np.asarray(views, int)
        out = AcquisitionData()
        out._info = replace(self._info, n_views=len(views))
        out._arr = np.ascontiguousarray(self._arr[:, :, views, :])
        return out


# ---------------------------------------------------------------------------------------------------- listmode
def standin_write_listmode(filename: str, template: "AcquisitionData", bins: np.ndarray, times_ms: np.ndarray,
                           prompt: np.ndarray) -> None:
    """Test helper (not SIRF): write a stand-in listmode file of events ``bins`` (flat indices into the template's
    data), ``times_ms`` and ``prompt`` flags (True = prompt, False = delayed)."""
    meta = {"template": template._meta(), "duration_ms": float(np.max(times_ms, initial=0.0))}
    with open(filename, "wb") as f:
        np.savez(f, bins=np.asarray(bins, np.int64), times=np.asarray(times_ms, np.float64),
                 prompt=np.asarray(prompt, bool), meta=np.array(repr(meta), dtype=object))


class ListmodeData:
    """``sirf.STIR.ListmodeData(filename)`` (stand-in format, :func:`standin_write_listmode`)."""

    def __init__(self, filename=None):
        self._ev = None
        if filename is not None:
            self.read_from_file(filename)

    def read_from_file(self, filename):
        try:
            with np.load(filename, allow_pickle=True) as f:
                self._ev = {k: f[k] for k in ("bins", "times", "prompt")}
                self._meta = eval(str(f["meta"]))  # noqa: S307 - own format
        except (OSError, ValueError, KeyError) as exc:
            raise error(f"cannot read listmode {filename!r}: {exc}") from None

    def acquisition_data_template(self):
        out = AcquisitionData()
        out._info = ProjInfo(**self._meta["template"])
        out._arr = np.zeros(out._info.shape, np.float32)
        return out


class ListmodeToSinograms:
    """``sirf.STIR.ListmodeToSinograms``: bin prompts (``store_prompts`` on by default) in a time interval."""

    def __init__(self, file=None):
        self._lm = None
        self._template = None
        self._interval = None
        self._flags = {"store_prompts": True, "store_delayeds": False}
        self._prefix = None
        self._out = None
        self._setup = False

    def set_input(self, lm):
        self._lm = lm if isinstance(lm, ListmodeData) else ListmodeData(str(lm))

    def set_output_prefix(self, prefix):
        self._prefix = str(prefix)

    def set_template(self, templ):
        self._template = templ if isinstance(templ, AcquisitionData) else AcquisitionData(str(templ))

    def set_time_interval(self, start, stop):
        self._interval = (float(start), float(stop))

    def flag_on(self, flag):
        self._flags[flag] = True

    def flag_off(self, flag):
        self._flags[flag] = False

    def set_up(self):
        if self._lm is None or self._template is None:
            raise error("ListmodeToSinograms: set_input and set_template before set_up")
        self._setup = True

    def _histogram(self, prompts: bool) -> np.ndarray:
        ev = self._lm._ev
        keep = ev["prompt"] == prompts
        if self._interval is not None:
            t0, t1 = self._interval
            keep &= (ev["times"] >= 1000 * t0) & (ev["times"] < 1000 * t1)
        shape = self._template._info.shape
        h = np.bincount(ev["bins"][keep], minlength=int(np.prod(shape)))
        if h.size != int(np.prod(shape)):
            raise error("listmode events do not fit the template (different geometry)")
        return h.reshape(shape).astype(np.float32)

    def process(self):
        if not self._setup:
            raise error("ListmodeToSinograms: set_up() call missing")
        if tuple(ProjInfo(**self._lm._meta["template"]).shape) != tuple(self._template._info.shape):
            raise error("ListmodeToSinograms: the template does not describe the listmode's scanner geometry")
        self._out = self._template._new(self._histogram(prompts=bool(self._flags["store_prompts"])))
        self._out._info = self._template._info

    def get_output(self):
        if self._out is None:
            raise error("ListmodeToSinograms: process() call missing")
        return self._out

    def estimate_randoms(self):
        """Stand-in (not STIR's ML singles fit): the delayeds' mean per sinogram, spread over its bins."""
        d = self._histogram(prompts=False)
        mean = d.mean(axis=(2, 3), keepdims=True)
        out = self._template._new(np.broadcast_to(mean, d.shape).copy())
        out._info = self._template._info
        return out


# ---------------------------------------------------------------------------------------------------- sensitivity
class AcquisitionSensitivityModel:
    """``S``: bin efficiencies (an AcquisitionData of multiplicative factors) or the product of two models."""

    def __init__(self, src, other_src=None):
        if isinstance(src, AcquisitionData):
            self._factors = src.as_array()
        elif isinstance(src, AcquisitionSensitivityModel) and isinstance(other_src, AcquisitionSensitivityModel):
            self._factors = src._factors * other_src._factors
        elif isinstance(src, ImageData):
            raise error("stand-in: attenuation-image sensitivity models are not implemented")
        else:
            raise error("wrong source for AcquisitionSensitivityModel")
        self._setup = False

    def set_up(self, acq):
        shape = tuple(acq.shape)
        # a non-TOF norm of TOF data multiplies every TOF bin (BinNormalisationFromProjData.cxx:89-93, rel_6.4.0)
        if self._factors.shape[0] == 1 and self._factors.shape[1:] == shape[1:]:
            self._setup = True
            return
        if shape != self._factors.shape:
            raise error(f"BinNormalisationFromProjData: incompatible projection data: data shape {acq.shape} != "
                        f"factors {self._factors.shape}")
        self._setup = True

    def forward(self, ad):
        return ad._new(ad._arr * self._factors)

    def invert(self, ad):
        with np.errstate(divide="ignore", invalid="ignore"):
            return ad._new(np.where(self._factors != 0, ad._arr / self._factors, 0))

    def unnormalise(self, ad):
        ad.fill(ad._arr * self._factors)

    def normalise(self, ad):
        ad.fill(self.invert(ad)._arr)


# ---------------------------------------------------------------------------------------------------- projector
class RayTracingMatrix:
    def __init__(self):
        self._n_lors = 1
        self._restrict = True

    def set_num_tangential_LORs(self, n):
        self._n_lors = int(n)
        return self

    def get_num_tangential_LORs(self):
        return self._n_lors

    def set_restrict_to_cylindrical_FOV(self, flag):
        self._restrict = bool(flag)


def _system_matrix(info: ProjInfo, image: ImageData, n_lors: int, restrict: bool) -> sp.csr_matrix:
    """Pixel-driven parallel-beam matrix ``(n_views·n_tang, ny·nx)`` for one plane (stand-in physics)."""
    nz, ny, nx = image.shape
    _, vy, vx = image.voxel_sizes()
    xs = (np.arange(nx) - (nx - 1) / 2) * vx
    ys = (np.arange(ny) - (ny - 1) / 2) * vy
    X, Y = np.meshgrid(xs, ys)  # (ny, nx)
    X, Y = X.ravel(), Y.ravel()
    keep = np.ones(X.size, bool)
    if restrict:
        r = min(nx * vx, ny * vy) / 2
        keep = X ** 2 + Y ** 2 <= r ** 2
    d = info.bin_size_mm
    rows, cols, vals, along = [], [], [], []
    vox = np.nonzero(keep)[0]
    for v in range(info.n_views):
        phi = np.pi * v / info.n_views
        s = X[vox] * np.cos(phi) + Y[vox] * np.sin(phi)
        t_lor = -X[vox] * np.sin(phi) + Y[vox] * np.cos(phi)  # position along the LOR (for TOF)
        for lor in range(n_lors):
            off = ((lor + 0.5) / n_lors - 0.5) * d
            u = (s - off) / d + (info.n_tang - 1) / 2  # fractional bin index
            t0 = np.floor(u).astype(int)
            w1 = u - t0
            for t, w in ((t0, 1 - w1), (t0 + 1, w1)):
                ok = (t >= 0) & (t < info.n_tang) & (w > 0)
                rows.append(v * info.n_tang + t[ok])
                cols.append(vox[ok])
                vals.append(w[ok] * vx / n_lors)
                along.append(t_lor[ok])
    shape = (info.n_views * info.n_tang, ny * nx)
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    if info.n_tof <= 1:
        return sp.coo_matrix((vals, (rows, cols)), shape=shape).tocsr()
    # TOF: one matrix per TOF bin (timing_pos_num ascending), the element weighted by the Gaussian timing kernel
    # integrated over the bin (outer bins open-ended: the weights sum to 1)
    from math import erf

    along = np.concatenate(along)
    w = info.tof_bin_mm * info.tof_mash_factor
    half = info.n_tof // 2
    cdf = np.vectorize(lambda z: 0.5 * (1.0 + erf(z / math.sqrt(2.0))))
    out = []
    for k in range(-half, half + 1):
        lo = -np.inf if k == -half else (k - 0.5) * w
        hi = np.inf if k == half else (k + 0.5) * w
        wk = cdf((hi - along) / info.tof_sigma_mm) - cdf((lo - along) / info.tof_sigma_mm)
        out.append(sp.coo_matrix((vals * wk, (rows, cols)), shape=shape).tocsr())
    return out


class AcquisitionModel:
    """``y = S (G x + a) + b`` (stand-in of ``sirf.STIR.AcquisitionModel``)."""

    #: the projector's view symmetries (the ray-tracing matrix has them; parallelproj's are trivial)
    _symmetric_views = True

    def __init__(self):
        # STIR.py:1588-1601: the Python side keeps these references
        self.at = None
        self.bt = None
        self.asm = None
        self.acq_templ = None
        self.img_templ = None
        self._G = None
        self._num_subsets = 1
        self._subset_num = 0
        self._linear_only = False

    # --- configuration
    def set_additive_term(self, at):
        self.at = at

    def set_background_term(self, bt):
        self.bt = bt

    def set_acquisition_sensitivity(self, asm):
        if not isinstance(asm, AcquisitionSensitivityModel):
            raise error("set_acquisition_sensitivity needs an AcquisitionSensitivityModel")
        self.asm = asm

    def set_image_data_processor(self, processor):
        raise error("stand-in: image data processors are not implemented")

    def _build_matrix(self, info, img_templ):  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_templates(self, acq_templ, img_templ):
        if not isinstance(acq_templ, AcquisitionData) or not isinstance(img_templ, ImageData):
            raise error("AcquisitionModel.set_up(acq_templ: AcquisitionData, img_templ: ImageData)")
        if img_templ.shape[0] != acq_templ._info.n_rings:
            raise error(f"image has {img_templ.shape[0]} planes, the scanner {acq_templ._info.n_rings} rings")

    def set_up(self, acq_templ, img_templ):
        self._check_templates(acq_templ, img_templ)
        for name, term in (("additive", self.at), ("background", self.bt)):
            if term is not None and term.shape != acq_templ.shape:
                raise error(f"{name} term shape {term.shape} != acquisition data {acq_templ.shape}")
        if self.asm is not None:
            self.asm.set_up(acq_templ)
        self._G = self._build_matrix(acq_templ._info, img_templ)
        # the templates themselves, not copies (STIR.py:1623-1624; C++ keeps the same shared pointers,
        # stir_x.cpp:497-498)
        self.acq_templ = acq_templ
        self.img_templ = img_templ

    def get_additive_term(self):
        self._check_ready()
        return self.at if self.at is not None else self.acq_templ.get_uniform_copy(0.0)

    def get_background_term(self):
        self._check_ready()
        return self.bt if self.bt is not None else self.acq_templ.get_uniform_copy(0.0)

    def get_constant_term(self):
        a = self.get_additive_term()
        if self.asm is not None:
            a = self.asm.forward(a)
        return a + self.get_background_term()

    def is_affine(self):
        return True

    def is_linear(self):
        return all(t is None or t.norm() == 0 for t in (self.at, self.bt))

    def get_linear_acquisition_model(self):
        lin = _copy.copy(self)
        lin._linear_only = True
        return lin

    def range_geometry(self):
        """The set-up data template itself (cstir_p.cpp:570-571); a null handle before ``set_up``."""
        return self.acq_templ if self.acq_templ is not None else _NullHandle("AcquisitionData (range geometry)")

    def domain_geometry(self):
        """The set-up image template itself (cstir_p.cpp:572-573); a null handle before ``set_up``."""
        return self.img_templ if self.img_templ is not None else _NullHandle("ImageData (domain geometry)")

    @property
    def num_subsets(self):
        return self._num_subsets

    @num_subsets.setter
    def num_subsets(self, n):
        self._num_subsets = int(n)
        self._subset_num = 0

    @property
    def subset_num(self):
        return self._subset_num

    @subset_num.setter
    def subset_num(self, s):
        self._subset_num = int(s)

    # --- projection
    def _check_ready(self):
        if self._G is None:
            # stir_x.cpp:561-562 "acquisition template not set"
            raise error("Fatal error in PETAcquisitionModel::forward: acquisition template not set")

    def _views(self, subset_num, num_subsets):
        s = self._subset_num if subset_num is None else subset_num
        n = self._num_subsets if num_subsets is None else num_subsets
        return subset_views(self.acq_templ._info.n_views, s, n, self._symmetric_views)

    def forward(self, image, subset_num=None, num_subsets=None, out=None):
        """Full-size data: ``G x`` in the subset's views (0 elsewhere), then ``+ a``, ``× S``, ``+ b`` over **all**
        views, so the other views hold ``S a + b`` (stir_x.cpp:520-566)."""
        self._check_ready()
        if not isinstance(image, ImageData):
            raise error("forward needs an ImageData")
        if image.shape != self.img_templ.shape:
            raise error(f"forward: image shape {image.shape} != set-up template {self.img_templ.shape}")
        res = _project(self._G, image._arr, self.acq_templ._info, self._views(subset_num, num_subsets))
        if not self._linear_only and self.at is not None:
            res += self.at._arr
        if self.asm is not None:
            res *= self.asm._factors
        if not self._linear_only and self.bt is not None:
            res += self.bt._arr
        if out is None:
            return self.acq_templ._new(res)
        out.fill(res)
        return None

    def backward(self, ad, subset_num=None, num_subsets=None, out=None):
        """``Gᵀ S y`` over the subset's views (stir_x.cpp:583-600: unnormalise, then back-project the subset)."""
        self._check_ready()
        if not isinstance(ad, AcquisitionData):
            raise error("backward needs an AcquisitionData")
        info = self.acq_templ._info
        if ad.shape != info.shape:
            raise error(f"backward: data shape {ad.shape} != {info.shape}")
        y = ad._arr.astype(np.float64)
        if self.asm is not None:
            y = y * self.asm._factors
        img = _backproject(self._G, y, info, self.img_templ.shape, self._views(subset_num, num_subsets))
        if out is None:
            return self.img_templ._new(img)
        out.fill(img)
        return None

    def direct(self, image, out=None):
        if not self.is_linear():
            raise error("AcquisitionModel is not linear\nYou can get the linear part of the AcquisitionModel "
                        "with get_linear_acquisition_model")
        return self.forward(image, self._subset_num, self._num_subsets, out)

    def adjoint(self, ad, out=None):
        if not self.is_linear():
            raise error("AcquisitionModel is not linear. You can get the linear part of the AcquisitionModel "
                        "with get_linear_acquisition_model")
        return self.backward(ad, self._subset_num, self._num_subsets, out)


def _per_tof_bin(G) -> list:
    """The projector's matrices, one per TOF bin (one for non-TOF data)."""
    return G if isinstance(G, list) else [G]


def _project(G, x: np.ndarray, info: ProjInfo, views: np.ndarray) -> np.ndarray:
    res = np.zeros(info.shape, np.float64)
    for k, Gk in enumerate(_per_tof_bin(G)):
        for z in range(x.shape[0]):
            res[k, z] = (Gk @ x[z].ravel().astype(np.float64)).reshape(info.n_views, info.n_tang)
    mask = np.zeros(info.n_views, bool)
    mask[views] = True
    res[:, :, ~mask, :] = 0
    return res


def _backproject(G, y: np.ndarray, info: ProjInfo, img_shape, views: np.ndarray) -> np.ndarray:
    ys = np.zeros(info.shape, np.float64)
    ys[:, :, views, :] = y[:, :, views, :]  # non-TOF y (a non-TOF norm of TOF data): every TOF bin
    img = np.zeros(img_shape, np.float64)
    for k, Gk in enumerate(_per_tof_bin(G)):
        for z in range(img_shape[0]):
            img[z] += (Gk.T @ ys[k, z].ravel()).reshape(img_shape[1:])
    return img.astype(np.float32)


class AcquisitionModelUsingMatrix(AcquisitionModel):
    def __init__(self, matrix=None):
        super().__init__()
        self._matrix = matrix if matrix is not None else RayTracingMatrix()

    def set_matrix(self, matrix):
        self._matrix = matrix

    def get_matrix(self):
        return self._matrix

    def _build_matrix(self, info, img_templ):
        return _system_matrix(info, img_templ, self._matrix._n_lors, self._matrix._restrict)


class AcquisitionModelUsingRayTracingMatrix(AcquisitionModelUsingMatrix):
    def set_num_tangential_LORs(self, n):
        return self._matrix.set_num_tangential_LORs(n)

    def get_num_tangential_LORs(self):
        return self._matrix.get_num_tangential_LORs()


# ---------------------------------------------------------------------------------------------------- objective
class QuadraticPrior:
    """``½ β Σ_neighbours (x_j − x_k)²`` along x and y (a stand-in; STIR's weights differ)."""

    def __init__(self):
        self._beta = 0.0

    def set_penalisation_factor(self, b):
        self._beta = float(b)
        return self

    def get_penalisation_factor(self):
        return self._beta

    def set_up(self, image):
        pass

    def value(self, image):
        x = image._arr.astype(np.float64)
        return 0.5 * self._beta * float((np.diff(x, axis=1) ** 2).sum() + (np.diff(x, axis=2) ** 2).sum())

    def get_value(self, image):
        return self.value(image)

    def get_gradient(self, image):
        x = image._arr.astype(np.float64)
        g = np.zeros_like(x)
        for ax in (1, 2):
            d = np.diff(x, axis=ax)
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[ax] = slice(0, -1)
            hi[ax] = slice(1, None)
            g[tuple(lo)] -= d
            g[tuple(hi)] += d
        return image._new(self._beta * g)

    gradient = get_gradient


class PoissonLogLikelihoodWithLinearModelForMeanAndProjData:
    """Stand-in of the SIRF objective ``Σ y log ŷ − ŷ − penalty`` with ``ŷ = S (G x + a) + b``."""

    def __init__(self):
        self._ad = None
        self._am = None
        self._num_subsets = 1
        self._setup_subsets = None
        self._sens = None
        self._G = None
        self._info = None
        self._img_shape = None
        self._prior_cpp = None  # the C++ side's prior (what get_prior() wraps)
        self.set_up_count = 0

    def set_acquisition_data(self, ad):
        """New data: the objective must be set up again (``already_set_up = false``,
        PoissonLogLikelihoodWithLinearModelForMeanAndProjData.cxx:471-475)."""
        if not isinstance(ad, AcquisitionData):
            raise error("set_acquisition_data needs AcquisitionData")
        self._ad = ad
        self._sens = None

    def set_acquisition_model(self, am):
        """Copies the model's projector, terms and normalisation *now* (stir_x.cpp:641-649, 611-639): the additive
        term of the objective is ``a + S⁻¹ b`` when a background is set."""
        if not isinstance(am, AcquisitionModel):
            raise error("set_acquisition_model needs an AcquisitionModel")
        self._am = am
        self._factors = None if am.asm is None else am.asm._factors.copy()
        add = None if am.at is None else am.at._arr.astype(np.float64)
        if am.bt is not None:
            b = am.bt._arr.astype(np.float64)
            if self._factors is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    b = np.where(self._factors != 0, b / self._factors, 0.0)
            add = b if add is None else add + b
        self._add = add

    def set_prior(self, prior):
        self.prior = prior  # STIR.py:2379-2385: the Python attribute, and the C++ side's pointer
        self._prior_cpp = prior

    def get_prior(self):
        """A wrapper of the C++ prior: a null handle when none was set (STIR.py:2387-2391)."""
        return self._prior_cpp if self._prior_cpp is not None else _NullHandle("Prior")

    def _prior(self):
        return self._prior_cpp

    def set_num_subsets(self, n):
        self._num_subsets = int(n)

    def get_num_subsets(self):
        return self._num_subsets

    def set_recompute_sensitivity(self, flag):
        pass

    def set_up(self, image):
        """STIR's set-up: its own projector for this data and image; the SIRF model's templates stay untouched."""
        if not isinstance(image, ImageData):
            raise error("set_up needs ImageData")
        if self._ad is None or self._am is None:
            raise error("objective function: acquisition data and model must be set before set_up")
        self._am._check_templates(self._ad, image)
        self._info = self._ad._info
        self._G = self._am._build_matrix(self._info, image)
        self._img_shape = image.shape
        self._img = image.get_uniform_copy(0.0)
        self._views = [subset_views(self._info.n_views, s, self._num_subsets, self._am._symmetric_views)
                       for s in range(self._num_subsets)]
        m = np.ones(self._info.shape) if self._factors is None else self._factors.astype(np.float64)
        self._sens = [self._img._new(_backproject(self._G, m, self._info, self._img_shape, v)) for v in self._views]
        self._setup_subsets = self._num_subsets
        self.set_up_count += 1

    def _require(self, subset=None):
        if self._sens is None:
            raise error("Need to call set_up() for objective function first")
        if self._setup_subsets != self._num_subsets:
            raise error(f"objective was set up for {self._setup_subsets} subsets but num_subsets is now "
                        f"{self._num_subsets}: call set_up(image) again")
        if subset is not None and subset != -1 and not 0 <= subset < self._num_subsets:
            raise error("compute_sub_gradient subset_num out-of-range error")

    def get_subset_sensitivity(self, subset):
        self._require(subset)
        return self._sens[subset].clone()

    def _mean(self, x: np.ndarray, views) -> np.ndarray:
        """``m (G x + a)`` in the views (STIR's model: normalisation applied to the projection plus additive)."""
        yhat = _project(self._G, x, self._info, views)
        if self._add is not None:
            yhat = yhat + self._add
        if self._factors is not None:
            yhat = yhat * self._factors
        return yhat

    def _ratio(self, image, subset):
        views = self._views[subset]
        y = self._ad._arr.astype(np.float64)
        yhat = self._mean(image._arr, views)
        q = np.zeros_like(y)
        q[:, :, views, :] = _divide_and_truncate(y[:, :, views, :], yhat[:, :, views, :])
        if self._factors is not None:  # back projection of the ratio includes the normalisation: Gᵀ S (y / ŷ)
            q = q * self._factors
        return self._img._new(_backproject(self._G, q, self._info, self._img_shape, views))

    def get_backprojection_of_acquisition_ratio(self, image, subset, out=None):
        self._require(subset)
        res = self._ratio(image, subset)
        if out is None:
            return res
        out.fill(res)
        return out

    def value(self, image):
        """``Σ_viewgrams accumulate_loglikelihood − penalty`` (GeneralisedObjectiveFunction.cxx:248-251)."""
        self._require()
        views = np.arange(self._info.n_views)
        v = _accumulate_loglikelihood(self._ad._arr.astype(np.float64), self._mean(image._arr, views))
        prior = self._prior()
        if prior is not None:
            v -= prior.value(image)
        return v

    def get_value(self, image):
        return self.value(image)

    __call__ = value

    def gradient(self, image, subset=-1, out=None):
        """Sub-gradient ``BP(ratio) − sens − ∇prior / S`` (GeneralisedObjectiveFunction.cxx:128-157); −1: the sum."""
        self._require(subset)
        subsets = range(self._num_subsets) if subset == -1 else [subset]
        g = np.zeros(self._img_shape, np.float64)
        prior = self._prior()
        pg = prior.get_gradient(image)._arr.astype(np.float64) / self._num_subsets if prior is not None else 0.0
        for s in subsets:
            g += self._ratio(image, s)._arr - self._sens[s]._arr - pg
        res = image._new(g)
        if out is None:
            return res
        out.fill(res)
        return out


class PoissonLogLikelihoodWithLinearModelForMeanAndListModeDataWithProjMatrixByBin:
    """Listmode objective (STIR.py:2609-2660): only what identifies it; its quantities are not in the stand-in."""

    def set_acquisition_data(self, ad):
        if not isinstance(ad, ListmodeData):
            raise error("set_acquisition_data needs ListmodeData")
        self._ad = ad

    def set_acquisition_model(self, am):
        self._am = am

    def set_num_subsets(self, n):
        self._num_subsets = int(n)


def make_Poisson_loglikelihood(acq_data=None, likelihood_type=None, acq_model=None):
    if likelihood_type == "LinearModelForMeanAndListModeDataWithProjMatrixByBin":
        obj = PoissonLogLikelihoodWithLinearModelForMeanAndListModeDataWithProjMatrixByBin()
    elif likelihood_type in (None, "LinearModelForMean"):
        obj = PoissonLogLikelihoodWithLinearModelForMeanAndProjData()
    else:
        raise error(f"unknown likelihood type {likelihood_type!r}")
    if acq_data is None:
        raise error("make_Poisson_loglikelihood: acq_data required")
    obj.set_acquisition_data(acq_data)
    if acq_model is not None:
        obj.set_acquisition_model(acq_model)
    return obj


# ---------------------------------------------------------------------------------------------------- OSMAPOSL
def _threshold_min_to_small_positive_value(a: np.ndarray, small_num: float = SMALL_NUM) -> None:
    """STIR's ``threshold_min_to_small_positive_value``, in place."""
    pos = a[a > 0]
    if pos.size:
        np.maximum(a, pos.min() * small_num, out=a)
    else:
        a[...] = small_num


def _stir_divide(num: np.ndarray, den: np.ndarray, small_num: float) -> np.ndarray:
    """STIR ``numerics/divide.inl:26-47``: ``small = max(max(num) · small_num, 0)``; 0 where both ``|num|`` and
    ``|den|`` are ≤ small, else ``num / den``. OSMAPOSL without a prior calls it with ``small_num = 0``
    (OSMAPOSLReconstruction.cxx:402-408), so only 0/0 gives 0."""
    small_value = max(float(num.max()) * small_num, 0.0)
    out = np.empty_like(num)
    zero = (np.abs(den) <= small_value) & (np.abs(num) <= small_value)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[~zero] = num[~zero] / den[~zero]
    out[zero] = 0
    return out


class OSMAPOSLReconstructor:
    """STIR's OSMAPOSL without a prior (= OSEM) behind SIRF's Python surface.

    - ``set_input`` needs the objective first (IterativeReconstruction.cxx:615) and sets its data;
    - ``set_up(image)``: ``num_subiterations ≥ 1`` and ``1 ≤ save_interval ≤ num_subiterations``
      (IterativeReconstruction.cxx:459-475), the reconstructor's subset count into the objective and its
      ``set_up`` (452-489), balanced subsets (OSMAPOSLReconstruction.cxx:281-289), initial positivity **in place
      on ``image``** (291-292), then sub-iteration number 1 (cstir.cpp:1130);
    - sub-iteration ``k`` uses subset ``(k − 1) mod S`` (IterativeReconstruction.cxx:638); update
      ``divide(BP(ratio), sens, 0)`` (OSMAPOSLReconstruction.cxx:391-408), clipped to
      ``[minimum, maximum relative change]`` from ``k = 2`` on (491-507), applied multiplicatively;
    - after each update STIR's ``end_of_iteration_processing`` writes ``<prefix>_<k>.hv`` when
      ``k % save_interval == 0`` or ``k == num_subiterations`` and output is enabled
      (IterativeReconstruction.cxx:568-571, 335-340); ``update``/``update_current_estimate`` then increment
      ``k`` (stir_x.h:1270-1273);
    - ``process()`` / ``reconstruct(image)`` loop ``k = 1 … num_subiterations`` (IterativeReconstruction.cxx:414-419)
      on the held image / on ``image`` in place; ``set_current_estimate`` clones, ``update(image)`` holds ``image``
      itself (STIR.py:2868-2921); ``set_current_subset_num`` only sets the Python ``subset`` read by
      ``get_subset_sensitivity`` (STIR.py:2898-2909).
    """

    def __init__(self, filename=""):
        if filename:
            raise error("stand-in: .par files are not supported")
        self._obj = None
        self._num_subsets = 1
        self._num_subiterations = 1
        self._subiteration_num = 0
        self._save_interval = 1
        self._disable_output = False
        self._prefix = ""
        self._max_rel = FLT_MAX
        self._min_rel = 0.0
        self._set_up_done = False
        self.image = None
        self.subset = 0

    def set_objective_function(self, obj):
        self._obj = obj

    def get_objective_function(self):
        return self._obj

    def set_num_subsets(self, n):
        self._num_subsets = int(n)

    def get_num_subsets(self):
        return self._num_subsets

    def set_num_subiterations(self, n):
        self._num_subiterations = int(n)

    def get_num_subiterations(self):
        return self._num_subiterations

    def get_subiteration_num(self):
        return self._subiteration_num

    def set_maximum_relative_change(self, v):
        self._max_rel = float(v)

    def set_minimum_relative_change(self, v):
        self._min_rel = float(v)

    def set_output_filename_prefix(self, prefix):
        self._prefix = str(prefix)

    def disable_output(self):
        self._disable_output = True

    def enable_output(self):
        self._disable_output = False

    def set_save_interval(self, n):
        if n > 0:
            self.enable_output()
        else:
            self.disable_output()
        self._save_interval = int(n)

    def set_current_subset_num(self, subset):
        self.subset = subset

    def get_subset_sensitivity(self):
        return self.get_objective_function().get_subset_sensitivity(self.subset)

    def set_input(self, acq):
        if self._obj is None:
            raise error("objective function needs to be set before calling set_input_data")
        self._set_up_done = False  # IterativeReconstruction.cxx:611-616: _already_set_up = false
        self._obj.set_acquisition_data(acq)

    def set_up(self, image):
        if self._obj is None:
            raise error("You have to specify an objective function")
        if self._num_subiterations < 1:
            raise error("Range error in number of subiterations (has to be >= 1)")
        if self._save_interval < 1 or self._save_interval > self._num_subiterations:
            raise error("Range error in iteration save interval (has to be between 1 and num_subiterations-1)")
        self._obj.set_num_subsets(self._num_subsets)  # STIR writes the reconstructor's subset count
        self._obj.set_up(image)
        if self._obj._prior() is not None and self._obj._prior().get_penalisation_factor() != 0:
            raise error("stand-in: OSMAPOSL with a prior is not implemented")
        if not subsets_are_balanced(self._obj._info.n_views, self._num_subsets):
            raise error("OSMAPOSL\nsubsets are not balanced\nOSMAPOSL cannot handle this.")
        _threshold_min_to_small_positive_value(image._arr)  # in place, on the set-up image
        self._subiteration_num = 1
        self._set_up_done = True

    def set_current_estimate(self, image):
        self.image = image.clone()

    def get_current_estimate(self):
        if self.image is None:
            raise error("current estimate not set.")
        return self.image.clone()

    def _update_estimate(self, image):
        if not self._set_up_done:
            raise error("Need to call set_up() for objective function first")
        k = self._subiteration_num
        subset = (k - 1) % self._num_subsets
        num = self._obj.get_backprojection_of_acquisition_ratio(image, subset)._arr
        sens = self._obj.get_subset_sensitivity(subset)._arr
        update = _stir_divide(num, sens, 0.0)
        if k != 1:
            np.clip(update, self._min_rel, self._max_rel, out=update)
        image._arr *= update

    def _end_of_iteration_processing(self, image):
        k = self._subiteration_num
        if (not (k % self._save_interval) or k == self._num_subiterations) and not self._disable_output:
            image.write(f"{self._prefix}_{k}.hv")

    def update_current_estimate(self):
        if self.image is None:
            raise error("current estimate not set")
        self._update_estimate(self.image)
        self._end_of_iteration_processing(self.image)
        self._subiteration_num += 1

    def update(self, image):
        self.image = image
        self.update_current_estimate()
        return image

    def _reconstruct(self, image):
        for k in range(1, self._num_subiterations + 1):
            self._subiteration_num = k
            self._update_estimate(image)
            self._end_of_iteration_processing(image)
        self._subiteration_num = self._num_subiterations + 1

    def process(self):
        if self.image is None:
            raise error("current estimate not set.")
        self._reconstruct(self.image)

    def reconstruct(self, image):
        self._reconstruct(image)
        self.image = image

    def get_output(self):
        if self.image is None:
            raise error("current estimate not set. Did you run a reconstruction already?")
        return self.image.clone()
