"""OSEM with STIR OSMAPOSL semantics (no prior), on any Poisson log-likelihood.

The data term is a :class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood`.

What STIR's ``OSMAPOSLReconstruction`` does, and this class does too:

- view subsets in STIR's order: sub-iteration ``k`` uses subset ``k mod S`` (``0, 1, …, S−1, 0, …``), the
  views of a subset being those of the likelihood (:class:`~sirf_ddip.physics.subsets.ViewSubsets`, STIR's
  symmetry-aware subsets);
- subset sensitivities ``A_sᵀ m_s`` (``use subset sensitivities := 1``), computed once at :meth:`set_up`;
- ``enforce initial positivity condition := 1`` (the default): ``OSMAPOSLReconstruction::set_up(image)`` calls
  ``threshold_min_to_small_positive_value(image, 1e-6)`` on the set-up image itself
  (``OSMAPOSLReconstruction.cxx:291-292``, ``static const float small_num = 0.000001F``; OSSPS uses 10e-6):
  every value below ``min(positive values) · 1e-6`` is raised to it (all values become 1e-6 if none is
  positive). Here: in place on a SIRF set-up image (anything with ``fill``), and on the first estimate after
  ``set_up`` (later ``set_current_estimate`` calls are not thresholded, as in STIR);
- ``set_maximum_relative_change`` / ``set_minimum_relative_change``: from sub-iteration 2 on, the
  multiplicative update is clipped to ``[min, max]`` (``OSMAPOSLReconstruction.cxx:491-507``; defaults 0 and
  FLT_MAX, lines 98-99, which change nothing);
- the multiplicative update ``x ← x ⊙ A_sᵀ q / A_sᵀ m_s`` (:func:`sirf_ddip.recon.em.em_update`), 0 where the
  sensitivity is 0 (outside the projector's field of view);
- an optional Gaussian post-filter (FWHM in mm; STIR's ``SeparableGaussianImageFilter``, normalised
  kernel) applied to the *output* only (:meth:`get_output`), as STIR applies its post-filter to the final
  estimate; intermediate estimates are unfiltered.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..physics.subsets import subset_of_iteration
from .base import FLT_MAX, IterativeReconstructor, fill_in_place
from ..utils.filters import gaussian_filter_mm
from .em import em_multiplicative_update, em_update

__all__ = ["OSEMReconstructor", "threshold_min_to_small_positive_value", "gaussian_filter_mm"]

#: STIR OSMAPOSL's small_number for the initial positivity condition (OSMAPOSLReconstruction::set_up)
POSITIVITY_SMALL_NUMBER = 1.0e-6


def threshold_min_to_small_positive_value(x: torch.Tensor, small_number: float = POSITIVITY_SMALL_NUMBER) -> torch.Tensor:
    """STIR ``threshold_min_to_small_positive_value``: values below ``min_positive · small_number`` are raised to it."""
    pos = x[x > 0]
    if pos.numel() == 0:
        return torch.full_like(x, small_number)
    floor = pos.min() * small_number
    return torch.where(x < floor, floor.to(x.dtype).expand_as(x), x)


class OSEMReconstructor(IterativeReconstructor):
    """OSEM (STIR ``OSMAPOSLReconstructor`` without prior) on a :class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood` or a SIRF objective.

    Parameters
    ----------
    objective_function : PoissonLogLikelihood or sirf.STIR objective, optional
        Can also be set with :meth:`set_objective_function`.
    num_subsets : int
    num_iterations : int, optional
        Full iterations; sets ``num_subiterations = num_iterations · num_subsets``.
    num_subiterations : int, optional
        Alternatively, the number of sub-iterations.
    postfilter_fwhm : float or (z, y, x), optional
        Gaussian post-filter FWHM in mm (0/None: none).
    enforce_initial_positivity : bool
        STIR's ``enforce initial positivity condition`` (default True, as STIR).

    Examples
    --------
    >>> recon = OSEMReconstructor(data_step, num_subsets=7, num_iterations=2)  # doctest: +SKIP
    >>> recon.set_up(init); recon.set_current_estimate(init); recon.process()  # doctest: +SKIP
    >>> out = recon.get_output()  # doctest: +SKIP
    """

    _APPLIES_RELATIVE_CHANGE = True

    def __init__(self, objective_function: Any = None, num_subsets: int = 1, num_iterations: int | None = None,
                 num_subiterations: int | None = None, postfilter_fwhm: float | Sequence[float] | None = None,
                 enforce_initial_positivity: bool = True):
        super().__init__()
        self._num_iterations: int | None = None
        self._postfilter_fwhm = None
        self.enforce_initial_positivity = bool(enforce_initial_positivity)
        self._voxel_size: tuple[float, float, float] | None = None
        if objective_function is not None:
            self.set_objective_function(objective_function)
        self.set_num_subsets(num_subsets)
        if num_iterations is not None and num_subiterations is not None:
            raise ValueError("give num_iterations or num_subiterations, not both")
        if num_iterations is not None:
            self.set_num_iterations(num_iterations)
        elif num_subiterations is not None:
            self.set_num_subiterations(num_subiterations)
        self.set_postfilter_fwhm(postfilter_fwhm)

    # ------------------------------------------------------------------ parameters
    def set_num_subsets(self, n: int) -> None:
        super().set_num_subsets(n)
        if self._num_iterations is not None:
            super().set_num_subiterations(self._num_iterations * self._num_subsets)

    def set_num_subiterations(self, n: int) -> None:
        super().set_num_subiterations(n)
        self._num_iterations = None

    def set_num_iterations(self, n: int) -> None:
        """Full iterations (each = ``num_subsets`` sub-iterations)."""
        n = int(n)
        if n < 0:
            raise ValueError(f"num_iterations must be >= 0, got {n}")
        super().set_num_subiterations(n * self._num_subsets)
        self._num_iterations = n

    @property
    def num_iterations(self) -> float:
        """Full iterations to run (``num_subiterations / num_subsets``)."""
        return self._num_subiterations / self._num_subsets

    @num_iterations.setter
    def num_iterations(self, n: int) -> None:
        self.set_num_iterations(n)

    def set_postfilter_fwhm(self, fwhm: float | Sequence[float] | None) -> None:
        """Gaussian post-filter FWHM in mm (scalar or (z, y, x)); ``None``/0 disables it."""
        if fwhm is None:
            self._postfilter_fwhm = None
            return
        vals = (fwhm,) * 3 if isinstance(fwhm, (int, float)) else tuple(fwhm)
        if len(vals) != 3 or any((not math.isfinite(float(v))) or float(v) < 0 for v in vals):
            raise ValueError(f"post-filter FWHM must be >= 0 mm (a number or (z, y, x)), got {fwhm}")
        self._postfilter_fwhm = None if all(float(v) == 0 for v in vals) else tuple(float(v) for v in vals)

    def get_postfilter_fwhm(self):
        return self._postfilter_fwhm

    def set_enforce_initial_positivity(self, flag: bool) -> None:
        self.enforce_initial_positivity = bool(flag)

    # ------------------------------------------------------------------ hooks
    def _voxel_sizes(self, template: Any) -> tuple[float, float, float] | None:
        for obj in (template, self._template, self.data_step):
            grid = getattr(obj, "grid", None)
            if grid is not None and hasattr(grid, "voxel_size"):
                return tuple(grid.voxel_size)
            vs = getattr(obj, "voxel_sizes", None)
            if callable(vs):
                return tuple(float(v) for v in vs())
        return None

    def _set_up(self, template: torch.Tensor) -> None:
        ds = self.data_step
        for k in range(self._num_subsets):
            s = subset_of_iteration(k, self._num_subsets)
            sens = ds.sensitivity(s)
            if not bool((sens > 0).any()):
                raise ValueError(f"subset {k}: the sensitivity image is zero everywhere (no data reach the image)")
        self._voxel_size = self._voxel_sizes(self._template)
        self._positivity_pending = self.enforce_initial_positivity
        if self.enforce_initial_positivity and hasattr(self._template, "fill"):
            # STIR thresholds the set-up image itself (OSMAPOSLReconstruction.cxx:291-292)
            fill_in_place(self._template, threshold_min_to_small_positive_value(template))
            self._positivity_pending = False

    def _initialise_estimate(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_positivity_pending", False):
            self._positivity_pending = False
            return threshold_min_to_small_positive_value(x)
        return x

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        subset = subset_of_iteration(self.iteration, self._num_subsets)
        clip = self.iteration > 0 and (self._min_relative_change > 0 or self._max_relative_change < FLT_MAX)
        if not clip:  # the defaults (0, FLT_MAX) cannot change a non-negative update
            return em_update(self.data_step, x, subset)
        ds = self.data_step
        ratio = em_multiplicative_update(torch.ones_like(x), ds.backprojected_ratio(x, subset), ds.sensitivity(subset))
        return x * ratio.clamp(self._min_relative_change, self._max_relative_change)

    def progress_info(self) -> dict[str, Any]:
        return {"subset": self.get_subset_num(max(self.iteration - 1, 0))}

    # ------------------------------------------------------------------ output
    def postfilter(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the configured post-filter to ``x`` (a copy; unchanged if none is set)."""
        if self._postfilter_fwhm is None:
            return x.clone()
        if self._voxel_size is None:
            raise ValueError("post-filter: voxel sizes unknown (set_up with an image that has a grid)")
        return gaussian_filter_mm(x, self._postfilter_fwhm, self._voxel_size)

    def _output_tensor(self) -> torch.Tensor:
        """The (post-filtered) current estimate: what :meth:`get_output` and ``reconstruct`` give."""
        return self.postfilter(super()._output_tensor())

    def get_output_tensor(self) -> torch.Tensor:
        """The (post-filtered) current estimate as a tensor."""
        return self._output_tensor()
