"""A small numpy **stand-in** for the part of ``sirf.STIR`` that :mod:`sirf_ddip.backends.sirf` uses.

This is *not* SIRF and computes nothing STIR computes; it exists so that the SIRF adapter's logic (subsets,
sensitivities, EM numerators, conversions, errors) can be tested in CI where SIRF cannot be installed
(SIRF is distributed through conda-forge and Docker only). The real check is ``tests/test_sirf_real.py``, which
runs only where ``import sirf.STIR`` works.

What is faithful to SIRF 3.10 / STIR 6.x (``SyneRBI/SIRF: src/xSTIR/pSTIR/STIR.py``, ``src/common/SIRF.py``):

- array layouts: ``ImageData`` ``(nz, ny, nx)``, ``AcquisitionData`` ``(n_tof, n_sinograms, n_views, n_tang)``;
- ``clone()`` (deep copy), ``fill()`` (array of exactly the shape, or scalar; returns ``self``), ``as_array()``
  (always a copy), ``asarray()`` (a view; ``supports_array_view`` is True), ``get_uniform_copy``;
- ``AcquisitionData(file)`` is **read-only** under the default ``'file'`` storage scheme (``fill`` raises;
  ``clone()`` gives writable memory data); ``AcquisitionData(other)`` is a template whose values are *not*
  initialised (NaN here, garbage in SIRF); ``get_subset`` needs the ``'memory'`` scheme;
- acquisition model ``y = S (G x + a) + b``; ``forward/backward(..., subset_num, num_subsets, out=None)``
  (**return None when ``out`` is given**); ``direct``/``adjoint`` raise on an affine model;
- subsets are over views: subset ``s`` of ``S`` = views ``s, s+S, s+2S, …`` (STIR's order for these geometries);
- ``PoissonLogLikelihoodWithLinearModelForMeanAndProjData``: ``set_num_subsets`` requires a new ``set_up``
  (the stand-in raises if an objective is used with a subset count it was not set up for);
  ``get_subset_sensitivity(s) = G_sᵀ S_s 1``; ``get_backprojection_of_acquisition_ratio(x, s) =
  G_sᵀ S_s (y_s / ŷ_s)``; ``gradient(x, subset=-1)`` (−1 = all subsets); ``value(x) = Σ y log ŷ − ŷ − prior``;
- ``OSMAPOSLReconstructor`` follows STIR's ``OSMAPOSLReconstruction::update_estimate`` without prior:
  subset ``(subiteration_num − 1) mod S``; multiplicative update ``divide(num, sens, 1e-6)`` (STIR's
  ``numerics/divide.inl``: 0 where both ``|num|`` and ``|sens|`` ≤ 1e-6·max(num), else ``num/sens``);
  from the 2nd sub-iteration on, the update is thresholded to ``[minimum, maximum relative change]``
  (defaults 0, FLT_MAX); ``set_up(image)`` enforces initial positivity **in place on ``image``**
  (``threshold_min_to_small_positive_value``: values below ``1e-6 · min positive`` are raised to it; all ≤ 0 →
  1e-6).

What is *not* STIR: the projector ``G`` is a small pixel-driven 2-D parallel-beam matrix (scipy.sparse) per
direct plane (one sinogram per image plane, segment 0 only), restricted to the inscribed cylinder; the
log-likelihood treats ``ŷ ≤ 0`` bins by skipping them (STIR truncates the quotient instead); files written by
``write`` are ``.npz``, not Interfile. Scanners are stand-in presets (see :data:`SCANNERS`).
"""

from __future__ import annotations

import copy as _copy
import types
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

FLT_MAX = float(np.finfo(np.float32).max)
SMALL_NUM = 1e-6

#: stand-in of ``sirf.config`` (build-time feature flags)
config = types.SimpleNamespace(SIRF_HAS_Parallelproj=False, SIRF_HAS_NiftyPET=False, STIR_WITH_CUDA=False)


class error(Exception):
    """Stand-in of ``sirf.Utilities.error`` (what SIRF raises)."""


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

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n_tof, self.n_rings, self.n_views, self.n_tang)


#: stand-in scanners usable as ``AcquisitionData(name)``
SCANNERS: dict[str, ProjInfo] = {
    "StandIn Tiny": ProjInfo("StandIn Tiny", n_rings=2, n_views=12, n_tang=17, bin_size_mm=4.0,
                             ring_spacing_mm=4.0),
    "StandIn Small": ProjInfo("StandIn Small", n_rings=1, n_views=28, n_tang=33, bin_size_mm=3.0,
                              ring_spacing_mm=4.0),
}


def scanner_names() -> str:
    return "\n".join(SCANNERS)


def subset_views(n_views: int, subset_num: int, num_subsets: int) -> np.ndarray:
    """Views of subset ``subset_num`` of ``num_subsets``: ``subset_num, subset_num + S, …``."""
    if num_subsets < 1 or not 0 <= subset_num < num_subsets:
        raise error(f"subset {subset_num} out of range for {num_subsets} subsets")
    return np.arange(subset_num, n_views, num_subsets)


# ---------------------------------------------------------------------------------------------------- containers
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
        np.savez(filename, arr=self._arr, meta=np.array(repr(self._meta()), dtype=object), allow_pickle=True)

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
            with np.load(arg, allow_pickle=True) as f:
                meta = eval(str(f["meta"]))  # noqa: S307 - stand-in's own file format
                self._arr = np.ascontiguousarray(f["arr"], dtype=np.float32)
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
        if src is None:
            return
        if isinstance(src, str) and "." in src:
            with np.load(src, allow_pickle=True) as f:
                meta = eval(str(f["meta"]))  # noqa: S307 - stand-in's own file format
                self._arr = np.ascontiguousarray(f["arr"], dtype=np.float32)
            self._info = ProjInfo(**meta)
            self._readonly = AcquisitionData._storage_scheme == "file"
        elif isinstance(src, str):
            if src not in SCANNERS:
                raise error(f"unknown scanner {src!r} (stand-in scanners: {list(SCANNERS)})")
            if span != 1 or view_mash_factor != 1 or tof_mash_factor != 1:
                raise error("stand-in scanners support span 1, no mashing only")
            self._info = SCANNERS[src]
            self._arr = np.zeros(self._info.shape, np.float32)
        elif isinstance(src, AcquisitionData):
            self._info = src._info
            # SIRF: same geometry, new storage, values NOT initialised (fill before use)
            self._arr = np.full(src._arr.shape, np.nan, np.float32)
        else:
            raise error("wrong source in AcquisitionData constructor")

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
        return 1

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
        if tuple(acq.shape) != self._factors.shape:
            raise error(f"AcquisitionSensitivityModel.set_up: data shape {acq.shape} != factors "
                        f"{self._factors.shape}")
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
    rows, cols, vals = [], [], []
    vox = np.nonzero(keep)[0]
    for v in range(info.n_views):
        phi = np.pi * v / info.n_views
        s = X[vox] * np.cos(phi) + Y[vox] * np.sin(phi)
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
    m = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(info.n_views * info.n_tang, ny * nx))
    return m.tocsr()


class AcquisitionModel:
    """``y = S (G x + a) + b`` (stand-in of ``sirf.STIR.AcquisitionModel``)."""

    def __init__(self):
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

    def _build_matrix(self, acq_templ, img_templ):  # pragma: no cover - overridden
        raise NotImplementedError

    def set_up(self, acq_templ, img_templ):
        if not isinstance(acq_templ, AcquisitionData) or not isinstance(img_templ, ImageData):
            raise error("AcquisitionModel.set_up(acq_templ: AcquisitionData, img_templ: ImageData)")
        if img_templ.shape[0] != acq_templ._info.n_rings:
            raise error(f"image has {img_templ.shape[0]} planes, the scanner {acq_templ._info.n_rings} rings")
        for name, term in (("additive", self.at), ("background", self.bt)):
            if term is not None and term.shape != acq_templ.shape:
                raise error(f"{name} term shape {term.shape} != acquisition data {acq_templ.shape}")
        if self.asm is not None:
            self.asm.set_up(acq_templ)
        self.acq_templ = acq_templ
        self.img_templ = img_templ.clone()
        self._G = self._build_matrix(acq_templ, img_templ)

    def get_additive_term(self):
        if self.at is None:
            return self.acq_templ.get_uniform_copy(0.0)
        return self.at

    def get_background_term(self):
        if self.bt is None:
            return self.acq_templ.get_uniform_copy(0.0)
        return self.bt

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
        return self.acq_templ.get_uniform_copy(0.0)

    def domain_geometry(self):
        return self.img_templ.get_uniform_copy(0.0)

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
            raise error("AcquisitionModel: set_up() call missing")

    def _views(self, subset_num, num_subsets):
        s = self._subset_num if subset_num is None else subset_num
        n = self._num_subsets if num_subsets is None else num_subsets
        return subset_views(self.acq_templ._info.n_views, s, n)

    def forward(self, image, subset_num=None, num_subsets=None, out=None):
        """Full-size data; the subset's views hold ``S (G x + a) + b``, the other views 0."""
        self._check_ready()
        if not isinstance(image, ImageData):
            raise error("forward needs an ImageData")
        if image.shape != self.img_templ.shape:
            raise error(f"forward: image shape {image.shape} != set-up template {self.img_templ.shape}")
        info = self.acq_templ._info
        views = self._views(subset_num, num_subsets)
        res = np.zeros(info.shape, np.float32)
        x = image._arr
        for z in range(x.shape[0]):
            res[0, z] = (self._G @ x[z].ravel().astype(np.float64)).reshape(info.n_views, info.n_tang)
        mask = np.zeros(info.n_views, bool)
        mask[views] = True
        res[:, :, ~mask, :] = 0
        if not self._linear_only and self.at is not None:
            res[:, :, mask, :] += self.at._arr[:, :, mask, :]
        if self.asm is not None:
            res[:, :, mask, :] *= self.asm._factors[:, :, mask, :]
        if not self._linear_only and self.bt is not None:
            res[:, :, mask, :] += self.bt._arr[:, :, mask, :]
        if out is None:
            ad = self.acq_templ._new(res)
            return ad
        out.fill(res)
        return None

    def backward(self, ad, subset_num=None, num_subsets=None, out=None):
        """``Gᵀ Sᵀ y`` over the subset's views."""
        self._check_ready()
        if not isinstance(ad, AcquisitionData):
            raise error("backward needs an AcquisitionData")
        info = self.acq_templ._info
        if ad.shape != info.shape:
            raise error(f"backward: data shape {ad.shape} != {info.shape}")
        views = self._views(subset_num, num_subsets)
        y = np.zeros(info.shape, np.float64)
        y[:, :, views, :] = ad._arr[:, :, views, :]
        if self.asm is not None:
            y *= self.asm._factors
        img = np.zeros(self.img_templ.shape, np.float32)
        for z in range(img.shape[0]):
            img[z] = (self._G.T @ y[0, z].ravel()).reshape(img.shape[1:])
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


class AcquisitionModelUsingMatrix(AcquisitionModel):
    def __init__(self, matrix=None):
        super().__init__()
        self._matrix = matrix if matrix is not None else RayTracingMatrix()

    def set_matrix(self, matrix):
        self._matrix = matrix

    def get_matrix(self):
        return self._matrix

    def _build_matrix(self, acq_templ, img_templ):
        return _system_matrix(acq_templ._info, img_templ, self._matrix._n_lors, self._matrix._restrict)


class AcquisitionModelUsingRayTracingMatrix(AcquisitionModelUsingMatrix):
    def set_num_tangential_LORs(self, n):
        return self._matrix.set_num_tangential_LORs(n)

    def get_num_tangential_LORs(self):
        return self._matrix.get_num_tangential_LORs()


# ---------------------------------------------------------------------------------------------------- objective
class QuadraticPrior:
    """Minimal ``½ β Σ_neighbours (x_j − x_k)²`` along x and y (for the prior bookkeeping in the adapter)."""

    def __init__(self):
        self._beta = 0.0

    def set_penalisation_factor(self, b):
        self._beta = float(b)
        return self

    def get_penalisation_factor(self):
        return self._beta

    def value(self, image):
        x = image._arr.astype(np.float64)
        return 0.5 * self._beta * float((np.diff(x, axis=1) ** 2).sum() + (np.diff(x, axis=2) ** 2).sum())

    def get_value(self, image):
        return self.value(image)


class PoissonLogLikelihoodWithLinearModelForMeanAndProjData:
    """Stand-in of the SIRF objective (log-likelihood with ``ŷ = S (G x + a) + b``)."""

    def __init__(self):
        self._ad = None
        self._am = None
        self._num_subsets = 1
        self._setup_subsets = None
        self._sens = None
        self._img_templ = None
        self.set_up_count = 0

    def set_acquisition_data(self, ad):
        if not isinstance(ad, AcquisitionData):
            raise error("set_acquisition_data needs AcquisitionData")
        self._ad = ad

    def set_acquisition_model(self, am):
        if not isinstance(am, AcquisitionModel):
            raise error("set_acquisition_model needs an AcquisitionModel")
        self._am = am

    def set_prior(self, prior):
        self.prior = prior

    def set_num_subsets(self, n):
        self._num_subsets = int(n)

    def get_num_subsets(self):
        return self._num_subsets

    def set_recompute_sensitivity(self, flag):
        pass

    def set_up(self, image):
        if not isinstance(image, ImageData):
            raise error("set_up needs ImageData")
        if self._ad is None or self._am is None:
            raise error("objective function: acquisition data and model must be set before set_up")
        am = self._am
        if am._G is None or am.img_templ.shape != image.shape or am.acq_templ.shape != self._ad.shape:
            am.set_up(self._ad, image)
        if tuple(am.img_templ.voxel_sizes()) != tuple(image.voxel_sizes()):
            raise error("objective set_up: image voxel sizes differ from the acquisition model's")
        ones = self._ad.get_uniform_copy(1.0)
        self._sens = [am.backward(ones, s, self._num_subsets) for s in range(self._num_subsets)]
        self._setup_subsets = self._num_subsets
        self._img_templ = image.clone()
        self.set_up_count += 1

    def _require(self, subset=None):
        if self._sens is None:
            raise error("objective function not set up: call set_up(image)")
        if self._setup_subsets != self._num_subsets:
            raise error(f"objective was set up for {self._setup_subsets} subsets but num_subsets is now "
                        f"{self._num_subsets}: call set_up(image) again")
        if subset is not None and subset != -1 and not 0 <= subset < self._num_subsets:
            raise error(f"subset {subset} out of range (num_subsets {self._num_subsets})")

    def get_subset_sensitivity(self, subset):
        self._require(subset)
        return self._sens[subset].clone()

    def _ratio(self, image, subset):
        am = self._am
        yhat = am.forward(image, subset, self._num_subsets)._arr.astype(np.float64)
        y = self._ad._arr.astype(np.float64)
        views = subset_views(self._ad._info.n_views, subset, self._num_subsets)
        r = np.zeros_like(y)
        ys, yh = y[:, :, views, :], yhat[:, :, views, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            r[:, :, views, :] = np.where(yh > 0, ys / yh, 0.0)
        return am.backward(self._ad._new(r), subset, self._num_subsets)

    def get_backprojection_of_acquisition_ratio(self, image, subset, out=None):
        self._require(subset)
        res = self._ratio(image, subset)
        if out is None:
            return res
        out.fill(res)
        return out

    def value(self, image):
        self._require()
        yhat = self._am.forward(image, 0, 1)._arr.astype(np.float64)
        y = self._ad._arr.astype(np.float64)
        ok = yhat > 0
        v = float(np.sum(np.where(ok & (y > 0), y * np.log(np.where(ok, yhat, 1.0)), 0.0)) - np.sum(yhat[ok]))
        prior = getattr(self, "prior", None)
        if prior is not None:
            v -= prior.value(image)
        return v

    def get_value(self, image):
        return self.value(image)

    __call__ = value

    def gradient(self, image, subset=-1, out=None):
        self._require(subset)
        subsets = range(self._num_subsets) if subset == -1 else [subset]
        g = sum((self._ratio(image, s) - self._sens[s] for s in subsets), start=image.get_uniform_copy(0.0))
        if out is None:
            return g
        out.fill(g)
        return out


def make_Poisson_loglikelihood(acq_data=None, likelihood_type=None, acq_model=None):
    if likelihood_type not in (None, "LinearModelForMean"):
        raise error("only PoissonLogLikelihoodWithLinearModelForMeanAndProjData is in the stand-in")
    obj = PoissonLogLikelihoodWithLinearModelForMeanAndProjData()
    if acq_data is None:
        raise error("make_Poisson_loglikelihood: acq_data required")
    obj.set_acquisition_data(acq_data)
    if acq_model is not None:
        obj.set_acquisition_model(acq_model)
    return obj


# ---------------------------------------------------------------------------------------------------- OSMAPOSL
def _threshold_min_to_small_positive_value(a: np.ndarray, small_num: float = SMALL_NUM) -> None:
    pos = a[a > 0]
    if pos.size:
        np.maximum(a, pos.min() * small_num, out=a)
    else:
        a[...] = small_num


def _stir_divide(num: np.ndarray, den: np.ndarray, small_num: float = SMALL_NUM) -> np.ndarray:
    """STIR ``numerics/divide.inl``."""
    small_value = max(float(num.max()) * small_num, 0.0)
    out = np.empty_like(num)
    zero = (np.abs(den) <= small_value) & (np.abs(num) <= small_value)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[~zero] = num[~zero] / den[~zero]
    out[zero] = 0
    return out


class OSMAPOSLReconstructor:
    """STIR's OSMAPOSL without a prior (= OSEM), following ``OSMAPOSLReconstruction::update_estimate``."""

    def __init__(self, filename=""):
        if filename:
            raise error("stand-in: .par files are not supported")
        self._obj = None
        self._num_subsets = 1
        self._num_subiterations = 1
        self._subiteration_num = 0
        self._max_rel = FLT_MAX
        self._min_rel = 0.0
        self._input = None
        self.image = None

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

    def set_input(self, acq):
        self._input = acq

    def set_up(self, image):
        if self._input is not None:
            self._obj.set_acquisition_data(self._input)
        self._obj.set_num_subsets(self._num_subsets)  # STIR writes the reconstructor's subset count
        self._obj.set_up(image)
        _threshold_min_to_small_positive_value(image._arr)  # in place, on the set-up image
        self._subiteration_num = 0

    def set_current_estimate(self, image):
        self.image = image.clone()

    def get_current_estimate(self):
        return self.image.clone()

    def update_current_estimate(self):
        self._subiteration_num += 1
        subset = (self._subiteration_num - 1) % self._num_subsets
        num = self._obj.get_backprojection_of_acquisition_ratio(self.image, subset)._arr
        sens = self._obj.get_subset_sensitivity(subset)._arr
        update = _stir_divide(num, sens)
        if self._subiteration_num != 1:
            np.clip(update, self._min_rel, self._max_rel, out=update)
        self.image._arr *= update

    def update(self, image):
        self.image = image
        self.update_current_estimate()
        return image

    def process(self):
        for _ in range(self._num_subiterations - self._subiteration_num):
            self.update_current_estimate()

    def reconstruct(self, image):
        self.set_current_estimate(image)
        self.process()
        image.fill(self.image)
        self.image = image

    def get_output(self):
        return self.image.clone()
