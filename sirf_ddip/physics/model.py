"""The acquisition model ``m ⊙ (A x + a)`` and the built-in engine's :class:`DataStep`.

Conventions (PETRIC / SIRF ``AcquisitionModel`` with ``set_acquisition_sensitivity(m)`` and
``set_additive_term(a)``): prompts ``y ~ Poisson(m ⊙ (A x + a))`` where ``A`` is the geometric projector,
``m`` the multiplicative factors (detection efficiency × attenuation) and ``a = (randoms + scatter) / m``
the additive term. Randoms and scatter may also be given separately (in counts); ``a`` is then built as
``(randoms + scatter) / m`` (0 where ``m = 0``).

STIR semantics of the objective (``PoissonLogLikelihoodWithLinearModelForMeanAndProjData``) are kept:
sensitivity ``A_sᵀ m_s`` per view subset (cached), EM numerator ``A_sᵀ divide_and_truncate(y_s, A_s x + a_s)``
and STIR's log-likelihood safeguards (see :mod:`sirf_ddip.physics.likelihood`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data import Image, ProjData
from ..errors import DataValueError, GeometryMismatchError
from ..geometry.image import ImageGrid
from ..recon.datastep import DataStep, validate_num_subsets
from ..utils.device import resolve_device
from .likelihood import em_numerator_ratio, stir_log_likelihood

__all__ = ["AcquisitionModel", "EngineDataStep", "validate_sinogram", "build_additive"]

SinoLike = Any  # ProjData | np.ndarray | torch.Tensor


def _name(obj: Any, default: str) -> str:
    """Human name of a sinogram for messages: its source file if known."""
    if isinstance(obj, ProjData):
        return str(obj.meta.get("source", default))
    return default


def _as_tensor(obj: SinoLike, device, dtype) -> torch.Tensor:
    if isinstance(obj, ProjData):
        obj = obj.array
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(obj), dtype=dtype, device=device)


def validate_sinogram(t: torch.Tensor, name: str, what: str, allow_negative: bool = False) -> None:
    """Raise :class:`DataValueError` naming ``name`` if ``t`` has NaN/Inf or (unless allowed) negatives."""
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        nbad = int((~finite).sum())
        raise DataValueError(f"{name}: {what} contain {nbad} NaN/Inf value(s)")
    if not allow_negative:
        mn = float(t.min()) if t.numel() else 0.0
        if mn < 0:
            nneg = int((t < 0).sum())
            raise DataValueError(f"{name}: {what} contain {nneg} negative value(s) (min {mn:g})")


def build_additive(mult: torch.Tensor | None, randoms: torch.Tensor | None,
                   scatter: torch.Tensor | None) -> torch.Tensor | None:
    """``a = (randoms + scatter) / m`` (0 where ``m = 0``); ``None`` if neither is given."""
    if randoms is None and scatter is None:
        return None
    bg = randoms if scatter is None else (scatter if randoms is None else randoms + scatter)
    if mult is None:
        return bg.clone()
    safe = torch.where(mult > 0, mult, torch.ones_like(mult))
    if bool(((mult <= 0) & (bg > 0)).any()):
        n = int(((mult <= 0) & (bg > 0)).sum())
        raise DataValueError(f"randoms/scatter are positive in {n} bin(s) where the multiplicative factors are 0: "
                             "the additive term a = (randoms + scatter) / m is undefined there")
    return torch.where(mult > 0, bg / safe, torch.zeros_like(bg))


def _check_shape(t: torch.Tensor, shape: tuple, name: str, ref_name: str, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise GeometryMismatchError(f"{what} {name} has shape {tuple(t.shape)} but prompts {ref_name} have "
                                    f"shape {tuple(shape)} (sinograms, views, tangential)")


class AcquisitionModel:
    """``ȳ = m ⊙ (A x + a)`` on a geometric projector (SIRF ``AcquisitionModel`` semantics).

    Parameters
    ----------
    projector : object
        ``forward(x, subset=None, num_subsets=None)`` / ``adjoint(y, subset=None, num_subsets=None)``
        (e.g. :class:`sirf_ddip.physics.projector.Projector`), geometric only.
    mult, additive : ProjData, array or tensor, optional
        ``m`` (default 1) and ``a`` (default 0), full sinograms ``(n_sino, n_views, n_tang)``.
    views_of : callable, optional
        ``views_of(subset, num_subsets) -> view indices`` to slice ``m``/``a`` for subsets (default: the
        projector geometry's ``subset_views``).
    """

    def __init__(self, projector: Any, mult: SinoLike | None = None, additive: SinoLike | None = None,
                 views_of=None):
        self.projector = projector
        dev = getattr(projector, "device", None)
        self.device = torch.device(dev) if dev is not None else torch.device("cpu")
        self.dtype = getattr(projector, "dtype", torch.float32)
        self.mult = None if mult is None else _as_tensor(mult, self.device, self.dtype)
        self.additive = None if additive is None else _as_tensor(additive, self.device, self.dtype)
        self._views_of = views_of
        self._view_cache: dict[tuple[int, int], torch.Tensor] = {}

    # -------------------------------------------------------------- subsets
    def views(self, subset: int | None, num_subsets: int | None) -> torch.Tensor | None:
        """View indices of a subset (``None``: all views)."""
        if subset is None or num_subsets is None or num_subsets == 1:
            return None
        key = (int(num_subsets), int(subset))
        if key not in self._view_cache:
            if self._views_of is not None:
                v = self._views_of(subset, num_subsets)
            else:
                grid = getattr(self.projector, "grid", None)
                v = self.projector.geometry.subset_views(num_subsets, subset, grid=grid)
            self._view_cache[key] = torch.as_tensor(np.asarray(v), dtype=torch.long, device=self.device)
        return self._view_cache[key]

    def _slice(self, t: torch.Tensor | None, subset, num_subsets) -> torch.Tensor | None:
        if t is None:
            return None
        v = self.views(subset, num_subsets)
        return t if v is None else t.index_select(1, v)

    # -------------------------------------------------------------- operators
    def geometric_forward(self, x: torch.Tensor, subset: int | None = None,
                          num_subsets: int | None = None) -> torch.Tensor:
        """``A_s x``."""
        if subset is None:
            return self.projector.forward(x)
        return self.projector.forward(x, subset=subset, num_subsets=num_subsets)

    def geometric_adjoint(self, y: torch.Tensor, subset: int | None = None,
                          num_subsets: int | None = None) -> torch.Tensor:
        """``A_sᵀ y``."""
        if subset is None:
            return self.projector.adjoint(y)
        return self.projector.adjoint(y, subset=subset, num_subsets=num_subsets)

    def forward(self, x: torch.Tensor, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``m_s ⊙ (A_s x + a_s)``."""
        y = self.geometric_forward(x, subset, num_subsets)
        a = self._slice(self.additive, subset, num_subsets)
        if a is not None:
            y = y + a
        m = self._slice(self.mult, subset, num_subsets)
        return y if m is None else y * m

    def linear_forward(self, x: torch.Tensor, subset: int | None = None,
                       num_subsets: int | None = None) -> torch.Tensor:
        """``m_s ⊙ A_s x`` (the linear part)."""
        y = self.geometric_forward(x, subset, num_subsets)
        m = self._slice(self.mult, subset, num_subsets)
        return y if m is None else y * m

    def backward(self, y: torch.Tensor, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``A_sᵀ (m_s ⊙ y)`` (adjoint of the linear part)."""
        m = self._slice(self.mult, subset, num_subsets)
        return self.geometric_adjoint(y if m is None else y * m, subset, num_subsets)

    __call__ = forward


def _segment_slices(geometry: Any, n_sino: int) -> list[tuple[int, int]]:
    """Memory-order sinogram ranges of each segment (STIR's viewgram = one segment at one view)."""
    try:
        out = []
        for sg in geometry.segments:
            sl = geometry.segment_slice(sg.number)
            out.append((int(sl.start), int(sl.stop)))
        return out
    except AttributeError:
        return [(0, n_sino)]


class EngineDataStep(DataStep):
    """:class:`DataStep` of the built-in PyTorch engine.

    Parameters
    ----------
    prompts : ProjData
        Measured counts (non-negative, finite).
    mult, additive : ProjData or array, optional
        ``m`` and ``a`` (PETRIC convention). ``additive`` excludes ``randoms``/``scatter``.
    grid : ImageGrid or Image, optional
        Image grid (default: the projector's, else STIR's default for the geometry).
    device : str or torch.device, optional
        Resolved with :func:`~sirf_ddip.utils.device.resolve_device`.
    num_subsets : int
        View subsets (STIR order).
    randoms, scatter : ProjData or array, optional
        Background in counts; ``a = (randoms + scatter) / m``.
    projector : object, optional
        A geometric projector (``forward``/``adjoint`` with ``subset``/``num_subsets``); default
        :class:`sirf_ddip.physics.projector.Projector` on ``prompts.geometry`` and ``grid``.
    """

    def __init__(self, prompts: ProjData, mult: SinoLike | None = None, additive: SinoLike | None = None,
                 grid: ImageGrid | Image | None = None, device: str | torch.device | None = None,
                 num_subsets: int = 1, randoms: SinoLike | None = None, scatter: SinoLike | None = None,
                 projector: Any = None, dtype: torch.dtype = torch.float32):
        if not isinstance(prompts, ProjData):
            raise TypeError(f"EngineDataStep: prompts must be a sirf_ddip.data.ProjData, got {type(prompts).__name__}")
        if additive is not None and (randoms is not None or scatter is not None):
            raise ValueError("EngineDataStep: give either 'additive' (a = (randoms + scatter) / m) or "
                             "'randoms'/'scatter', not both")
        self.geometry = prompts.geometry
        self.dtype = dtype
        if projector is not None:
            dev = getattr(projector, "device", None)
            self.device = torch.device(dev) if dev is not None else resolve_device(device)
        else:
            self.device = resolve_device(device)
        if isinstance(grid, Image):
            grid = grid.grid
        if grid is None:
            grid = getattr(projector, "grid", None) if projector is not None else None
        if grid is None:
            grid = self.geometry.default_image_grid()
        self.grid: ImageGrid = grid
        self.image_shape = tuple(grid.shape)
        if projector is None:
            from .projector import Projector

            projector = Projector(self.geometry, grid, device=self.device, dtype=dtype)
        self.projector = projector
        self._prompts_name = _name(prompts, "prompts")
        shape = tuple(prompts.array.shape)
        self._shape = shape

        def load(obj, what):
            if obj is None:
                return None
            name = _name(obj, what)
            if isinstance(obj, ProjData):
                try:
                    obj.geometry.check_matches(self.geometry, what=f"{what} {name}",
                                               other_what=f"prompts {self._prompts_name}")
                except AttributeError:
                    pass
            t = _as_tensor(obj, self.device, dtype)
            _check_shape(t, shape, name, self._prompts_name, what)
            validate_sinogram(t, name, what)
            return t

        m = load(mult, "multiplicative factors")
        a = load(additive, "additive term")
        r = load(randoms, "randoms")
        s = load(scatter, "scatter")
        if a is None:
            a = build_additive(m, r, s)
        self.model = AcquisitionModel(projector, m, a, views_of=self._views_of)
        self._seg_slices = _segment_slices(self.geometry, shape[0])
        self._num_subsets = 1
        self._sens: dict[tuple[int, int | None], torch.Tensor] = {}
        self.y = self._load_prompts(prompts)
        self.set_num_subsets(num_subsets)

    # -------------------------------------------------------------- construction from files
    @classmethod
    def from_files(cls, prompts: str | os.PathLike, mult: str | os.PathLike | None = None,
                   additive: str | os.PathLike | None = None, image_template: str | os.PathLike | None = None,
                   device: str | torch.device | None = None, num_subsets: int = 1, **kw) -> "EngineDataStep":
        """Build from STIR Interfile files (``.hs``); ``image_template`` (``.hv``/``.nii``) fixes the grid."""
        from ..io import read_image, read_projdata

        y = read_projdata(prompts)
        m = read_projdata(mult) if mult is not None else None
        a = read_projdata(additive) if additive is not None else None
        grid = read_image(image_template).grid if image_template is not None else None
        return cls(y, m, a, grid=grid, device=device, num_subsets=num_subsets, **kw)

    # -------------------------------------------------------------- data
    def _load_prompts(self, prompts: SinoLike) -> torch.Tensor:
        name = _name(prompts, "prompts")
        if isinstance(prompts, ProjData):
            try:
                prompts.geometry.check_matches(self.geometry, what=f"prompts {name}",
                                               other_what=f"prompts {self._prompts_name}")
            except AttributeError:
                pass
        t = _as_tensor(prompts, self.device, self.dtype)
        _check_shape(t, self._shape, name, self._prompts_name, "prompts")
        validate_sinogram(t, name, "prompts")
        return t

    def set_prompts(self, prompts: SinoLike) -> None:
        """Replace the measured data (same geometry); sensitivities are kept (they do not depend on y)."""
        if isinstance(prompts, (str, os.PathLike)):
            from ..io import read_projdata

            prompts = read_projdata(prompts)
        self.y = self._load_prompts(prompts)

    @property
    def mult(self) -> torch.Tensor | None:
        return self.model.mult

    @property
    def additive(self) -> torch.Tensor | None:
        return self.model.additive

    # -------------------------------------------------------------- subsets
    @property
    def num_subsets(self) -> int:
        return self._num_subsets

    def set_num_subsets(self, n: int) -> None:
        n = validate_num_subsets(n)
        if n > 1:  # validate now (balanced subsets) rather than mid-reconstruction
            self._views_of(0, n)
        self._num_subsets = n

    def _views_of(self, subset: int, num_subsets: int):
        # the grid matters: STIR drops view symmetries (hence changes subsets) for shifted images
        return self.geometry.subset_views(num_subsets, subset, grid=self.grid)

    def subset_views(self, subset: int | None) -> np.ndarray:
        """View indices of ``subset`` (all views for ``None``)."""
        if subset is None or self._num_subsets == 1:
            return np.arange(self._shape[1])
        return np.asarray(self._views_of(subset, self._num_subsets))

    def _args(self, subset: int | None) -> tuple[int | None, int | None]:
        if subset is None or self._num_subsets == 1:
            return None, None
        s = int(subset)
        if not 0 <= s < self._num_subsets:
            raise ValueError(f"subset {s} out of range 0..{self._num_subsets - 1}")
        return s, self._num_subsets

    def _data(self, t: torch.Tensor | None, subset, num_subsets) -> torch.Tensor | None:
        return self.model._slice(t, subset, num_subsets)

    # -------------------------------------------------------------- operators
    def _image(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.image_shape:
            raise ValueError(f"image shape {tuple(x.shape)} != data step image shape {self.image_shape}")
        return x.to(device=self.device, dtype=self.dtype)

    def forward(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        s, S = self._args(subset)
        return self.model.forward(self._image(x), s, S)

    def backward(self, y: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        s, S = self._args(subset)
        return self.model.backward(y.to(device=self.device, dtype=self.dtype), s, S)

    def sensitivity(self, subset: int | None = None) -> torch.Tensor:
        s, S = self._args(subset)
        key = (S or 1, s)
        if key not in self._sens:
            m = self._data(self.model.mult, s, S)
            if m is None:
                nv = len(self.subset_views(s))
                m = torch.ones((self._shape[0], nv, self._shape[2]), device=self.device, dtype=self.dtype)
            self._sens[key] = self.model.geometric_adjoint(m, s, S)
        return self._sens[key]

    def backproject_ratio(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        s, S = self._args(subset)
        ax = self.model.geometric_forward(self._image(x), s, S)
        a = self._data(self.model.additive, s, S)
        if a is not None:
            ax = ax + a
        q = em_numerator_ratio(self._data(self.y, s, S), ax, self._data(self.model.mult, s, S), self._seg_slices)
        return self.model.geometric_adjoint(q, s, S)

    def log_likelihood(self, x: torch.Tensor, subset: int | None = None) -> float:
        """STIR's Poisson log-likelihood ``Σ y log ŷ − ŷ`` (constants dropped) at ``x`` (all data by default)."""
        s, S = self._args(subset)
        ybar = self.model.forward(self._image(x), s, S)
        return stir_log_likelihood(self._data(self.y, s, S), ybar, self._seg_slices)

    # -------------------------------------------------------------- conversion
    def to_tensor(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image):
            if not image.grid.matches(self.grid):
                raise GeometryMismatchError(f"image {image.meta.get('source', '')} grid {image.grid.describe()} "
                                            f"does not match the data step grid {self.grid.describe()}")
            arr = image.array
        elif isinstance(image, torch.Tensor):
            return self._image(image)
        else:
            arr = np.asarray(image)
        return self._image(torch.as_tensor(np.asarray(arr, dtype=np.float32), device=self.device))

    def from_tensor(self, tensor: torch.Tensor, template: Any | None = None) -> Image:
        grid = template.grid if isinstance(template, Image) else (template if isinstance(template, ImageGrid)
                                                                  else self.grid)
        meta = dict(template.meta) if isinstance(template, Image) else {}
        meta.pop("source", None)
        arr = tensor.detach().to("cpu", torch.float32).numpy().reshape(grid.shape).copy()
        return Image(arr, grid, meta)

    def __repr__(self) -> str:
        return (f"EngineDataStep(prompts={self._prompts_name!r}, shape={self._shape}, image={self.image_shape}, "
                f"subsets={self._num_subsets}, device={self.device})")
