"""Poisson log-likelihood pieces on tensors, with STIR's numerical safeguards.

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

from typing import Sequence

import torch

#: STIR's SMALL_NUM (recon_array_functions.cxx)
SMALL_NUM = 1e-6
#: STIR's max_quotient in divide_and_truncate / accumulate_loglikelihood
MAX_QUOTIENT = 10000.0

__all__ = ["SMALL_NUM", "MAX_QUOTIENT", "viewgram_small_values", "stir_quotient", "stir_log_likelihood",
           "poisson_log_likelihood", "em_numerator_ratio"]


def viewgram_small_values(y: torch.Tensor, segment_slices: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """STIR's per-viewgram threshold ``max(max(y over the viewgram) · 1e-6, 0)``, broadcast to ``y``'s shape.

    ``y`` is ``(n_sino, n_views, n_tang)``; a viewgram is one segment's sinograms at one view.
    ``segment_slices`` lists ``(start, stop)`` sinogram ranges per segment (default: all sinograms one segment).
    """
    if segment_slices is None:
        segment_slices = [(0, y.shape[0])]
    out = torch.empty_like(y)
    for a, b in segment_slices:
        blk = y[a:b]
        mx = blk.amax(dim=(0, 2), keepdim=True) if blk.numel() else blk
        out[a:b] = torch.clamp(mx * SMALL_NUM, min=0.0).expand_as(blk)
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
    y64 = y.double()
    est = torch.maximum(ybar.double(), y64 / MAX_QUOTIENT)
    pos = y > small
    val = torch.where(pos, y64 * torch.log(torch.where(pos, est, torch.ones_like(est))) - est, -est)
    return float(val.sum())


def poisson_log_likelihood(y: torch.Tensor, ybar: torch.Tensor) -> float:
    """Plain ``Σ y log ŷ − ŷ`` (``0 log 0 = 0``), float64; ``-inf`` if ``ŷ = 0`` where ``y > 0``."""
    y64, e64 = y.double(), ybar.double()
    with torch.no_grad():
        t = torch.where(y64 > 0, y64 * torch.log(e64), torch.zeros_like(y64))
    return float((t - e64).sum())


def em_numerator_ratio(y: torch.Tensor, geom_plus_additive: torch.Tensor, mult: torch.Tensor | None,
                       segment_slices: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """The sinogram that is back projected in the EM numerator: ``q = y / (A x + a)`` (STIR rules), 0 where m = 0."""
    q = stir_quotient(y, geom_plus_additive, segment_slices)
    if mult is not None:
        q = torch.where(mult > 0, q, torch.zeros_like(q))
    return q
