"""Classifier-free MR guidance: mix the MR-conditioned and the unconditioned ε̂ of one network.

A prior trained with MR dropout (``train.mr_dropout``; architecture ``mr_null``) predicts ε both with the MR and
with its learned "no MR" input. At sampling, ``mr_guidance = w`` combines the two as in classifier-free guidance
(Ho & Salimans, 2022)::

    ε̂ = ε̂_uncond + w (ε̂_cond − ε̂_uncond)

``w = 1`` is the MR-conditioned prediction alone (one network call, bit-identical to a run without guidance),
``w = 0`` the unconditioned one (the no-MR ablation), ``0 < w < 1`` trusts the MR less.
"""

from __future__ import annotations

import torch


def check_mr_guidance(w: float) -> float:
    """``w`` as a float; raises ``ValueError`` unless it is finite and ≥ 0."""
    w = float(w)
    if not (w >= 0.0 and w != float("inf")):
        raise ValueError(f"mr_guidance must be a finite number >= 0 (1: MR-conditioned, 0: no MR), got {w}")
    return w


def needs_unconditioned(w: float) -> bool:
    """Whether guidance ``w`` needs the unconditioned prediction (every ``w`` but 1)."""
    return float(w) != 1.0


def needs_conditioned(w: float) -> bool:
    """Whether guidance ``w`` needs the MR-conditioned prediction (every ``w`` but 0)."""
    return float(w) != 0.0


def guided_eps(eps_cond: torch.Tensor | None, eps_uncond: torch.Tensor | None, w: float) -> torch.Tensor:
    """``ε̂_uncond + w (ε̂_cond − ε̂_uncond)``; at ``w = 1`` returns ``eps_cond`` itself, at ``w = 0``
    ``eps_uncond`` itself (either other input may then be None)."""
    w = float(w)
    if w == 1.0:
        return eps_cond
    if w == 0.0:
        return eps_uncond
    return eps_uncond + w * (eps_cond - eps_uncond)
