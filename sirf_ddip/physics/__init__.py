"""sirf_ddip.physics: geometric projector, acquisition model ``m ⊙ (A x + a)``, Poisson likelihood.

- :mod:`.raytrace` — STIR's ray-tracing matrix: tracing, layout, on-disk cache;
- :mod:`.projector` — :class:`Projector` (the geometric operator; numba kernels on CPU, torch elsewhere);
- :mod:`.model` — :class:`AcquisitionModel`, :class:`EngineDataStep` (the engine's DataStep);
- :mod:`.likelihood` — STIR's quotient / log-likelihood safeguards on tensors.

Names are imported lazily so that ``import sirf_ddip.physics`` stays cheap.
"""

from __future__ import annotations

__all__ = ["Projector", "AcquisitionModel", "EngineDataStep"]


def __getattr__(name):
    if name == "Projector":
        from .projector import Projector

        return Projector
    if name in ("AcquisitionModel", "EngineDataStep"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'sirf_ddip.physics' has no attribute {name!r}")
