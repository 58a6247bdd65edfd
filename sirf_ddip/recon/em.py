"""The (OS)EM update, written once against :class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood`.

STIR OSMAPOSL semantics (``OSMAPOSLReconstruction::update_estimate`` without a prior, STIR
``src/iterative/OSMAPOSL/OSMAPOSLReconstruction.cxx``): ``x ← x ⊙ A_sᵀ q / A_sᵀ m_s`` with
``q = divide_and_truncate(y_s, A_s x + a_s)``; voxels with zero subset sensitivity get 0.
"""

from __future__ import annotations

import torch

from ..physics.likelihood import PoissonLogLikelihood

__all__ = ["em_update", "em_multiplicative_update"]


def em_multiplicative_update(x: torch.Tensor, numerator: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """``x ⊙ numerator / sens`` with 0 where ``sens <= 0`` (no NaN/Inf can escape)."""
    safe = torch.where(sens > 0, sens, torch.ones_like(sens))
    return torch.where(sens > 0, x * numerator / safe, torch.zeros_like(x))


def em_update(likelihood: PoissonLogLikelihood, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
    """One (OS)EM update ``x ⊙ backprojected_ratio(x, s) / sensitivity(s)``; ``x`` is not modified.

    Voxels with zero subset sensitivity are set to zero (as STIR does, whose multiplicative update is ``0``
    there).
    """
    sens = likelihood.sensitivity(subset)
    num = likelihood.backprojected_ratio(x, subset)
    return em_multiplicative_update(x, num, sens)
