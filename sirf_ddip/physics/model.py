"""The acquisition model ``m ⊙ (A x + a)`` and the built-in engine's Poisson log-likelihood.

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
from typing import Any

import numpy as np
import torch

from ..data import Image, ProjData
from ..errors import DataValueError, GeometryMismatchError
from ..geometry.image import ImageGrid
from ..utils.device import resolve_device
from .likelihood import PoissonLogLikelihood, em_numerator_ratio, stir_log_likelihood
from .operator import LinearOperator, MultiplicativeFactors
from .subsets import ViewSubsets, validate_num_subsets

__all__ = ["AcquisitionModel", "SubsetOperator", "EngineLogLikelihood", "validate_sinogram", "build_additive"]

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


def _check_shape(t: torch.Tensor, shape: tuple, name: str, ref_name: str, what: str,
                 non_tof_shape: tuple | None = None) -> None:
    """``t`` must have the prompts' shape; with TOF prompts, ``non_tof_shape`` (one TOF bin's shape) is also
    accepted (TOF-independent multiplicative factors, broadcast over the TOF bins)."""
    if tuple(t.shape) == tuple(shape) or (non_tof_shape is not None and tuple(t.shape) == tuple(non_tof_shape)):
        return
    axes = "(TOF bins, sinograms, views, tangential)" if len(shape) == 4 else "(sinograms, views, tangential)"
    if len(shape) == 4 and len(t.shape) == 4 and tuple(t.shape[1:]) == tuple(shape[1:]):
        raise GeometryMismatchError(f"{what} {name} have {t.shape[0]} TOF bins but prompts {ref_name} have "
                                    f"{shape[0]} (shape {tuple(shape)} {axes}): give them on the prompts' TOF bins")
    if len(shape) == 4 and tuple(t.shape) == tuple(shape[1:]):
        raise GeometryMismatchError(f"{what} {name} are non-TOF, shape {tuple(t.shape)}, but prompts {ref_name} "
                                    f"are TOF data of shape {tuple(shape)} {axes}: give them per TOF bin")
    if len(shape) == 3 and len(t.shape) == 4 and tuple(t.shape[1:]) == tuple(shape):
        raise GeometryMismatchError(f"{what} {name} are TOF data ({t.shape[0]} TOF bins) but prompts {ref_name} "
                                    f"are non-TOF, shape {tuple(shape)}")
    raise GeometryMismatchError(f"{what} {name} has shape {tuple(t.shape)} but prompts {ref_name} have "
                                f"shape {tuple(shape)} {axes}" + (f" (or, for TOF-independent factors, "
                                f"{tuple(non_tof_shape)})" if non_tof_shape is not None else "")
                                + _axes_differing(tuple(t.shape), tuple(shape), non_tof_shape))


def _axes_differing(got: tuple, shape: tuple, non_tof_shape: tuple | None) -> str:
    """``": 18 views, not 36"``: the axes in which ``got`` differs from the prompts' shape (or, for a 3-D
    ``got`` and TOF prompts, from one TOF bin's shape), for the one-line error; empty if the ranks differ."""
    names = ("TOF bins", "sinograms", "views", "tangential positions")
    ref = shape if len(got) == len(shape) else (non_tof_shape if non_tof_shape is not None
                                                and len(got) == len(non_tof_shape) else None)
    if ref is None:
        return ""
    names = names[len(names) - len(ref):]
    diff = [f"{g} {n}, not {r}" for g, r, n in zip(got, ref, names) if g != r]
    return (": " + ", ".join(diff)) if diff else ""


class SubsetOperator(LinearOperator):
    """One view subset of a geometric projector as a :class:`LinearOperator`: ``x ↦ A_s x``.

    Parameters
    ----------
    projector : object
        ``forward(x, subset=None, num_subsets=None)`` / ``adjoint(y, subset=None, num_subsets=None)``
        (e.g. :class:`sirf_ddip.physics.projector.Projector`).
    subsets : ViewSubsets
        The subsets; ``subset`` is one of them (``None``: all views, the projector itself).
    """

    def __init__(self, projector: Any, subsets: ViewSubsets, subset: int | None):
        self.projector = projector
        self.subsets = subsets
        self.subset = subsets.check(subset)
        self.device = getattr(projector, "device", torch.device("cpu"))
        self.dtype = getattr(projector, "dtype", torch.float32)
        self._args = subsets.projector_args(subset)
        geom = subsets.geometry
        out = [int(v) for v in geom.shape]
        out[-2] = len(subsets.views(subset))  # (n_tof,) n_sino, views of the subset, n_tang
        self._out = tuple(out)

    @property
    def in_shape(self) -> tuple[int, ...]:
        grid = getattr(self.projector, "grid", None)
        return tuple(grid.shape) if grid is not None else tuple(self.projector.in_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self._out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._args[0] is None:
            return self.projector.forward(x)
        return self.projector.forward(x, subset=self._args[0], num_subsets=self._args[1])

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if self._args[0] is None:
            return self.projector.adjoint(y)
        return self.projector.adjoint(y, subset=self._args[0], num_subsets=self._args[1])


class AcquisitionModel:
    """``ȳ = m ⊙ (A x + a)`` on a geometric projector (SIRF ``AcquisitionModel`` semantics), per view subset.

    The linear part of subset ``s`` is the operator ``M_s @ A_s`` (:meth:`operator`): a
    :class:`~sirf_ddip.physics.operator.MultiplicativeFactors` after a :class:`SubsetOperator`.

    Parameters
    ----------
    projector : object
        ``forward(x, subset=None, num_subsets=None)`` / ``adjoint(y, subset=None, num_subsets=None)``
        (e.g. :class:`sirf_ddip.physics.projector.Projector`), geometric only; with ``geometry`` and ``grid``
        attributes unless ``subsets`` is given.
    mult, additive : ProjData, array or tensor, optional
        ``m`` (default 1) and ``a`` (default 0), full sinograms ``(n_sino, n_views, n_tang)``.
    subsets : callable, optional
        ``subsets(num_subsets) -> ViewSubsets`` (default: :class:`ViewSubsets` on the projector's geometry and
        grid).
    """

    def __init__(self, projector: Any, mult: SinoLike | None = None, additive: SinoLike | None = None,
                 subsets=None):
        self.projector = projector
        dev = getattr(projector, "device", None)
        self.device = torch.device(dev) if dev is not None else torch.device("cpu")
        self.dtype = getattr(projector, "dtype", torch.float32)
        self.mult = None if mult is None else _as_tensor(mult, self.device, self.dtype)
        self.additive = None if additive is None else _as_tensor(additive, self.device, self.dtype)
        self._make_subsets = subsets
        self._subsets: dict[int, ViewSubsets] = {}
        self._ops: dict[tuple[int, int | None], SubsetOperator] = {}

    # -------------------------------------------------------------- subsets
    def subsets(self, num_subsets: int | None) -> ViewSubsets:
        """The :class:`ViewSubsets` for ``num_subsets`` (cached)."""
        S = 1 if num_subsets is None else validate_num_subsets(num_subsets)
        if S not in self._subsets:
            if self._make_subsets is not None:
                self._subsets[S] = self._make_subsets(S)
            else:
                self._subsets[S] = ViewSubsets(self.projector.geometry, S, getattr(self.projector, "grid", None))
        return self._subsets[S]

    def _slice(self, t: torch.Tensor | None, subset, num_subsets) -> torch.Tensor | None:
        if subset is None:
            return t
        return self.subsets(num_subsets).restrict(t, subset)

    def geometric(self, subset: int | None = None, num_subsets: int | None = None) -> SubsetOperator:
        """``A_s`` as a :class:`LinearOperator` (cached)."""
        return self.operator(subset, num_subsets, with_factors=False)

    def operator(self, subset: int | None = None, num_subsets: int | None = None,
                 with_factors: bool = True) -> LinearOperator:
        """The linear part ``M_s @ A_s`` (or ``A_s`` without factors) of subset ``subset`` (cached)."""
        subs = self.subsets(num_subsets)
        s = subs.check(subset)
        key = (subs.num_subsets, s)
        if key not in self._ops:
            self._ops[key] = SubsetOperator(self.projector, subs, s)
        A = self._ops[key]
        m = subs.restrict(self.mult, s) if with_factors else None  # sliced per call: no second copy of m is kept
        return A if m is None else MultiplicativeFactors(m, A.out_shape) @ A

    # -------------------------------------------------------------- operators
    def geometric_forward(self, x: torch.Tensor, subset: int | None = None,
                          num_subsets: int | None = None) -> torch.Tensor:
        """``A_s x``."""
        return self.geometric(subset, num_subsets).forward(x)

    def geometric_adjoint(self, y: torch.Tensor, subset: int | None = None,
                          num_subsets: int | None = None) -> torch.Tensor:
        """``A_sᵀ y``."""
        return self.geometric(subset, num_subsets).adjoint(y)

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
        return self.operator(subset, num_subsets).forward(x)

    def backward(self, y: torch.Tensor, subset: int | None = None, num_subsets: int | None = None) -> torch.Tensor:
        """``A_sᵀ (m_s ⊙ y)`` (adjoint of the linear part)."""
        return self.operator(subset, num_subsets).adjoint(y)

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


class EngineLogLikelihood(PoissonLogLikelihood):
    """:class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood` of the built-in PyTorch engine.

    Built from operators: the geometric projector ``A`` (a :class:`~sirf_ddip.physics.operator.LinearOperator`),
    per view subset ``s`` (:class:`~sirf_ddip.physics.subsets.ViewSubsets`) the linear part ``M_s @ A_s``
    (:meth:`AcquisitionModel.operator`) and the additive term ``a_s``.

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
            raise TypeError(f"EngineLogLikelihood: prompts must be a sirf_ddip.data.ProjData, "
                            f"got {type(prompts).__name__}")
        if additive is not None and (randoms is not None or scatter is not None):
            raise ValueError("EngineLogLikelihood: give either 'additive' (a = (randoms + scatter) / m) or "
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

        tof = bool(getattr(self.geometry, "is_tof", False))

        def load(obj, what, broadcast_tof=False):
            if obj is None:
                return None
            name = _name(obj, what)
            og = getattr(obj, "geometry", None) if isinstance(obj, ProjData) else None
            if tof and og is not None and getattr(og, "is_tof", False) and og.num_tof_bins != self.geometry.num_tof_bins:
                # TOF factors on other TOF bins than the prompts' (another TOF mashing): never reinterpreted
                raise GeometryMismatchError(
                    f"{what} {name} [key 'TOF mashing factor']: {og.tof_summary()} but prompts {self._prompts_name} "
                    f"have {self.geometry.tof_summary()}: give them on the prompts' TOF bins")
            t = _as_tensor(obj, self.device, dtype)
            _check_shape(t, shape, name, self._prompts_name, what,
                         non_tof_shape=tuple(shape[1:]) if (tof and broadcast_tof) else None)
            if isinstance(obj, ProjData):
                ref = self.geometry.non_tof() if (tof and t.dim() == 3) else self.geometry
                try:
                    obj.geometry.check_matches(ref, what=f"{what} {name}",
                                               other_what=f"prompts {self._prompts_name}")
                except AttributeError:
                    pass
            validate_sinogram(t, name, what)
            return t

        m = load(mult, "multiplicative factors", broadcast_tof=True)
        a = load(additive, "additive term")
        r = load(randoms, "randoms")
        s = load(scatter, "scatter")
        if a is None:
            a = build_additive(m, r, s)
        self.model = AcquisitionModel(projector, m, a, subsets=self._make_subsets)
        self._seg_slices = _segment_slices(self.geometry, shape[0])
        self.subsets = self.model.subsets(1)
        self._sens: dict[tuple[int, int | None], torch.Tensor] = {}
        self.y = self._load_prompts(prompts)
        self.set_num_subsets(num_subsets)

    # -------------------------------------------------------------- construction from files
    @classmethod
    def from_files(cls, prompts: str | os.PathLike, mult: str | os.PathLike | None = None,
                   additive: str | os.PathLike | None = None, image_template: str | os.PathLike | None = None,
                   device: str | torch.device | None = None, num_subsets: int = 1, **kw) -> "EngineLogLikelihood":
        """Build from STIR Interfile files (``.hs``); ``image_template`` (``.hv``/``.nii``) fixes the grid."""
        from ..io import read_image, read_projdata

        y = read_projdata(prompts)
        m = read_projdata(mult) if mult is not None else None
        a = read_projdata(additive) if additive is not None else None
        grid = kw.pop("grid", None)          # an ImageGrid/Image given directly (instead of a template file)
        if image_template is not None:
            if grid is not None:
                raise ValueError("EngineLogLikelihood.from_files: give 'image_template' or 'grid', not both")
            grid = read_image(image_template).grid
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
        return self.subsets.num_subsets

    def set_num_subsets(self, n: int) -> None:
        """Use ``n`` view subsets (checked now: STIR refuses unbalanced subsets, ``ValueError``)."""
        self.subsets = self.model.subsets(validate_num_subsets(n))

    def _make_subsets(self, num_subsets: int) -> ViewSubsets:
        # the grid matters: STIR drops view symmetries (hence changes subsets) for shifted images
        return ViewSubsets(self.geometry, num_subsets, grid=self.grid)

    def subset_views(self, subset: int | None) -> np.ndarray:
        """View indices of ``subset`` (all views for ``None``)."""
        return self.subsets.views(subset)

    def _args(self, subset: int | None) -> tuple[int | None, int | None]:
        return self.subsets.projector_args(subset)

    def _data(self, t: torch.Tensor | None, subset, num_subsets) -> torch.Tensor | None:
        return self.model._slice(t, subset, num_subsets)

    def operator(self, subset: int | None = None) -> LinearOperator:
        """The linear part ``M_s @ A_s`` of ``subset`` as a :class:`~sirf_ddip.physics.operator.LinearOperator`."""
        s, S = self._args(subset)
        return self.model.operator(s, S)

    # -------------------------------------------------------------- operators
    def _image(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.image_shape:
            raise ValueError(f"image shape {tuple(x.shape)} != the likelihood's image shape {self.image_shape}")
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
            tof = len(self._shape) == 4
            if m is None:
                nv = len(self.subset_views(s))
                m = torch.ones((self._shape[-3], nv, self._shape[-1]), device=self.device, dtype=self.dtype)
                if tof and not hasattr(self.projector, "adjoint_non_tof"):
                    m = m.expand(self._shape[0], *m.shape)
            if tof and m.dim() == 3:
                # a TOF-independent m: STIR back projects it non-TOF, which is the sum over TOF bins of the TOF
                # back projections up to the kernel's cut-off (1.2e-5 of the maximum on d690_tof_2d)
                self._sens[key] = self.projector.adjoint_non_tof(m, *self._args(subset))
            else:
                self._sens[key] = self.model.geometric_adjoint(m, s, S)
        return self._sens[key]

    def backprojected_ratio(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        s, S = self._args(subset)
        ax = self.model.geometric_forward(self._image(x), s, S)
        a = self._data(self.model.additive, s, S)
        if a is not None:
            ax = ax + a
        q = em_numerator_ratio(self._data(self.y, s, S), ax, self._data(self.model.mult, s, S), self._seg_slices)
        return self.model.geometric_adjoint(q, s, S)

    def value(self, x: torch.Tensor, subset: int | None = None) -> float:
        """STIR's Poisson log-likelihood ``Σ y log ŷ − ŷ`` (constants dropped) at ``x`` (all data by default)."""
        s, S = self._args(subset)
        ybar = self.model.forward(self._image(x), s, S)
        return stir_log_likelihood(self._data(self.y, s, S), ybar, self._seg_slices)

    # -------------------------------------------------------------- conversion
    def to_tensor(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image):
            if not image.grid.matches(self.grid):
                raise GeometryMismatchError(f"image {image.meta.get('source', '')} grid {image.grid.describe()} "
                                            f"does not match the likelihood's grid {self.grid.describe()}")
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
        return (f"EngineLogLikelihood(prompts={self._prompts_name!r}, shape={self._shape}, "
                f"image={self.image_shape}, subsets={self.num_subsets}, device={self.device})")


