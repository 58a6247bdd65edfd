"""sirf_ddip.physics: operators, the acquisition model ``m ⊙ (A x + a)`` and the Poisson log-likelihood.

- :mod:`.operator` — :class:`LinearOperator` base, :class:`MultiplicativeFactors`, composition (``@``);
- :mod:`.raytrace` — STIR's ray-tracing matrix: tracing (numba), layout, on-disk cache;
- :mod:`.projector` — :class:`Projector` (the geometric operator, a LinearOperator; numba kernels on CPU, torch
  elsewhere);
- :mod:`.subsets` — :class:`ViewSubsets` (STIR's symmetry-aware view subsets);
- :mod:`.likelihood` — the :class:`PoissonLogLikelihood` protocol and STIR's quotient / log-likelihood safeguards;
- :mod:`.model` — :class:`AcquisitionModel`, :class:`EngineLogLikelihood` (the engine's likelihood).

Names are imported lazily so that ``import sirf_ddip.physics`` stays cheap.
"""

from __future__ import annotations

__all__ = ["Projector", "AcquisitionModel", "EngineLogLikelihood", "LinearOperator", "MultiplicativeFactors",
           "ComposedOperator", "ViewSubsets", "PoissonLogLikelihood"]

_WHERE = {"Projector": "projector", "AcquisitionModel": "model", "EngineLogLikelihood": "model",
          "LinearOperator": "operator", "MultiplicativeFactors": "operator", "ComposedOperator": "operator",
          "ViewSubsets": "subsets", "PoissonLogLikelihood": "likelihood"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'sirf_ddip.physics' has no attribute {name!r}")
