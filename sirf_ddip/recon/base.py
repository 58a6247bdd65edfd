"""IterativeReconstructor: the SIRF-style surface shared by OSEM and DDIP, with CIL-style ``run``.

It mirrors ``sirf.STIR.IterativeReconstructor`` (``set_objective_function``, ``set_input``, ``set_num_subsets``,
``set_num_subiterations``, ``set_up``, ``set_current_estimate`` (clones), ``get_current_estimate`` (clone),
``process``, ``update_current_estimate``, ``update``, ``reconstruct``, ``get_output`` (clone)) and CIL's
``Algorithm`` (``iteration``, ``run(iterations, callbacks)``, ``self.x``).  Subclasses implement
:meth:`_set_up` and :meth:`_update` on tensors; everything backend-specific goes through the
:class:`~sirf_ddip.recon.datastep.DataStep`.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Iterable

import torch

from ..errors import SirfDdipError
from .callbacks import Callback, ProgressCallback, as_callback
from .datastep import DataStep, validate_num_subsets


def as_datastep(obj: Any) -> DataStep:
    """Adapt an objective function to a :class:`DataStep`.

    Accepts a :class:`DataStep` (returned as is) or a SIRF ``PoissonLogLikelihoodWithLinearModelForMean...``
    objective (real ``sirf.STIR`` or API-compatible), adapted by :mod:`sirf_ddip.backends.sirf` (imported lazily).
    """
    if isinstance(obj, DataStep):
        return obj
    if hasattr(obj, "get_subset_sensitivity") and hasattr(obj, "get_backprojection_of_acquisition_ratio"):
        from ..backends.sirf import SirfDataStep

        return SirfDataStep.from_objective(obj)
    raise TypeError(
        f"cannot use a {type(obj).__module__}.{type(obj).__name__} as objective function: expected a "
        "sirf_ddip DataStep (e.g. sirf_ddip.physics.model.EngineDataStep) or a sirf.STIR Poisson log-likelihood "
        "objective (make_Poisson_loglikelihood)")


class NotSetUpError(SirfDdipError, RuntimeError):
    """A reconstructor method was called before ``set_up``."""


class IterativeReconstructor(abc.ABC):
    """Common state and SIRF/CIL surface of the iterative reconstructors.

    Attributes
    ----------
    x : torch.Tensor or None
        The current estimate ``(nz, ny, nx)`` in activity units, on the data step's device.
    iteration : int
        Sub-iterations (OSEM) or diffusion steps (DDIP) done so far.
    """

    def __init__(self) -> None:
        self._objective: Any = None
        self._data_step: DataStep | None = None
        self._input: Any = None
        self._num_subsets = 1
        self._num_subiterations = 1
        self._template: Any = None
        self._output_prefix: str | None = None
        self._output_enabled = False
        self.x: torch.Tensor | None = None
        self.iteration = 0
        self.configured = False

    # ------------------------------------------------------------------ objective / data
    def set_objective_function(self, obj: Any) -> None:
        """Set the objective (a DataStep or a sirf.STIR Poisson log-likelihood)."""
        self._objective = obj
        self._data_step = as_datastep(obj)
        self.configured = False

    def get_objective_function(self) -> Any:
        return self._objective

    @property
    def data_step(self) -> DataStep:
        if self._data_step is None:
            raise NotSetUpError(f"{type(self).__name__}: call set_objective_function(...) first")
        return self._data_step

    def set_input(self, acq: Any) -> None:
        """Set the measured data (prompts). Forwarded to the data step when it accepts new data."""
        self._input = acq
        if self._data_step is not None and hasattr(self._data_step, "set_prompts"):
            self._data_step.set_prompts(acq)

    # ------------------------------------------------------------------ subsets
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
        """Number of sub-iterations done so far (SIRF counts from 1 after the first)."""
        return self.iteration

    def get_subset_num(self, iteration: int | None = None) -> int:
        """Subset used by sub-iteration ``iteration`` (0-based; STIR order 0, 1, …, S−1, 0, …)."""
        it = self.iteration if iteration is None else iteration
        return it % self._num_subsets

    def get_subset_sensitivity(self, subset: int | None = None):
        """The current (or given) subset's sensitivity, as a backend image."""
        s = self.get_subset_num() if subset is None else subset
        return self.data_step.from_tensor(self.data_step.sensitivity(s), self._template)

    # ------------------------------------------------------------------ output options (SIRF)
    def set_output_filename_prefix(self, prefix: str) -> None:
        self._output_prefix = prefix
        self._output_enabled = True

    def disable_output(self) -> None:
        self._output_enabled = False

    def enable_output(self) -> None:
        self._output_enabled = self._output_prefix is not None

    # ------------------------------------------------------------------ set-up / estimate
    def set_up(self, image: Any) -> None:
        """Set up for images like ``image`` (a geometry template): subsets, sensitivities, networks."""
        ds = self.data_step
        ds.set_num_subsets(self._num_subsets)
        self._template = image
        template = ds.to_tensor(image)
        if tuple(template.shape) != tuple(ds.image_shape):
            raise ValueError(f"set_up: image shape {tuple(template.shape)} != data step image shape {ds.image_shape}")
        self._set_up(template)
        self.iteration = 0
        self.configured = True

    def _require_setup(self) -> None:
        if not self.configured:
            raise NotSetUpError(f"{type(self).__name__}: call set_up(image) first")

    def set_current_estimate(self, image: Any) -> None:
        """Use a copy of ``image`` as the current estimate."""
        self._require_setup()
        x = self.data_step.to_tensor(image).detach().clone()
        if tuple(x.shape) != tuple(self.data_step.image_shape):
            raise ValueError(f"set_current_estimate: image shape {tuple(x.shape)} != {self.data_step.image_shape}")
        self.x = self._initialise_estimate(x)

    def _initialise_estimate(self, x: torch.Tensor) -> torch.Tensor:
        """Hook for subclasses (e.g. positivity); default: unchanged."""
        return x

    def get_current_estimate(self) -> Any:
        """A copy of the current estimate, as a backend image."""
        if self.x is None:
            raise NotSetUpError(f"{type(self).__name__}: no current estimate (call set_current_estimate)")
        return self.data_step.from_tensor(self.x.detach().clone(), self._template)

    def get_output(self) -> Any:
        """A copy of the result (the current estimate; DDIP returns its final x̂0)."""
        return self.get_current_estimate()

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
        """One sub-iteration (OSEM) / diffusion step (DDIP) on the held estimate."""
        self._require_setup()
        if self.x is None:
            raise NotSetUpError(f"{type(self).__name__}: call set_current_estimate(image) first")
        self.x = self._update(self.x)
        self.iteration += 1

    def update(self, image: Any) -> Any:
        """SIRF ``update(image)``: one sub-iteration starting from ``image``; returns the new estimate."""
        self.set_current_estimate(image)
        self.update_current_estimate()
        return self.get_current_estimate()

    def remaining(self) -> int:
        return max(0, self._num_subiterations - self.iteration)

    def process(self, callbacks: Iterable[Any] | None = None, progress: bool = True) -> None:
        """Run the remaining sub-iterations (up to ``num_subiterations``)."""
        cbs = list(callbacks or [])
        if progress and not any(isinstance(c, ProgressCallback) for c in cbs):
            cbs.insert(0, ProgressCallback())
        self.run(self.remaining(), callbacks=cbs)

    def reconstruct(self, image: Any) -> Any:
        """Set up on ``image``, start from it, run ``process()``; returns the output."""
        if not self.configured:
            self.set_up(image)
        self.set_current_estimate(image)
        self.process()
        return self.get_output()

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
