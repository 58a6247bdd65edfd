"""SIRF backend: real ``sirf.STIR`` objects behind the :class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood` interface.

``sirf.STIR`` is imported lazily (only inside functions), so ``import sirf_ddip`` never needs SIRF. The adapter is
duck-typed: it calls SIRF methods by name and never ``isinstance``-checks SIRF classes, so the numpy stand-in in
``tests/sirf_standin.py`` exercises exactly the code that runs on real SIRF.

What maps to what (SIRF 3.10 / STIR 6.x, ``SyneRBI/SIRF: src/xSTIR/pSTIR/STIR.py``)
-------------------------------------------------------------------------------------
============================  ==========================================================================
PoissonLogLikelihood                       SIRF call(s)
============================  ==========================================================================
``set_num_subsets(S)``         ``obj.set_num_subsets(S)``; the objective is ``obj.set_up(template)`` again
                               (lazily, before its next use): STIR's subset sensitivities depend on ``S``
``sensitivity(s)``             ``obj.get_subset_sensitivity(s)`` (cached per ``S``; ``None`` = Σ over subsets)
``backprojected_ratio(x, s)``    ``obj.get_backprojection_of_acquisition_ratio(image, s)``
                               = ``G_sᵀ S_s (y_s / (S_s (G_s x + a_s) + b_s))``, prior **not** included
``em_update(lik, x, s)``       the two above (:func:`sirf_ddip.recon.em.em_update`)
``value(x)``                 ``obj.value(image)`` (+ the prior's value if a prior was set, so the result is the
                               pure Poisson term; STIR's value is ``Σ y log ŷ − ŷ − penalty``)
``forward(x, s)``              ``acq_model.forward(image, subset_num=s, num_subsets=S)`` → ``AcquisitionData``:
                               the subset's views hold ``S (G x + a) + b``, every other view ``S a + b``
                               (SIRF zeroes, projects the subset, then adds ``a``, applies ``S``, adds ``b``
                               over all views: ``stir_x.cpp:520-566``)
``backward(y, s)``             ``acq_model.backward(ad, subset_num=s, num_subsets=S)`` → tensor
``to_tensor(image)``           ``image.asarray()`` (zero-copy view) when ``image.supports_array_view``, else
                               ``image.as_array()``; then one copy onto the device
``from_tensor(t, template)``   ``template.clone().fill(ndarray)`` (geometry and voxel sizes of the template)
``set_prompts(acq)``           ``obj.set_acquisition_data(acq)`` (what STIR's ``set_input`` does)
============================  ==========================================================================

Subsets are SIRF's/STIR's own (over views); subset ``s`` of ``S`` is what STIR calls subset ``s``: the views
``v ≡ s (mod S)`` that are *basic* for the projector's symmetries, each with its symmetry-related views
(``UCL/STIR: src/recon_buildblock/find_basic_vs_nums_in_subset.cxx:45-53``), so for the ray-tracing matrix a subset
is not ``s, s+S, …`` (see ``tests/sirf_standin.py``).

What SIRF does that the adapter checks (SIRF 3.10)
--------------------------------------------------
- An acquisition model keeps its set-up templates as Python attributes ``acq_templ``/``img_templ`` (None until
  ``set_up``, ``STIR.py:1588-1624``); ``range_geometry()``/``domain_geometry()`` return the *same* C++ objects
  (``stir_x.cpp:497-498``, ``cstir_p.cpp:570-573``) and, before ``set_up``, a null handle. The objective does not
  set the model up: ``set_acquisition_model`` copies its projector pair, additive/background terms and
  normalisation at that moment (``stir_x.cpp:611-649``), and ``objective.set_up`` sets up STIR's projectors only.
  So OSEM/DDIP work with a model that was never set up; :meth:`SirfLogLikelihood.forward`/``backward`` then raise
  :class:`SirfNotReadyError`.
- Image geometry: STIR compares images with ``has_same_characteristics`` (sizes, voxel sizes *and* origin); the
  adapter compares dimensions, voxel sizes and the 4×4 ``transf_matrix()`` (``STIR.py:506-510``).
- A prior set on the C++ side has no Python ``.prior`` attribute (that is set only by ``set_prior``,
  ``STIR.py:2379-2385``); ``get_prior()`` wraps the C++ pointer, null when none (``STIR.py:2387-2391``).
- TOF: SIRF 3.10 ``AcquisitionData`` carries the TOF bins as its first dimension (``dimensions()`` =
  ``(n_tof, non-TOF sinograms, views, tangential)``, ``STIR.py:1109-1122``, ``cstir.cpp:980-988``; note that
  ``AcquisitionData(scanner)`` defaults to ``tof_mash_factor=1``, i.e. TOF data on a TOF scanner, ``cstir.cpp:965``),
  and STIR 6.4's matrix and parallelproj projectors are TOF (STIR 6.0/6.1 release notes). The adapter passes TOF
  through: ``forward`` returns TOF data, ``backward`` takes TOF data or arrays of the full TOF shape; the prompts,
  the model's set-up template and its additive/background terms must have the same TOF bins
  (:func:`check_same_acq_geometry`, a one-line :class:`GeometryMismatchError` otherwise). A non-TOF normalisation of
  TOF data is STIR's business (``BinNormalisationFromProjData`` multiplies every TOF bin by it, rel_6.4.0
  ``BinNormalisationFromProjData.cxx:89-93``); SIRF's scatter estimation is non-TOF (SIRF ``CHANGES.md``).
- Listmode objectives (``PoissonLogLikelihoodWithLinearModelForMeanAndListModeDataWithProjMatrixByBin``) are
  rejected by class: their EM quantities are not those of sinograms; bin with ``ListmodeToSinograms``.
- Parallelproj (``AcquisitionModelUsingParallelproj``, detected by class): STIR's parallelproj pair has trivial
  symmetries and projects all views for every subset, so ``S`` subsets cost ``S``× a full projection; PETRIC
  builds one model per subset on ``prompts.get_subset(views)`` instead (a warning says so). An image data
  processor set on the model (``set_image_data_processor``) is not visible from Python; SIRF#1324: parallelproj
  ignores it — use :func:`set_image_data_processor`, which warns.
"""

from __future__ import annotations

import re
import sys
import warnings
from typing import Any

import numpy as np
import torch

from ..errors import GeometryMismatchError, SirfDdipError, UnsupportedDataError
from ..physics.likelihood import PoissonLogLikelihood
from ..physics.subsets import validate_num_subsets
from ..utils.device import resolve_device

__all__ = [
    "SirfLogLikelihood",
    "SirfNotAvailableError",
    "SirfObjectError",
    "SirfFeatureError",
    "SirfNotReadyError",
    "import_sirf_stir",
    "sirf_has_parallelproj",
    "make_acquisition_model",
    "sirf_kind",
    "set_image_data_processor",
    "model_is_set_up",
    "num_tof_bins",
    "check_same_acq_geometry",
]

#: voxel sizes are compared with this relative tolerance (STIR stores float32)
VOXEL_RTOL = 1e-4
#: image positions (transformation matrix offsets) are compared with this absolute tolerance in mm
ORIGIN_ATOL_MM = 1e-3


class SirfNotAvailableError(SirfDdipError, ImportError):
    """``import sirf.STIR`` failed."""


class SirfObjectError(SirfDdipError, TypeError):
    """A SIRF object of the wrong kind (e.g. ``AcquisitionData`` where an objective function was expected)."""


class SirfFeatureError(SirfDdipError, RuntimeError):
    """The installed SIRF lacks a feature that was asked for (e.g. parallelproj)."""


class SirfNotReadyError(SirfDdipError, RuntimeError):
    """A SirfLogLikelihood operation needs something that was not given (an image template, an acquisition model)."""


# ---------------------------------------------------------------------------------------------------- imports
_INSTALL_HINT = ("SIRF is installed with conda (`conda install -c conda-forge sirf`) or used from the SyneRBI "
                 "Docker image (https://github.com/SyneRBI/SIRF-SuperBuild); it cannot be pip-installed. "
                 "Without SIRF, use sirf_ddip's own engine (sirf_ddip.physics.model.EngineLogLikelihood, "
                 "`sirf-ddip recon`).")


def import_sirf_stir():
    """Import and return ``sirf.STIR``, or raise :class:`SirfNotAvailableError` with install instructions."""
    try:
        import sirf.STIR as stir  # noqa: PLC0415 - lazy by design
    except ImportError as exc:  # includes a broken install (missing shared libraries)
        raise SirfNotAvailableError(f"cannot import sirf.STIR ({exc}). {_INSTALL_HINT}") from exc
    return stir


def _module_of(obj: Any):
    """The module that defines ``obj``'s class (``sirf.STIR`` for real SIRF objects, the stand-in in tests)."""
    return sys.modules.get(type(obj).__module__)


def sirf_has_parallelproj(stir: Any = None) -> bool:
    """Whether this SIRF was built with parallelproj (``sirf.config.SIRF_HAS_Parallelproj``).

    ``stir`` is the ``sirf.STIR`` module (or an API-compatible stand-in with a ``config`` attribute).
    """
    if stir is None:
        stir = import_sirf_stir()
    cfg = getattr(stir, "config", None)
    if cfg is None and getattr(stir, "__name__", "").startswith("sirf."):
        try:
            import sirf.config as cfg  # noqa: PLC0415
        except ImportError:
            cfg = None
    flag = getattr(cfg, "SIRF_HAS_Parallelproj", None) if cfg is not None else None
    if flag is None:  # older SIRF without the flag: the class exists only if built with it
        return hasattr(stir, "AcquisitionModelUsingParallelproj")
    return bool(flag) and hasattr(stir, "AcquisitionModelUsingParallelproj")


def make_acquisition_model(kind: str = "ray_tracing", num_tangential_LORs: int = 3, stir: Any = None):
    """Create a SIRF PET acquisition model.

    Parameters
    ----------
    kind : {"ray_tracing", "parallelproj"}
        ``"ray_tracing"``: ``AcquisitionModelUsingRayTracingMatrix`` (STIR's ray tracing matrix, CPU);
        ``"parallelproj"``: ``AcquisitionModelUsingParallelproj`` (Joseph; CUDA if libparallelproj has it).
    num_tangential_LORs : int
        Rays traced per bin (ray tracing only; STIR's default is 1, the STIR reference data use 3).
    stir : module, optional
        ``sirf.STIR`` (default) or an API-compatible stand-in.

    Raises
    ------
    SirfFeatureError
        ``kind="parallelproj"`` but this SIRF was built without parallelproj.
    ValueError
        Unknown ``kind`` or ``num_tangential_LORs < 1``.
    """
    if stir is None:
        stir = import_sirf_stir()
    if kind == "ray_tracing":
        n = int(num_tangential_LORs)
        if n < 1:
            raise ValueError(f"num_tangential_LORs must be >= 1, got {num_tangential_LORs}")
        am = stir.AcquisitionModelUsingRayTracingMatrix()
        am.set_num_tangential_LORs(n)
        return am
    if kind == "parallelproj":
        if not sirf_has_parallelproj(stir):
            raise SirfFeatureError(
                "kind='parallelproj': this SIRF was built without parallelproj "
                "(sirf.config.SIRF_HAS_Parallelproj is False, so sirf.STIR has no "
                "AcquisitionModelUsingParallelproj). Install a SIRF build with parallelproj (the conda-forge "
                "package and the SyneRBI Docker images have it; from source: SIRF-SuperBuild with "
                "-DBUILD_parallelproj=ON) or use kind='ray_tracing'.")
        return stir.AcquisitionModelUsingParallelproj()
    raise ValueError(f"unknown acquisition model kind {kind!r}: expected 'ray_tracing' or 'parallelproj'")


# ---------------------------------------------------------------------------------------------------- duck typing
def sirf_kind(obj: Any) -> str:
    """A short name for what kind of SIRF object ``obj`` looks like (duck-typed), for error messages."""
    if obj is None:
        return "None"
    if isinstance(obj, torch.Tensor):
        return "torch.Tensor"
    if isinstance(obj, np.ndarray):
        return "numpy.ndarray"
    mod = type(obj).__module__
    if "Gadgetron" in mod:
        return f"MR object {mod}.{type(obj).__name__}"
    if hasattr(obj, "get_backprojection_of_acquisition_ratio"):
        return "Poisson log-likelihood objective"
    if hasattr(obj, "set_objective_function") or hasattr(obj, "update_current_estimate"):
        return "reconstructor"
    if hasattr(obj, "forward") and hasattr(obj, "backward") and hasattr(obj, "set_up"):
        return "AcquisitionModel"
    if hasattr(obj, "unnormalise") and hasattr(obj, "invert"):
        return "AcquisitionSensitivityModel"
    if hasattr(obj, "set_penalisation_factor"):
        return "Prior"
    if hasattr(obj, "acquisition_data_template"):
        return "ListmodeData"
    if hasattr(obj, "create_uniform_image") or hasattr(obj, "get_subset"):
        return "AcquisitionData"
    if hasattr(obj, "voxel_sizes") and hasattr(obj, "as_array"):
        return "ImageData"
    return f"{mod}.{type(obj).__name__}"


def _is_image(obj: Any) -> bool:
    return sirf_kind(obj) == "ImageData"


def _is_acq(obj: Any) -> bool:
    return sirf_kind(obj) == "AcquisitionData"


_MODALITY_RE = re.compile(r"modality\s*(?::=|:|=)\s*([A-Za-z]+)", re.IGNORECASE)
_PET_NAMES = {"PT", "PET"}
_UNKNOWN_NAMES = {"", "UNKNOWN", "NONE", "OT"}


def modality_of(obj: Any) -> str | None:
    """The imaging modality string of a SIRF container (``modality`` property, else parsed ``get_info()``)."""
    if "Gadgetron" in type(obj).__module__:
        return "MR"
    try:
        mod = getattr(obj, "modality", None)
        if callable(mod):
            mod = mod()
    except Exception:  # noqa: BLE001 - SIRF raises its own error type on a missing value
        mod = None
    if mod is None:
        try:
            info = obj.get_info()
        except Exception:  # noqa: BLE001
            return None
        m = _MODALITY_RE.search(str(info))
        mod = m.group(1) if m else None
    return None if mod is None else str(mod).strip()


def check_pet(obj: Any, what: str) -> None:
    """Raise :class:`UnsupportedDataError` when ``obj`` is not PET data (unknown modality is accepted)."""
    mod = modality_of(obj)
    if mod is None:
        return
    up = mod.upper()
    if up in _PET_NAMES or up in _UNKNOWN_NAMES:
        return
    raise UnsupportedDataError(f"<{what}: {sirf_kind(obj)}>",
                               f"modality is {mod!r}; sirf_ddip reconstructs PET ('PT') data only", key="modality")


def _dims(obj: Any) -> tuple[int, ...]:
    try:
        d = obj.dimensions()
    except Exception:  # noqa: BLE001
        d = obj.shape
    return tuple(int(v) for v in d)


def _voxel_sizes(img: Any) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in img.voxel_sizes())
    except Exception:  # noqa: BLE001
        return None


def _transf_matrix(img: Any) -> np.ndarray | None:
    try:
        tm = np.asarray(img.transf_matrix(), dtype=np.float64)
    except Exception:  # noqa: BLE001 - not an image with geometry (or a SIRF without the method)
        return None
    return tm if tm.shape == (4, 4) else None


def check_same_image_geometry(a: Any, b: Any, what_a: str, what_b: str) -> None:
    """Raise :class:`GeometryMismatchError` unless images ``a`` and ``b`` have the same dimensions, voxel sizes and
    position (the 4×4 index → mm ``transf_matrix()``), as STIR's ``has_same_characteristics``."""
    da, db = _dims(a), _dims(b)
    if da != db:
        raise GeometryMismatchError(f"{what_a} has dimensions (z, y, x) {da} but {what_b} has {db}")
    va, vb = _voxel_sizes(a), _voxel_sizes(b)
    if va is not None and vb is not None and not np.allclose(va, vb, rtol=VOXEL_RTOL, atol=0):
        raise GeometryMismatchError(f"{what_a} has voxel sizes (z, y, x) {va} mm but {what_b} has {vb} mm")
    ta, tb = _transf_matrix(a), _transf_matrix(b)
    if ta is not None and tb is not None:
        tol = ORIGIN_ATOL_MM + VOXEL_RTOL * float(np.abs(ta[:3, 3]).max(initial=0.0))
        if not np.allclose(ta, tb, rtol=VOXEL_RTOL, atol=tol):
            raise GeometryMismatchError(
                f"{what_a} and {what_b} are at different positions (transformation matrices differ: first voxel at "
                f"{np.round(ta[:3, 3], 3).tolist()} mm vs {np.round(tb[:3, 3], 3).tolist()} mm); resample one onto "
                "the other's grid")


def num_tof_bins(acq: Any) -> int:
    """TOF bins of SIRF ``AcquisitionData``: the first of its ``dimensions()`` (``STIR.py:1109-1122``; 1 non-TOF)."""
    return _dims(acq)[0]


def check_same_acq_geometry(a: Any, b: Any, what_a: str, what_b: str) -> None:
    """Raise :class:`GeometryMismatchError` unless acquisition data ``a`` and ``b`` have the same dimensions
    (TOF bins included: SIRF's additive and background terms and the model's template are per TOF bin, and
    adding data of other TOF bins is an error in STIR, so a TOF study is never collapsed to non-TOF here)."""
    da, db = _dims(a), _dims(b)
    if da != db:
        if da[1:] == db[1:]:
            ta, tb = (f"{d[0]} TOF bins" if d[0] > 1 else "non-TOF" for d in (da, db))
            raise GeometryMismatchError(f"{what_a} is {ta} but {what_b} is {tb} (dimensions (tof, sinograms, views, "
                                        f"tangential) {da} vs {db}): give every term with the prompts' TOF bins")
        raise GeometryMismatchError(f"{what_a} has dimensions (tof, sinograms, views, tangential) {da} "
                                    f"but {what_b} has {db}")


def _is_listmode_objective(obj: Any) -> bool:
    """SIRF's listmode objective, by class (``PoissonLogLikelihoodWithLinearModelForMeanAndListModeData…``,
    ``STIR.py:2609``); its ``set_acquisition_data`` takes ``ListmodeData``."""
    return any("ListModeData" in c.__name__ for c in type(obj).__mro__)


def _require_objective(obj: Any) -> None:
    if _is_listmode_objective(obj):
        raise SirfObjectError(
            f"{type(obj).__name__}: listmode objectives are not supported (their EM quantities are computed from "
            "events, not from the sinograms sirf_ddip's updates use): bin the listmode with "
            "sirf.STIR.ListmodeToSinograms and use make_Poisson_loglikelihood(prompts, acq_model=acq_model)")
    needed = ("get_subset_sensitivity", "get_backprojection_of_acquisition_ratio", "set_num_subsets",
              "set_up", "value", "set_acquisition_data")
    missing = [m for m in needed if not hasattr(obj, m)]
    if not missing:
        return
    kind = sirf_kind(obj)
    hint = {
        "AcquisitionData": "build the objective with sirf.STIR.make_Poisson_loglikelihood(acq_data, "
                           "acq_model=acq_model), or use SirfLogLikelihood.from_acquisition_model(acq_model, acq_data)",
        "AcquisitionModel": "use SirfLogLikelihood.from_acquisition_model(acq_model, acq_data) or "
                            "make_Poisson_loglikelihood(acq_data, acq_model=acq_model)",
        "ImageData": "an image is a template/initial estimate: pass it to set_up(image)",
        "reconstructor": "pass its objective (reconstructor.get_objective_function())",
        "ListmodeData": "listmode objectives are not supported yet: bin to sinograms with ListmodeToSinograms",
    }.get(kind, "expected a sirf.STIR Poisson log-likelihood objective (make_Poisson_loglikelihood)")
    raise SirfObjectError(f"expected a sirf.STIR PoissonLogLikelihoodWithLinearModelForMeanAndProjData objective "
                          f"but got a {kind} (missing {', '.join(missing)}): {hint}")


# ---------------------------------------------------------------------------------------------------- PoissonLogLikelihood
class SirfLogLikelihood(PoissonLogLikelihood):
    """:class:`PoissonLogLikelihood` backed by a ``sirf.STIR`` Poisson log-likelihood (and optionally its acquisition model).

    Parameters
    ----------
    objective : sirf.STIR.PoissonLogLikelihoodWithLinearModelForMeanAndProjData
        The objective (``make_Poisson_loglikelihood(prompts, acq_model=am)``). Its prior, if any, is ignored by
        the EM quantities (they are STIR's "without penalty" ones) and removed from :meth:`log_likelihood`.
    acq_model : sirf.STIR.AcquisitionModel, optional
        The same model as inside the objective (any subclass: ray tracing, parallelproj, …, with its sensitivity
        model and additive/background terms). Needed only for :meth:`forward` / :meth:`backward` (SIRF has no
        getter for an objective's model).
    acq_data : sirf.STIR.AcquisitionData, optional
        The prompts inside the objective (for geometry checks and :meth:`backward` of tensors).
    image_template : sirf.STIR.ImageData, optional
        The image grid. If omitted, taken from ``acq_model.domain_geometry()`` (a set-up model) or from the
        first image converted by :meth:`to_tensor` (``reconstructor.set_up(image)``).
    num_subsets : int
        Initial number of view subsets.
    device : str or torch.device, optional
        Device of the tensors (``resolve_device``; SIRF itself computes on its own, CPU side).
    dtype : torch.dtype
        Tensor dtype (SIRF stores float32).
    """

    def __init__(self, objective: Any, *, acq_model: Any = None, acq_data: Any = None, image_template: Any = None,
                 num_subsets: int = 1, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        _require_objective(objective)
        self.objective = objective
        self.acq_model = acq_model
        self.acq_data = None
        self.device = resolve_device(device)
        self.dtype = dtype
        self._num_subsets = 1
        self._template = None
        self._dirty = True
        self._sens: dict[int | None, torch.Tensor] = {}
        self.set_up_count = 0
        warn_if_prior(objective)
        if acq_model is not None and sirf_kind(acq_model) != "AcquisitionModel":
            raise SirfObjectError(f"acq_model: expected a sirf.STIR AcquisitionModel, got a {sirf_kind(acq_model)}")
        if acq_data is not None:
            self._set_acq_data(acq_data, tell_objective=False)
        if image_template is None and acq_model is not None and model_is_set_up(acq_model):
            image_template = acq_model.img_templ  # the set-up template (what domain_geometry() wraps)
        if image_template is not None:
            self.set_template(image_template)
        self.set_num_subsets(num_subsets)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_objective(cls, obj: Any, **kwargs: Any) -> "SirfLogLikelihood":
        """Adapt a SIRF Poisson log-likelihood objective (the hook used by ``recon.base.as_datastep``).

        ``kwargs`` are those of :class:`SirfLogLikelihood` (``acq_model``, ``acq_data``, ``image_template``, …).
        """
        return cls(obj, **kwargs)

    @classmethod
    def from_acquisition_model(cls, acq_model: Any, acq_data: Any, *, image_template: Any = None,
                               stir: Any = None, **kwargs: Any) -> "SirfLogLikelihood":
        """Build the objective ``make_Poisson_loglikelihood(acq_data, acq_model=acq_model)`` and adapt it.

        ``stir`` defaults to the module that defines ``acq_model``'s class (``sirf.STIR``).
        """
        if sirf_kind(acq_model) != "AcquisitionModel":
            raise SirfObjectError(f"from_acquisition_model: first argument must be a sirf.STIR AcquisitionModel, "
                                  f"got a {sirf_kind(acq_model)}")
        if not _is_acq(acq_data):
            raise SirfObjectError(f"from_acquisition_model: acq_data must be sirf.STIR AcquisitionData (the "
                                  f"prompts), got a {sirf_kind(acq_data)}")
        check_pet(acq_data, "prompts")
        if stir is None:
            stir = _module_of(acq_model)
        factory = getattr(stir, "make_Poisson_loglikelihood", None)
        if factory is None:
            stir = import_sirf_stir()
            factory = stir.make_Poisson_loglikelihood
        obj = factory(acq_data, acq_model=acq_model)
        return cls(obj, acq_model=acq_model, acq_data=acq_data, image_template=image_template, **kwargs)

    # ------------------------------------------------------------------ template / prompts
    def set_template(self, image: Any) -> None:
        """Set the image grid (a SIRF ``ImageData``); the objective is set up on it before its next use."""
        if not _is_image(image):
            raise SirfObjectError(f"image template: expected a sirf.STIR ImageData, got a {sirf_kind(image)}")
        check_pet(image, "image template")
        if len(_dims(image)) != 3:
            raise GeometryMismatchError(f"image template must be 3-D (z, y, x), got dimensions {_dims(image)}")
        if self.acq_model is not None and model_is_set_up(self.acq_model):
            check_same_image_geometry(image, self.acq_model.img_templ, "image template",
                                      "the acquisition model's image domain (its set_up image)")
        self._template = image.clone()
        self._dirty = True

    @property
    def template(self) -> Any:
        if self._template is None:
            raise SirfNotReadyError("SirfLogLikelihood has no image template yet: pass image_template=..., set up the "
                                    "acquisition model, or call reconstructor.set_up(image) first")
        return self._template

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return tuple(_dims(self.template))  # type: ignore[return-value]

    def _set_acq_data(self, acq: Any, tell_objective: bool) -> None:
        if not _is_acq(acq):
            raise SirfObjectError(f"prompts: expected sirf.STIR AcquisitionData, got a {sirf_kind(acq)}")
        check_pet(acq, "prompts")
        if self.acq_data is not None:
            check_same_acq_geometry(acq, self.acq_data, "new prompts", "the objective's acquisition data")
        self._check_acq_vs_model(acq)
        if tell_objective and acq is not self.acq_data:
            self.objective.set_acquisition_data(acq)
            self._dirty = True
        self.acq_data = acq

    def _check_acq_vs_model(self, acq: Any) -> None:
        am = self.acq_model
        if am is None:
            return
        # SIRF keeps Python references to the set-up template and the terms (STIR.py:1588-1598, 1623, 1639, 1653)
        for attr, what in (("acq_templ", "the acquisition model's data template (its set_up data)"),
                           ("at", "the acquisition model's additive term"),
                           ("bt", "the acquisition model's background term")):
            other = getattr(am, attr, None)
            if other is not None:
                check_same_acq_geometry(acq, other, "prompts", what)

    def set_prompts(self, acq: Any) -> None:
        """Use ``acq`` as measured data (``reconstructor.set_input``): ``objective.set_acquisition_data(acq)``.

        The objective is set up again before its next use (STIR's sensitivities and data pointers are made at
        ``set_up``)."""
        self._set_acq_data(acq, tell_objective=True)

    # ------------------------------------------------------------------ subsets and set-up
    @property
    def num_subsets(self) -> int:
        return self._num_subsets

    def set_num_subsets(self, n: int) -> None:
        n = validate_num_subsets(n)
        if n != self._num_subsets:
            self._num_subsets = n
            self._dirty = True
            if n > 1 and is_parallelproj(self.acq_model):
                warnings.warn(
                    f"{n} subsets with AcquisitionModelUsingParallelproj: STIR's parallelproj projector projects "
                    f"every view for every subset (no view symmetries), so each sub-iteration costs a full "
                    f"projection and one iteration costs {n}x; for subsets use one acquisition model per subset on "
                    "prompts.get_subset(views), as PETRIC's main_OSEM.py does, or use 1 subset", stacklevel=2)
        self.objective.set_num_subsets(n)

    def _ensure_set_up(self) -> None:
        """(Re-)``set_up`` the objective on the template for the current subset count, once per change."""
        if not self._dirty:
            return
        template = self.template
        self.objective.set_num_subsets(self._num_subsets)
        self.objective.set_up(template)
        self.set_up_count += 1
        self._sens = {}
        self._dirty = False
        # geometry check: the objective's images must be on the template grid
        s0 = self.objective.get_subset_sensitivity(0)
        check_same_image_geometry(s0, template, "the objective's sensitivity image", "the image template")
        self._sens[0] = self._image_to_tensor(s0)

    def _subset(self, subset: int | None) -> int:
        if subset is None:
            return 0
        s = int(subset)
        if not 0 <= s < self._num_subsets:
            raise ValueError(f"subset {subset} out of range for {self._num_subsets} subsets")
        return s

    def _subsets(self, subset: int | None) -> list[int]:
        return list(range(self._num_subsets)) if subset is None else [self._subset(subset)]

    # ------------------------------------------------------------------ conversion
    def _image_to_tensor(self, image: Any) -> torch.Tensor:
        if getattr(image, "supports_array_view", False):
            arr = np.asarray(image.asarray())  # zero-copy view of SIRF's buffer
        else:
            arr = image.as_array()  # a copy
        # one copy onto the device: the tensor must not alias SIRF memory that may be freed
        return torch.from_numpy(np.ascontiguousarray(arr)).to(device=self.device, dtype=self.dtype, copy=True)

    def to_tensor(self, image: Any) -> torch.Tensor:
        """SIRF ``ImageData`` (or a tensor / ndarray of the image shape) → tensor ``(z, y, x)`` on the device.

        The first ``ImageData`` seen becomes the template when none was given.
        """
        if isinstance(image, torch.Tensor):
            t = image.to(device=self.device, dtype=self.dtype)
        elif isinstance(image, np.ndarray):
            t = torch.as_tensor(image, dtype=self.dtype, device=self.device)
        else:
            if not _is_image(image):
                raise SirfObjectError(f"expected a sirf.STIR ImageData, got a {sirf_kind(image)}")
            check_pet(image, "image")
            if self._template is None:
                self.set_template(image)
            else:
                check_same_image_geometry(image, self._template, "image", "the image template")
            return self._image_to_tensor(image)
        if tuple(t.shape) != self.image_shape:
            raise GeometryMismatchError(f"image tensor shape {tuple(t.shape)} != image template {self.image_shape}")
        return t

    def from_tensor(self, tensor: torch.Tensor, template: Any | None = None) -> Any:
        """Tensor ``(z, y, x)`` → a new SIRF ``ImageData``: a clone of ``template`` (default: the PoissonLogLikelihood's)
        filled with the values, so its geometry, voxel sizes and modality are the template's."""
        tpl = self.template if template is None else template
        if not _is_image(tpl):
            raise SirfObjectError(f"from_tensor: template must be a sirf.STIR ImageData, got a {sirf_kind(tpl)}")
        arr = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
        if tuple(arr.shape) != _dims(tpl):
            raise GeometryMismatchError(f"from_tensor: tensor shape {tuple(arr.shape)} != template dimensions "
                                        f"{_dims(tpl)}")
        out = tpl.clone()
        out.fill(arr)
        return out

    # ------------------------------------------------------------------ EM quantities (objective)
    def sensitivity(self, subset: int | None = None) -> torch.Tensor:
        """``obj.get_subset_sensitivity(s)`` (cached until the subset count or data change); ``None``: the sum."""
        self._ensure_set_up()
        key = None if subset is None else self._subset(subset)
        if key not in self._sens:
            if key is None:
                self._sens[None] = sum(self.sensitivity(s) for s in range(self._num_subsets))  # type: ignore[assignment]
            else:
                self._sens[key] = self._image_to_tensor(self.objective.get_subset_sensitivity(key))
        return self._sens[key]

    def backprojected_ratio(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """EM numerator ``obj.get_backprojection_of_acquisition_ratio(image(x), s)`` (summed when ``None``)."""
        self._ensure_set_up()
        image = self.from_tensor(x)
        total = None
        for s in self._subsets(subset):
            t = self._image_to_tensor(self.objective.get_backprojection_of_acquisition_ratio(image, s))
            total = t if total is None else total + t
        return total  # type: ignore[return-value]

    def value(self, x: torch.Tensor, subset: int | None = None) -> float:
        """``obj.value(image)`` plus the prior's value if the objective has one (so: the Poisson term only).

        STIR's objective value is ``Σ y log ŷ − ŷ − penalty`` (``GeneralisedObjectiveFunction::
        compute_objective_function``); the data term is computed with STIR's truncation (``accumulate_loglikelihood``,
        ``recon_array_functions.cxx:336-377``)."""
        self._ensure_set_up()
        image = self.from_tensor(x)
        v = float(self.objective.value(image))
        prior = objective_prior(self.objective)
        if prior is not None:
            v += float(prior.get_value(image) if hasattr(prior, "get_value") else prior.value(image))
        return v

    # ------------------------------------------------------------------ operators (acquisition model)
    def _model(self) -> Any:
        if self.acq_model is None:
            raise SirfNotReadyError(
                "forward/backward need the acquisition model, which a SIRF objective does not expose: use "
                "SirfLogLikelihood.from_acquisition_model(acq_model, prompts) or SirfLogLikelihood.from_objective(obj, "
                "acq_model=acq_model)")
        if not model_is_set_up(self.acq_model):
            raise SirfNotReadyError(
                "forward/backward: the acquisition model was never set up (its acq_templ/img_templ are None and "
                "SIRF's range/domain geometries are null handles): call acq_model.set_up(prompts, image) first "
                "(the objective function does not set the model up)")
        return self.acq_model

    def forward(self, x: torch.Tensor, subset: int | None = None) -> Any:
        """``acq_model.forward(image, subset_num=s, num_subsets=S)``: a full-size SIRF ``AcquisitionData``.

        The subset's views hold ``S (G x + a) + b``; every other view holds ``S a + b`` (not 0): SIRF zeroes the
        data, projects the subset's views, then adds ``a``, applies ``S`` and adds ``b`` over all views
        (``SyneRBI/SIRF: src/xSTIR/cSTIR/stir_x.cpp:520-566``). Without a subset: ``S (G x + a) + b``."""
        am = self._model()
        image = self.from_tensor(x)
        if subset is None:
            return am.forward(image, subset_num=0, num_subsets=1)
        return am.forward(image, subset_num=self._subset(subset), num_subsets=self._num_subsets)

    def backward(self, y: Any, subset: int | None = None) -> torch.Tensor:
        """``acq_model.backward(ad, subset_num=s, num_subsets=S)`` (``P' Gᵀ S y``) as a tensor.

        ``y`` is SIRF ``AcquisitionData`` or a tensor/ndarray of its full shape (put into a clone of the prompts).
        """
        am = self._model()
        if isinstance(y, (torch.Tensor, np.ndarray)):
            if self.acq_data is None:
                raise SirfNotReadyError("backward of a tensor needs acq_data (the prompts) as template")
            arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if tuple(arr.shape) != _dims(self.acq_data):
                raise GeometryMismatchError(f"backward: array shape {tuple(arr.shape)} != acquisition data "
                                            f"{_dims(self.acq_data)}")
            ad = self.acq_data.clone()
            ad.fill(arr)
        elif _is_acq(y):
            if self.acq_data is not None:
                check_same_acq_geometry(y, self.acq_data, "backward: the data", "the prompts")
            ad = y
        else:
            raise SirfObjectError(f"backward: expected sirf.STIR AcquisitionData or a tensor, got a {sirf_kind(y)}")
        if subset is None:
            img = am.backward(ad, subset_num=0, num_subsets=1)
        else:
            img = am.backward(ad, subset_num=self._subset(subset), num_subsets=self._num_subsets)
        return self._image_to_tensor(img)

    def __repr__(self) -> str:
        shape = _dims(self._template) if self._template is not None else None
        tof = num_tof_bins(self.acq_data) if self.acq_data is not None else None
        return (f"SirfLogLikelihood(objective={type(self.objective).__name__}, image_shape={shape}, "
                f"num_subsets={self._num_subsets}, tof_bins={tof}, device={self.device})")


def model_is_set_up(acq_model: Any) -> bool:
    """Whether a SIRF acquisition model was ``set_up``: SIRF sets ``acq_templ``/``img_templ`` there
    (``STIR.py:1623-1624``; None before, when ``range_geometry()``/``domain_geometry()`` are null handles)."""
    return getattr(acq_model, "acq_templ", None) is not None and getattr(acq_model, "img_templ", None) is not None


def is_parallelproj(acq_model: Any) -> bool:
    """Whether ``acq_model`` is SIRF's ``AcquisitionModelUsingParallelproj`` (by class name, along its MRO)."""
    return acq_model is not None and any(c.__name__ == "AcquisitionModelUsingParallelproj"
                                         for c in type(acq_model).__mro__)


def set_image_data_processor(acq_model: Any, processor: Any) -> None:
    """``acq_model.set_image_data_processor(processor)`` with a warning for parallelproj.

    SIRF puts the processor into both the forward and the back projector (``stir_x.cpp:510-517``), a matched
    pair, except with parallelproj, which ignores it (SyneRBI/SIRF#1324, open in 3.10), so that model would
    not include the resolution model at all. SIRF keeps no Python reference to the processor, which is why the
    adapter cannot see one that was set directly.
    """
    if is_parallelproj(acq_model):
        warnings.warn("AcquisitionModelUsingParallelproj ignores the image data processor (SyneRBI/SIRF#1324): the "
                      "model has no resolution modelling; use AcquisitionModelUsingRayTracingMatrix for it",
                      stacklevel=2)
    acq_model.set_image_data_processor(processor)


def objective_prior(objective: Any) -> Any:
    """The prior of a SIRF objective, or None.

    ``set_prior`` stores ``objective.prior`` (``STIR.py:2379-2385``); a prior set on the C++ side (a ``.par`` file,
    another wrapper) is reached through ``get_prior()``, which wraps a null pointer when there is none
    (``STIR.py:2387-2391``): a prior whose penalisation factor cannot be read, or is 0, counts as none.
    """
    prior = getattr(objective, "prior", None)
    if prior is None and hasattr(objective, "get_prior"):
        try:
            prior = objective.get_prior()
            if float(prior.get_penalisation_factor()) == 0.0:
                prior = None
        except Exception:  # noqa: BLE001 - null handle: no prior
            prior = None
    return prior


def warn_if_prior(objective: Any) -> None:
    """Warn that sirf_ddip's EM steps ignore a prior set on the SIRF objective."""
    prior = objective_prior(objective)
    if prior is not None:
        warnings.warn("the SIRF objective has a prior: sirf_ddip's OSEM/DDIP data steps use the Poisson term only "
                      "(STIR's 'without penalty' quantities); the prior is ignored", stacklevel=2)
