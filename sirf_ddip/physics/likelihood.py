"""The Poisson log-likelihood: the one interface between the physics and the reconstruction algorithms.

:class:`PoissonLogLikelihood` is the protocol that OSEM, MAP-RDP and DDIP (``sirf_ddip.recon``) are written
against. Two implementations exist:

- :class:`sirf_ddip.physics.model.EngineLogLikelihood` (the built-in PyTorch engine, built from the
  operators of :mod:`sirf_ddip.physics.operator`), and
- the SIRF adapter in :mod:`sirf_ddip.backends.sirf` (real ``sirf.STIR`` objects; imported lazily).

All images crossing this interface are ``torch.Tensor`` of shape ``image_shape = (nz, ny, nx)``, on
``device``, in *activity units* (the units of the data model ``y ~ Poisson(m (A x + a))``). Subsets are over
views (:class:`sirf_ddip.physics.subsets.ViewSubsets`); ``subset=None`` means all data.

The module also holds the numerical pieces, with STIR's safeguards.

Data model (PETRIC / SIRF convention): ``y ~ Poisson(ȳ)``, ``ȳ = m ⊙ (A x + a)``.

- The EM numerator is ``Aᵀ q`` with ``q = y / (A x + a)``: the factor ``m`` cancels in
  ``m ⊙ y / (m ⊙ (A x + a))``, exactly as in STIR's
  ``PoissonLogLikelihoodWithLinearModelForMeanAndProjData`` (the gradient RPC forward projects, adds the
  additive sinogram, calls ``divide_and_truncate`` and back projects; normalisation only enters the
  sensitivity ``Aᵀ m``). Bins with ``m = 0`` carry no information and are given ``q = 0``.
- :func:`stir_quotient` is STIR's ``divide_and_truncate`` (``recon_array_functions.cxx``): per viewgram
  (one segment, one view) ``small = max(max(y) · 1e-6, 0)``; ``q = 0`` where ``y ≤ small`` (this includes
  0/0); otherwise ``q = min(y / d, 10000)`` (so a vanishing or negative denominator gives 10000, never Inf).
- :func:`stir_log_likelihood` is STIR's ``accumulate_loglikelihood``: ``ŷ' = max(ŷ, y/10000)``;
  ``Σ y log ŷ' − ŷ'`` (only ``−ŷ'`` where ``y ≤ small``), accumulated in float64.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import torch

from .subsets import validate_num_subsets

#: STIR's SMALL_NUM (recon_array_functions.cxx)
SMALL_NUM = 1e-6
#: STIR's max_quotient in divide_and_truncate / accumulate_loglikelihood
MAX_QUOTIENT = 10000.0

__all__ = ["PoissonLogLikelihood", "SMALL_NUM", "MAX_QUOTIENT", "viewgram_small_values", "stir_quotient",
           "stir_log_likelihood", "em_numerator_ratio", "validate_num_subsets"]


def viewgram_small_values(y: torch.Tensor, segment_slices: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """STIR's per-viewgram threshold ``max(max(y over the viewgram) · 1e-6, 0)``, broadcast to ``y``'s shape.

    ``y`` is ``(n_sino, n_views, n_tang)`` or TOF ``(n_tof, n_sino, n_views, n_tang)``; a viewgram is one
    segment's sinograms at one view (and, for TOF data, one TOF bin, as STIR's TOF viewgrams).
    ``segment_slices`` lists ``(start, stop)`` sinogram ranges per segment (default: all sinograms one segment).
    """
    if segment_slices is None:
        segment_slices = [(0, y.shape[-3])]
    out = torch.empty_like(y)
    for a, b in segment_slices:
        blk = y[..., a:b, :, :]
        mx = blk.amax(dim=(-3, -1), keepdim=True) if blk.numel() else blk
        out[..., a:b, :, :] = torch.clamp(mx * SMALL_NUM, min=0.0).expand_as(blk)
    return out


def stir_quotient(y: torch.Tensor, denom: torch.Tensor,
                  segment_slices: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """``y / denom`` with STIR's ``divide_and_truncate`` rules (see module docstring); new tensor."""
    small = viewgram_small_values(y, segment_slices)
    use = y > small
    big = y > MAX_QUOTIENT * denom
    safe = torch.where(use & ~big, denom, torch.ones_like(denom))
    q = torch.where(big, torch.full_like(y, MAX_QUOTIENT), y / safe)
    return torch.where(use, q, torch.zeros_like(y))


def stir_log_likelihood(y: torch.Tensor, ybar: torch.Tensor,
                        segment_slices: Sequence[tuple[int, int]] | None = None) -> float:
    """STIR's ``accumulate_loglikelihood``: ``Σ y log ŷ' − ŷ'`` with ``ŷ' = max(ŷ, y/10000)`` (float64)."""
    small = viewgram_small_values(y, segment_slices)
    est = torch.maximum(ybar.double(), y.double() / MAX_QUOTIENT)
    pos = y > small
    # Σ_pos (y log ŷ' − ŷ') + Σ_rest (−ŷ') = Σ_pos y log ŷ' − Σ_all ŷ': the log only where y counts (at low dose most
    # bins are 0; a full mMR span-11 sinogram: 16.6 s → ~2 s on one core)
    return float((y[pos].double() * torch.log(est[pos])).sum() - est.sum())


def em_numerator_ratio(y: torch.Tensor, geom_plus_additive: torch.Tensor, mult: torch.Tensor | None,
                       segment_slices: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """The sinogram that is back projected in the EM numerator: ``q = y / (A x + a)`` (STIR rules), 0 where m = 0."""
    q = stir_quotient(y, geom_plus_additive, segment_slices)
    if mult is not None:
        q = torch.where(mult > 0, q, torch.zeros_like(q))
    return q


class PoissonLogLikelihood(abc.ABC):
    """Poisson log-likelihood of PET data ``y ~ Poisson(m ⊙ (A x + a))``, per view subset.

    Implementations give :meth:`forward`, :meth:`backward`, :meth:`sensitivity`, :meth:`backprojected_ratio`,
    :meth:`value`, :meth:`to_tensor`, :meth:`from_tensor`, ``num_subsets``/:meth:`set_num_subsets`; the
    :meth:`gradient` follows. The EM and HQS updates are written once, against this protocol, in
    :mod:`sirf_ddip.recon.em` and :mod:`sirf_ddip.recon.hqs`.
    """

    #: torch device of all tensors crossing the interface
    device: torch.device
    #: torch dtype of images
    dtype: torch.dtype = torch.float32
    #: image shape (nz, ny, nx)
    image_shape: tuple[int, int, int]

    # ---------------------------------------------------------------- subsets
    @property
    @abc.abstractmethod
    def num_subsets(self) -> int:
        """Number of view subsets currently configured."""

    @abc.abstractmethod
    def set_num_subsets(self, n: int) -> None:
        """Configure ``n`` view subsets (sensitivities are recomputed lazily and cached)."""

    # ---------------------------------------------------------------- model
    @abc.abstractmethod
    def forward(self, x: torch.Tensor, subset: int | None = None) -> Any:
        """Expected counts ``m ⊙ (A x + a)`` for ``subset`` (backend-native sinogram or tensor)."""

    @abc.abstractmethod
    def backward(self, y: Any, subset: int | None = None) -> torch.Tensor:
        """``Aᵀ (m ⊙ y)`` for ``subset``, as an image tensor."""

    @abc.abstractmethod
    def sensitivity(self, subset: int | None = None) -> torch.Tensor:
        """Subset sensitivity ``A_sᵀ m_s`` (cached), as an image tensor."""

    @abc.abstractmethod
    def backprojected_ratio(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """``A_sᵀ m_s ⊙ (y_s / (m_s ⊙ (A_s x + a_s)))`` — the EM numerator — for ``subset``."""

    @abc.abstractmethod
    def value(self, x: torch.Tensor, subset: int | None = None) -> float:
        """Poisson log-likelihood ``Σ y log ŷ − ŷ`` (constant terms dropped) at ``x`` (all data by default)."""

    def gradient(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """Gradient of the (subset) log-likelihood: ``backprojected_ratio − sensitivity``."""
        return self.backprojected_ratio(x, subset) - self.sensitivity(subset)

    # ---------------------------------------------------------------- conversion
    @abc.abstractmethod
    def to_tensor(self, image: Any) -> torch.Tensor:
        """Backend-native image -> tensor (z, y, x) on ``self.device``."""

    @abc.abstractmethod
    def from_tensor(self, tensor: torch.Tensor, template: Any | None = None) -> Any:
        """Tensor -> backend-native image, on ``template``'s grid (or the likelihood's own)."""
