"""The strided DDIM / DDS sampler of a DDIP run: its timesteps, Tweedie x̂0 and one reverse step (pure).

:class:`DDIMSampler` holds no state beyond its settings and the run's timesteps; every call is a function of
its arguments (the noise is drawn by the caller), as :class:`~sirf_ddip.prior.schedule.NoiseSchedule` is. The
reconstructor (:class:`sirf_ddip.recon.ddip.DDIPReconstructor`) composes it with the image step and the
adaptation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .schedule import NoiseSchedule


@dataclass
class DDIMSampler:
    """DDIM / DDS reverse steps over ``timesteps`` (descending, last 0) of ``schedule``.

    Parameters
    ----------
    schedule : NoiseSchedule
        The prior's noise schedule.
    timesteps : list of int
        The run's diffusion steps ``T′ … 0`` (:meth:`NoiseSchedule.timesteps`).
    eta : float
        DDIM stochasticity η.
    eta_mode : "dds" or "ddim"
        How η enters the step (:meth:`NoiseSchedule.ddim_coefficients`).
    x0_clamp : (lo, hi)
        The network range every x̂0 is clamped to.
    """

    schedule: NoiseSchedule
    timesteps: list[int]
    eta: float = 0.85
    eta_mode: str = "dds"
    x0_clamp: tuple[float, float] = field(default=(-1.0, 3.0))

    @classmethod
    def build(cls, schedule: NoiseSchedule, t_start: int, num_steps: int, eta: float, eta_mode: str,
              x0_clamp) -> "DDIMSampler":
        """The sampler from ``t_start`` in ``num_steps`` strided steps (:class:`ConfigError` if ``t_start`` is not
        a step of ``schedule``)."""
        if not 0 <= t_start < schedule.num_train_steps:
            raise ConfigError(f"DDIP config: key 't_start' = {t_start} outside [0, "
                              f"{schedule.num_train_steps - 1}] of the prior's schedule")
        lo, hi = x0_clamp
        return cls(schedule, schedule.timesteps(t_start, num_steps), eta, eta_mode, (lo, hi))

    def __len__(self) -> int:
        return len(self.timesteps)

    def t(self, i: int) -> int:
        """Diffusion time of step ``i``."""
        return int(self.timesteps[i])

    def t_prev(self, i: int) -> int:
        """Diffusion time step ``i`` goes to (−1 after the last)."""
        return int(self.schedule.previous(self.timesteps, i))

    def clamp(self, u: torch.Tensor) -> torch.Tensor:
        """``u`` clamped to the network range."""
        return u.clamp(*self.x0_clamp)

    def x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """Tweedie ``x̂0`` of ``x_t`` from ``eps`` at time ``t``, clamped to the network range."""
        return self.schedule.tweedie_x0(x_t, eps, t).clamp(*self.x0_clamp)

    def start(self, u0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_{T′}``: ``u0`` (network units) forward-noised to the first timestep."""
        return self.schedule.q_sample(u0, int(self.timesteps[0]), noise)

    def step(self, x_t: torch.Tensor, eps: torch.Tensor, i: int, x0: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """One reverse step ``x_t → x_{t′}`` of step ``i`` with the clean image ``x0`` (ε re-derived from it)."""
        return self.schedule.ddim_step(x_t, eps, self.t(i), self.t_prev(i), eta=self.eta, noise=noise, x0=x0,
                                       eta_mode=self.eta_mode)
