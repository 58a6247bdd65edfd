"""DataStep: the one interface between the physics and the reconstruction algorithms.

DDIP, OSEM and MAP-RDP only talk to a :class:`DataStep`. Two implementations exist:

- :class:`sirf_ddip.physics.model.EngineDataStep` (the built-in PyTorch engine), and
- :class:`sirf_ddip.backends.sirf.SirfDataStep` (real ``sirf.STIR`` objects; imported lazily).

All images crossing this interface are ``torch.Tensor`` of shape ``image_shape = (nz, ny, nx)``, on
``self.device``, in *activity units* (the units of the data model ``y ~ Poisson(m (A x + a))``).
The network code never sees a sinogram.

Subsets are over views, in STIR's order (see :meth:`subset_views`); ``subset=None`` means all data.
"""

from __future__ import annotations

import abc
from typing import Any

import torch


class DataStep(abc.ABC):
    """Abstract data-fidelity step for Poisson PET data ``y ~ Poisson(m ⊙ (A x + a))``.

    Subclasses implement :meth:`forward`, :meth:`backward`, :meth:`backproject_ratio`, :meth:`sensitivity`,
    :meth:`to_tensor`, :meth:`from_tensor`, :meth:`log_likelihood`; the EM update is shared.
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

    # ---------------------------------------------------------------- operators
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
    def backproject_ratio(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """``A_sᵀ m_s ⊙ (y_s / (m_s ⊙ (A_s x + a_s)))`` — the EM numerator — for ``subset``."""

    @abc.abstractmethod
    def log_likelihood(self, x: torch.Tensor) -> float:
        """Poisson log-likelihood ``Σ y log ŷ − ŷ`` (constant terms dropped) at ``x``."""

    def gradient(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """Gradient of the (subset) log-likelihood: ``backproject_ratio − sensitivity``."""
        return self.backproject_ratio(x, subset) - self.sensitivity(subset)

    # ---------------------------------------------------------------- conversion
    @abc.abstractmethod
    def to_tensor(self, image: Any) -> torch.Tensor:
        """Backend-native image -> tensor (z, y, x) on ``self.device``."""

    @abc.abstractmethod
    def from_tensor(self, tensor: torch.Tensor, template: Any | None = None) -> Any:
        """Tensor -> backend-native image, on ``template``'s grid (or the DataStep's own)."""

    # ---------------------------------------------------------------- EM
    def em_update(self, x: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        """One (OS)EM update with STIR OSMAPOSL semantics: ``x ⊙ BP(ratio) / s``.

        Voxels with zero subset sensitivity are set to zero (as STIR does, whose multiplicative update is
        ``0`` there). ``x`` is not modified.
        """
        sens = self.sensitivity(subset)
        num = self.backproject_ratio(x, subset)
        return em_multiplicative_update(x, num, sens)


def validate_num_subsets(n) -> int:
    """``n`` as an int >= 1, else ``ValueError`` (shared by every DataStep and reconstructor)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"num_subsets must be >= 1, got {n}")
    return n


def em_multiplicative_update(x: torch.Tensor, numerator: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """``x ⊙ numerator / sens`` with 0 where ``sens <= 0`` (no NaN/Inf can escape)."""
    safe = torch.where(sens > 0, sens, torch.ones_like(sens))
    return torch.where(sens > 0, x * numerator / safe, torch.zeros_like(x))
