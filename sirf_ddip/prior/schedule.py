"""The DDPM/DDIM noise schedule (linear β) and the closed-form steps that use it.

Notation (Ho et al. 2020; Song et al. 2021)
-------------------------------------------
- ``β_t`` linear from ``beta_start`` to ``beta_end`` over ``t = 0 … T-1`` (``T = num_train_steps``).
- ``ᾱ_t = ∏_{s ≤ t} (1 − β_s)``; by convention ``ᾱ_{-1} = 1`` (clean image).
- Forward process: ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε``.
- Tweedie / ε-parametrisation: ``x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t``.
- DDIM with ``η`` (``eta_mode = "ddim"``, Song et al.): ``σ_t = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})``
  and ``x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ_t²) ε + σ_t z``; ``η = 1`` gives the DDPM posterior variance.
- DDS / DDIP's η (``eta_mode = "dds"``): the fresh noise has std ``η √(1 − ᾱ_{t'})`` and the predicted noise
  ``√(1 − η²) √(1 − ᾱ_{t'})``, i.e. ``x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'}) (η z + √(1 − η²) ε)``: a fraction
  ``η²`` of the step's noise variance is fresh whatever the stride (DDIPrecon_for_PET ``solver_pet_ddiprecon.py``,
  the ``c1``/``c2`` coefficients of the DDIM update; the same in DDIP3D ``solver_ct_3d.py`` and DDS). With Song's
  σ_t at a stride of a few steps only 1-10 % of the variance is fresh at η = 0.85 (DDS: 72 %).

Everything here is pure: tensors in, tensors out, on the device/dtype of the inputs. ``t`` may be a Python int
(same step for the whole batch) or an integer tensor of shape ``[B]`` (one step per batch item, broadcast over
the remaining dimensions).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class NoiseSchedule:
    """Linear-β diffusion schedule.

    Parameters
    ----------
    num_train_steps : int
        Number of diffusion steps ``T`` used in training (1000 in DDPM).
    beta_start, beta_end : float
        First and last β (linear in between).

    Attributes
    ----------
    betas : torch.Tensor, float64 [T]
    alphas_cumprod : torch.Tensor, float64 [T]
    """

    def __init__(self, num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        num_train_steps = int(num_train_steps)
        if num_train_steps < 1:
            raise ValueError(f"NoiseSchedule: num_train_steps must be >= 1, got {num_train_steps}")
        if not (0.0 < beta_start <= beta_end < 1.0):
            raise ValueError(f"NoiseSchedule: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.num_train_steps = num_train_steps
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.betas = torch.linspace(self.beta_start, self.beta_end, num_train_steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (stored in the weights card)."""
        return {"type": "linear", "num_train_steps": self.num_train_steps, "beta_start": self.beta_start,
                "beta_end": self.beta_end}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NoiseSchedule":
        if d.get("type", "linear") != "linear":
            raise ValueError(f"NoiseSchedule: unsupported schedule type {d.get('type')!r} (only 'linear')")
        return cls(int(d["num_train_steps"]), float(d["beta_start"]), float(d["beta_end"]))

    def __repr__(self) -> str:
        return (f"NoiseSchedule(num_train_steps={self.num_train_steps}, beta_start={self.beta_start}, "
                f"beta_end={self.beta_end})")

    # ------------------------------------------------------------------ helpers
    def _check_t(self, t, allow_minus_one: bool = False) -> None:
        tt = torch.as_tensor(t)
        lo = -1 if allow_minus_one else 0
        if tt.numel() and (int(tt.min()) < lo or int(tt.max()) >= self.num_train_steps):
            raise ValueError(f"NoiseSchedule: timestep(s) {tt.tolist()} outside [{lo}, {self.num_train_steps - 1}]")

    def alpha_bar(self, t, like: torch.Tensor) -> torch.Tensor:
        """``ᾱ_t`` shaped to broadcast against ``like`` (``t = -1`` gives 1), in ``like``'s dtype/device.

        Computed in float64 then cast, so float32 callers get correctly rounded values.
        """
        self._check_t(t, allow_minus_one=True)
        tt = torch.as_tensor(t, dtype=torch.long)
        ac = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])  # index t+1
        a = ac[(tt + 1).cpu()]
        if a.dim() == 0:
            return a.to(dtype=like.dtype, device=like.device)
        if a.shape[0] != like.shape[0]:
            raise ValueError(f"NoiseSchedule: {a.shape[0]} timesteps for a batch of {like.shape[0]}")
        return a.reshape((-1,) + (1,) * (like.dim() - 1)).to(dtype=like.dtype, device=like.device)

    # ------------------------------------------------------------------ forward process and inversions
    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """Sample ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) noise``."""
        self._check_t(t)
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def tweedie_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Tweedie estimate ``x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t``."""
        self._check_t(t)
        a = self.alpha_bar(t, x_t)
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """The ε implied by ``x_t`` and ``x0``: ``(x_t − √ᾱ_t x0) / √(1−ᾱ_t)``."""
        self._check_t(t)
        a = self.alpha_bar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1.0 - a).sqrt()

    def ddim_sigma(self, t, t_prev, eta: float, like: torch.Tensor) -> torch.Tensor:
        """DDIM noise level ``σ_t(η)`` for a step ``t → t_prev``."""
        a_t = self.alpha_bar(t, like)
        a_p = self.alpha_bar(t_prev, like)
        return float(eta) * ((1.0 - a_p) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_p).clamp_min(0).sqrt()

    def ddim_coefficients(self, t, t_prev, eta: float, like: torch.Tensor,
                          eta_mode: str = "ddim") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three coefficients ``(c_x0, c_eps, c_noise)`` of ``x_{t'} = c_x0 x̂_0 + c_eps ε + c_noise z``.

        Parameters
        ----------
        t, t_prev : int or tensor [B]
        eta : float in [0, 1]
        like : tensor (dtype/device/broadcast shape)
        eta_mode : "ddim" or "dds"
            ``"ddim"``: Song's ``σ_t(η)``; ``"dds"``: ``c_noise = η √(1−ᾱ_{t'})``, ``c_eps = √(1−η²) √(1−ᾱ_{t'})``
            (see the module docstring).
        """
        a_p = self.alpha_bar(t_prev, like)
        if eta_mode == "dds":
            root = (1.0 - a_p).clamp_min(0).sqrt()
            return a_p.sqrt(), root * (1.0 - float(eta) ** 2) ** 0.5, root * float(eta)
        if eta_mode != "ddim":
            raise ValueError(f"NoiseSchedule: eta_mode must be 'ddim' or 'dds', got {eta_mode!r}")
        sigma = self.ddim_sigma(t, t_prev, eta, like)
        return a_p.sqrt(), (1.0 - a_p - sigma ** 2).clamp_min(0).sqrt(), sigma

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t, t_prev, eta: float = 0.0,
                  noise: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, eta_mode: str = "ddim") -> torch.Tensor:
        """One DDIM step ``x_t → x_{t_prev}``.

        Parameters
        ----------
        x_t, eps : tensors of the same shape
            Current sample and the network's ε prediction at ``t``.
        t, t_prev : int or tensor [B]
            Current and next timestep; ``t_prev = -1`` means the clean end point (ᾱ = 1).
        eta : float
            0 = deterministic DDIM, 1 = DDPM-like ancestral variance.
        noise : tensor, optional
            The ``z`` of the stochastic term (drawn with ``generator`` if None and η > 0).
        x0 : tensor, optional
            Override of the clean estimate (e.g. a data-consistent or clamped x̂_0, as in DDIP/DDS).
            When given, ε is *re-derived* from ``x_t`` and ``x0`` so that the step is consistent with it.
        eta_mode : "ddim" or "dds"
            How η sets the fresh-noise share (:meth:`ddim_coefficients`).

        Returns
        -------
        torch.Tensor
        """
        self._check_t(t)
        self._check_t(t_prev, allow_minus_one=True)
        if x0 is None:
            x0 = self.tweedie_x0(x_t, eps, t)
        else:
            eps = self.eps_from_x0(x_t, x0, t)
        c_x0, c_eps, c_noise = self.ddim_coefficients(t, t_prev, eta, x_t, eta_mode)
        out = c_x0 * x0 + c_eps * eps
        if float(eta) > 0:
            if noise is None:
                noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
            out = out + c_noise * noise
        return out

    def timesteps(self, t_start: int, num_steps: int) -> list[int]:
        """Strided descending timesteps from ``t_start`` to 0: ``num_steps`` distinct integers.

        ``round(linspace(t_start, 0, num_steps))``: the first is ``t_start``, the last is 0 (for ``num_steps >= 2``);
        the step after the last is ``-1`` (clean, see :meth:`previous`). ``num_steps = 1`` gives ``[t_start]``.
        ``num_steps`` is capped at ``t_start + 1`` (every step visited).
        """
        t_start = int(t_start)
        num_steps = int(num_steps)
        if not 0 <= t_start < self.num_train_steps:
            raise ValueError(f"NoiseSchedule.timesteps: t_start {t_start} outside [0, {self.num_train_steps - 1}]")
        if num_steps < 1:
            raise ValueError(f"NoiseSchedule.timesteps: num_steps must be >= 1, got {num_steps}")
        if num_steps >= t_start + 1:
            return list(range(t_start, -1, -1))
        if num_steps == 1:
            return [t_start]
        seq = np.round(np.linspace(t_start, 0, num_steps)).astype(int).tolist()
        return [int(s) for s in seq]  # distinct since the stride (t_start/(n-1)) > 1

    @staticmethod
    def previous(seq: list[int], i: int) -> int:
        """The step after ``seq[i]`` in a sequence from :meth:`timesteps` (``-1`` after the last)."""
        return seq[i + 1] if i + 1 < len(seq) else -1
