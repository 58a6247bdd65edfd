"""IterativeReconstructor: the SIRF-style surface shared by OSEM and DDIP, with CIL-style ``run``.

The surface follows ``sirf.STIR.IterativeReconstructor`` / ``OSMAPOSLReconstructor`` of SIRF 3.10
(``SyneRBI/SIRF: src/xSTIR/pSTIR/STIR.py`` lines 2678-2945, ``src/xSTIR/cSTIR/cstir.cpp`` 1120-1172,
``include/sirf/STIR/stir_x.h`` 1261-1287) and the loop of STIR 6.4's ``IterativeReconstruction``
(``UCL/STIR: src/recon_buildblock/IterativeReconstruction.cxx``), so that a SIRF script runs unchanged:

======================================  =====================================================================
call                                    behaviour (and where SIRF/STIR define it)
======================================  =====================================================================
``set_objective_function(obj)``         a PoissonLogLikelihood or a sirf.STIR Poisson log-likelihood (STIR.py:2842)
``set_input(acq)``                      needs the objective first, as STIR ("objective function needs to be set
                                        before calling set_input_data", IterativeReconstruction.cxx:615)
``set_up(image)``                       ``image`` is the geometry template; sub-iteration number becomes 1
                                        (``recon.subiteration() = get_start_subiteration_num()``,
                                        cstir.cpp:1130; ``start_subiteration_num = 1``,
                                        IterativeReconstruction.cxx:62); ``save_interval`` must lie in
                                        ``1..num_subiterations`` (IterativeReconstruction.cxx:471)
``set_current_estimate(image)``         holds a *copy* (``self.image = image.clone()``, STIR.py:2868-2874)
``get_current_estimate()``              a copy (STIR.py:2886-2889)
``update_current_estimate()``           one sub-iteration on the held estimate, then the save-interval output,
                                        then ``subiteration_num++`` (stir_x.h:1270-1273)
``update(image)``                       holds ``image`` itself (no copy), updates it **in place** and returns it
                                        (STIR.py:2911-2921)
``process()``                           **all** ``num_subiterations`` from sub-iteration 1 on the held estimate
                                        (``for (subiteration_num = start_subiteration_num; ...)``,
                                        IterativeReconstruction.cxx:414), whatever ran before
``reconstruct(image)``                  the same on ``image`` in place; holds ``image`` and returns None
                                        (STIR.py:2703-2707). SIRF needs a prior ``set_up`` (the C++
                                        ``reconstruct`` does not set up: ``#if 0``, IterativeReconstruction.cxx
                                        406-412); here a missing set-up is done on ``image``
``get_subiteration_num()``              STIR's ``subiteration_num``: 1 after ``set_up``, ``k + 1`` after ``k``
                                        updates, ``num_subiterations + 1`` after ``process()``
sub-iteration ``k`` (1-based) subset    ``(k - 1) mod S`` (``get_subset_num``, IterativeReconstruction.cxx:638)
``set_current_subset_num(s)``           only chooses the subset of ``get_subset_sensitivity()``: SIRF stores it in
                                        a Python attribute that no update reads (STIR.py:2898-2909), so it does
                                        **not** change the next update's subset (its docstring says otherwise)
``set_save_interval(n)``                ``n > 0`` enables output, ``n <= 0`` disables it (STIR.py:2826-2836);
                                        ``<prefix>_<k>.hv`` is written after sub-iteration ``k`` when
                                        ``k % n == 0`` or ``k == num_subiterations`` (IterativeReconstruction.cxx
                                        568-571, name from ``make_filename_prefix_subiteration_num``, 335-340)
``set_output_filename_prefix(p)``       the prefix (STIR.py:2691). Difference: STIR also writes with an empty
                                        prefix (files ``_<k>.hv`` in the working folder); we write only when a
                                        prefix was given
``set_maximum/minimum_relative_change`` OSMAPOSL's bounds of the multiplicative update, from sub-iteration 2 on
                                        (OSMAPOSLReconstruction.cxx:491-507); applied by OSEM, recorded (with a
                                        warning) by reconstructors that have no multiplicative update
======================================  =====================================================================

CIL's ``Algorithm`` surface (``iteration``, ``run(iterations, callbacks)``, ``self.x``) is here too, on tensors;
:mod:`sirf_ddip.recon.cil` wraps a reconstructor as a real CIL ``Algorithm`` whose ``x`` is a SIRF image.
Subclasses implement :meth:`_set_up` and :meth:`_update` on tensors; everything backend-specific goes through
the :class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood`.
"""

from __future__ import annotations

import abc
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import ConfigError, SirfDdipError
from .callbacks import Callback, ProgressCallback, as_callback
from ..physics.likelihood import PoissonLogLikelihood
from ..physics.subsets import validate_num_subsets

#: STIR's default ``maximum relative change`` (``NumericInfo<float>().max_value()``, OSMAPOSLReconstruction.cxx:98)
FLT_MAX = float(np.finfo(np.float32).max)


def as_datastep(obj: Any) -> PoissonLogLikelihood:
    """Adapt an objective function to a :class:`PoissonLogLikelihood`.

    Accepts a :class:`PoissonLogLikelihood` (returned as is) or a SIRF ``PoissonLogLikelihoodWithLinearModelForMean...``
    objective (real ``sirf.STIR`` or API-compatible), adapted by :mod:`sirf_ddip.backends.sirf`.

    Layering: ``recon`` sits above ``backends`` and may import it; the import is inside this function so that
    ``import sirf_ddip.recon`` never loads the SIRF adapter (nor SIRF) for engine-only use, and so that no import
    cycle can form while the adapter still imports the PoissonLogLikelihood base from ``recon`` (the base moves to
    ``physics/`` with the likelihood interface, after which ``backends`` no longer imports ``recon``).
    """
    if isinstance(obj, PoissonLogLikelihood):
        return obj
    if hasattr(obj, "get_subset_sensitivity") or hasattr(obj, "get_backprojection_of_acquisition_ratio") \
            or hasattr(obj, "set_acquisition_model"):
        from ..backends.sirf import SirfLogLikelihood  # noqa: PLC0415 - lazy by design (see docstring)

        return SirfLogLikelihood.from_objective(obj)
    raise TypeError(
        f"cannot use a {type(obj).__module__}.{type(obj).__name__} as objective function: expected a "
        "sirf_ddip PoissonLogLikelihood (e.g. sirf_ddip.physics.model.EngineLogLikelihood) or a sirf.STIR Poisson log-likelihood "
        "objective (make_Poisson_loglikelihood)")


class NotSetUpError(SirfDdipError, RuntimeError):
    """A reconstructor method was called before ``set_up``."""


class IterativeReconstructor(abc.ABC):
    """Common state and SIRF/CIL surface of the iterative reconstructors (see the module docstring).

    Attributes
    ----------
    x : torch.Tensor or None
        The current estimate ``(nz, ny, nx)`` in activity units, on the data step's device.
    iteration : int
        Updates done since ``set_up`` or the start of the last ``process()`` (CIL's counter); STIR's
        sub-iteration number is ``iteration + 1`` (:meth:`get_subiteration_num`).
    """

    #: whether :meth:`set_maximum_relative_change` / :meth:`set_minimum_relative_change` act on the update
    _APPLIES_RELATIVE_CHANGE = False

    def __init__(self) -> None:
        self._objective: Any = None
        self._data_step: PoissonLogLikelihood | None = None
        self._input: Any = None
        self._num_subsets = 1
        self._num_subiterations = 1
        self._template: Any = None
        self._template_tensor: torch.Tensor | None = None
        self._output_prefix: str | None = None
        self._output_enabled = True  # STIR: Reconstruction::set_defaults, _disable_output = false
        self._save_interval = 1      # STIR: IterativeReconstruction::set_defaults, save_interval = 1 (line 67)
        self._current_subset = 0     # SIRF: IterativeReconstructor.__init__, self.subset = 0 (STIR.py:2784)
        self._max_relative_change = FLT_MAX
        self._min_relative_change = 0.0
        self._held: Any = None       # the image that update(image) / reconstruct(image) update in place
        self.x: torch.Tensor | None = None
        self.iteration = 0
        self.configured = False

    # ------------------------------------------------------------------ objective / data
    def set_objective_function(self, obj: Any) -> None:
        """Set the objective (a PoissonLogLikelihood or a sirf.STIR Poisson log-likelihood)."""
        self._data_step = as_datastep(obj)
        self._objective = obj
        self.configured = False

    def get_objective_function(self) -> Any:
        return self._objective

    @property
    def data_step(self) -> PoissonLogLikelihood:
        if self._data_step is None:
            raise NotSetUpError(f"{type(self).__name__}: call set_objective_function(...) first")
        return self._data_step

    def set_input(self, acq: Any) -> None:
        """Set the measured data (prompts): ``objective.set_acquisition_data(acq)`` through the data step.

        Raises
        ------
        NotSetUpError
            No objective function yet: STIR refuses this too ("objective function needs to be set before calling
            set_input_data", ``IterativeReconstruction.cxx:615``), so data are never stored and then ignored.
        ConfigError
            The objective (a PoissonLogLikelihood without ``set_prompts``) cannot take new data.
        """
        if self._data_step is None:
            raise NotSetUpError(f"{type(self).__name__}.set_input: the objective function needs to be set before "
                                "calling set_input (call set_objective_function(obj) first; SIRF/STIR raise the "
                                "same error)")
        setter = getattr(self._data_step, "set_prompts", None)
        if setter is None:
            raise ConfigError(f"{type(self).__name__}.set_input: the objective "
                              f"{type(self._data_step).__name__} does not accept new measured data")
        setter(acq)
        self._input = acq
        self.configured = False  # STIR: set_input_data sets _already_set_up = false (IterativeReconstruction.cxx:613)

    # ------------------------------------------------------------------ subsets / sub-iterations
    def set_num_subsets(self, n: int) -> None:
        n = validate_num_subsets(n)
        self._num_subsets = n
        self.configured = False

    def get_num_subsets(self) -> int:
        return self._num_subsets

    def set_num_subiterations(self, n: int) -> None:
        n = int(n)
        if n < 0:
            raise ValueError(f"num_subiterations must be >= 0, got {n}")
        self._num_subiterations = n

    def get_num_subiterations(self) -> int:
        return self._num_subiterations

    def get_subiteration_num(self) -> int:
        """STIR's current sub-iteration number: 1 after ``set_up``, ``k + 1`` after ``k`` updates (0 before set-up).

        ``xSTIR_IterativeReconstruction3DF::update`` increments it after each update (stir_x.h:1270-1273) and
        ``set_up`` sets it to the start number 1 (cstir.cpp:1130); ``process()`` leaves ``num_subiterations + 1``.
        """
        return self.iteration + 1 if self.configured else 0

    def get_subset_num(self, iteration: int | None = None) -> int:
        """Subset of the update after ``iteration`` updates (0-based; STIR: ``(subiteration_num - 1) mod S``)."""
        it = self.iteration if iteration is None else iteration
        return it % self._num_subsets

    def set_current_subset_num(self, subset: int) -> None:
        """The subset that :meth:`get_subset_sensitivity` returns (as SIRF: it does not change the update order)."""
        s = int(subset)
        if not 0 <= s < self._num_subsets:
            raise ValueError(f"subset {subset} out of range for {self._num_subsets} subsets")
        self._current_subset = s

    def get_subset_sensitivity(self, subset: int | None = None):
        """Sensitivity of ``subset`` (default: the one of :meth:`set_current_subset_num`), as a backend image."""
        s = self._current_subset if subset is None else int(subset)
        return self.data_step.from_tensor(self.data_step.sensitivity(s if self._num_subsets > 1 else None),
                                          self._template)

    def set_maximum_relative_change(self, value: float) -> None:
        """OSMAPOSL: upper bound of the multiplicative update from sub-iteration 2 on (default FLT_MAX)."""
        self._max_relative_change = float(value)
        self._warn_relative_change("maximum")

    def set_minimum_relative_change(self, value: float) -> None:
        """OSMAPOSL: lower bound of the multiplicative update from sub-iteration 2 on (default 0)."""
        self._min_relative_change = float(value)
        self._warn_relative_change("minimum")

    def _warn_relative_change(self, which: str) -> None:
        if not self._APPLIES_RELATIVE_CHANGE:
            warnings.warn(f"{type(self).__name__}: set_{which}_relative_change is OSMAPOSL's bound on its "
                          "multiplicative update; this reconstructor has none, so the value is recorded only",
                          stacklevel=3)

    # ------------------------------------------------------------------ output options (SIRF)
    def set_output_filename_prefix(self, prefix: str) -> None:
        """Write ``<prefix>_<k>.hv`` at the save interval (STIR's naming; see :meth:`set_save_interval`)."""
        self._output_prefix = str(prefix) if prefix else None

    def disable_output(self) -> None:
        self._output_enabled = False

    def enable_output(self) -> None:
        self._output_enabled = True

    def set_save_interval(self, n: int) -> None:
        """Save every ``n``-th sub-iteration and the last one; ``n <= 0`` disables output (SIRF STIR.py:2826)."""
        n = int(n)
        if n > 0:
            self.enable_output()
        else:
            self.disable_output()
        self._save_interval = n

    def get_save_interval(self) -> int:
        return self._save_interval

    def _output_path(self, subiteration: int) -> Path | None:
        """``<prefix>_<k>.hv`` if sub-iteration ``k`` is to be saved, else None (IterativeReconstruction.cxx:568)."""
        if not self._output_enabled or self._output_prefix is None or self._save_interval <= 0:
            return None
        if subiteration % self._save_interval and subiteration != self._num_subiterations:
            return None
        return Path(f"{self._output_prefix}_{subiteration}.hv")

    def _save_estimate(self, path: Path) -> None:
        """Write the current estimate to ``path`` (SIRF images: ``write``; engine images: Interfile writer)."""
        image = self.data_step.from_tensor(self._output_tensor(), self._template)
        if path.parent and not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        if hasattr(image, "write"):
            image.write(str(path))
        else:
            from ..io import write_image  # noqa: PLC0415 - engine images only

            write_image(path, image, overwrite=True)

    # ------------------------------------------------------------------ set-up / estimate
    def set_up(self, image: Any) -> None:
        """Set up for images like ``image`` (a geometry template): subsets, sensitivities, networks.

        Raises
        ------
        ConfigError
            Output is enabled with a save interval outside ``1..num_subiterations`` (STIR refuses it,
            IterativeReconstruction.cxx:471).
        """
        ds = self.data_step
        ds.set_num_subsets(self._num_subsets)
        self._template = image
        template = ds.to_tensor(image)
        if tuple(template.shape) != tuple(ds.image_shape):
            raise ValueError(f"set_up: image shape {tuple(template.shape)} != data step image shape {ds.image_shape}")
        self._template_tensor = template
        self._set_up(template)
        n = self.get_num_subiterations()
        if self._output_enabled and self._output_prefix is not None and not 1 <= self._save_interval <= max(n, 1):
            raise ConfigError(f"{type(self).__name__}: save interval {self._save_interval} must be in 1.."
                              f"{n} (num_subiterations), as STIR requires")
        self.iteration = 0
        self.configured = True

    def _require_setup(self) -> None:
        if not self.configured:
            raise NotSetUpError(f"{type(self).__name__}: call set_up(image) first")

    def set_current_estimate(self, image: Any) -> None:
        """Hold a copy of ``image`` as the current estimate (SIRF clones it)."""
        self._require_setup()
        x = self.data_step.to_tensor(image).detach().clone()
        if tuple(x.shape) != tuple(self.data_step.image_shape):
            raise ValueError(f"set_current_estimate: image shape {tuple(x.shape)} != {self.data_step.image_shape}")
        self._held = None
        self.x = self._initialise_estimate(x)

    def _initialise_estimate(self, x: torch.Tensor) -> torch.Tensor:
        """Hook for subclasses (e.g. positivity); default: unchanged."""
        return x

    def get_current_estimate(self) -> Any:
        """A copy of the current estimate, as a backend image."""
        if self.x is None:
            raise NotSetUpError(f"{type(self).__name__}: no current estimate (call set_current_estimate)")
        return self.data_step.from_tensor(self.x.detach().clone(), self._template)

    def _output_tensor(self) -> torch.Tensor:
        """The result as a tensor (subclasses: post-filtered, x̂0, ...); default the current estimate."""
        if self.x is None:
            raise NotSetUpError(f"{type(self).__name__}: no current estimate (call set_current_estimate)")
        return self.x.detach()

    def get_output(self) -> Any:
        """A copy of the result (the current estimate; OSEM post-filters it, DDIP returns its final x̂0)."""
        return self.data_step.from_tensor(self._output_tensor().clone(), self._template)

    # ------------------------------------------------------------------ iterating
    @abc.abstractmethod
    def _set_up(self, template: torch.Tensor) -> None:
        """Subclass set-up on a template tensor."""

    @abc.abstractmethod
    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """One sub-iteration / diffusion step from ``x``; return the new estimate."""

    def progress_info(self) -> dict[str, Any]:
        """Short status for progress bars and logs."""
        return {}

    def update_current_estimate(self) -> None:
        """One sub-iteration (OSEM) / diffusion step (DDIP) on the held estimate, then the save-interval output."""
        self._require_setup()
        if self.x is None:
            raise NotSetUpError(f"{type(self).__name__}: call set_current_estimate(image) first")
        self.x = self._update(self.x)
        self.iteration += 1
        self._after_update()

    def _after_update(self) -> None:
        """STIR's ``end_of_iteration_processing``: the in-place image and the save-interval file."""
        if self._held is not None:
            fill_in_place(self._held, self.x)
        path = self._output_path(self.iteration)
        if path is not None:
            self._save_estimate(path)

    def update(self, image: Any) -> Any:
        """SIRF ``update(image)``: one sub-iteration on ``image`` itself, updated **in place** and returned.

        ``image`` stays the held estimate (SIRF does not clone it, STIR.py:2911-2921), so later
        ``update_current_estimate()`` calls keep updating it; ``set_current_estimate`` ends that.
        """
        self._require_setup()
        # SIRF updates the image's own data, so changes a script made to it since the last update count
        x = self.data_step.to_tensor(image).detach().clone()
        if tuple(x.shape) != tuple(self.data_step.image_shape):
            raise ValueError(f"update: image shape {tuple(x.shape)} != {self.data_step.image_shape}")
        self.x = self._initialise_estimate(x)
        self._held = image
        self.update_current_estimate()
        return image

    def remaining(self) -> int:
        return max(0, self._num_subiterations - self.iteration)

    def _prepare_process(self) -> None:
        """Before ``process()``: back to sub-iteration 1 (STIR's loop always starts there)."""
        self.iteration = 0

    def process(self, callbacks: Iterable[Any] | None = None, progress: bool = True) -> None:
        """All ``num_subiterations`` sub-iterations from sub-iteration 1 on the held estimate (as SIRF/STIR).

        A second ``set_current_estimate(b); process()`` (the next frame or gate) therefore runs in full again.
        """
        self._require_setup()
        self._prepare_process()
        cbs = list(callbacks or [])
        if progress and not any(isinstance(c, ProgressCallback) for c in cbs):
            cbs.insert(0, ProgressCallback())
        self.run(self.remaining(), callbacks=cbs)

    def reconstruct(self, image: Any) -> None:
        """SIRF ``reconstruct(image)``: all sub-iterations from ``image``, written into ``image`` in place.

        SIRF needs a prior ``set_up`` (STIR's ``reconstruct`` does not set up); a reconstructor that was not set up
        is set up on ``image`` first (a superset: a SIRF script never relies on the error). ``image`` becomes the
        held estimate; returns None, as SIRF (``get_output()`` gives a copy of the result).
        """
        if not self.configured:
            self.set_up(image)
        self.set_current_estimate(image)
        self.process(progress=False)
        fill_in_place(image, self._output_tensor())
        self._held = image

    def run(self, iterations: int | float | None = None, callbacks: Iterable[Any] | None = None,
            verbose: int = 0) -> None:
        """CIL-style loop: ``iterations`` more updates (``math.inf`` allowed: a callback must stop it).

        Each callback is called with this object after every update and may raise ``StopIteration``.
        """
        self._require_setup()
        if iterations is None:
            iterations = self.remaining()
        cbs: list[Callback] = [as_callback(c) for c in (callbacks or [])]
        if verbose and not any(isinstance(c, ProgressCallback) for c in cbs):
            cbs.insert(0, ProgressCallback())
        total = None if math.isinf(iterations) else int(iterations)
        for c in cbs:
            c.on_start(self, total)
        done = 0
        try:
            while done < iterations:
                self.update_current_estimate()
                done += 1
                for c in cbs:
                    c(self)
        except StopIteration:
            pass
        finally:
            for c in cbs:
                c.on_end(self)


def fill_in_place(image: Any, tensor: torch.Tensor) -> None:
    """Write ``tensor`` into the backend image ``image`` itself (SIRF ``fill``, a numpy array, an engine image).

    Raises
    ------
    TypeError
        ``image`` cannot be written in place.
    """
    if isinstance(image, np.ndarray):  # before ``fill``: numpy's fill takes a scalar only
        image[...] = tensor.detach().cpu().numpy().reshape(image.shape)
        return
    if isinstance(image, torch.Tensor):
        with torch.no_grad():
            image.copy_(tensor.reshape(image.shape))
        return
    arr = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
    if hasattr(image, "fill"):  # SIRF DataContainer.fill(ndarray)
        image.fill(arr)
    elif isinstance(getattr(image, "array", None), np.ndarray):
        image.array[...] = arr.reshape(image.array.shape)
    else:
        raise TypeError(f"cannot update a {type(image).__name__} in place")
