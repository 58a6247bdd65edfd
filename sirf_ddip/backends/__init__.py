"""sirf_ddip.backends: adapters to external reconstruction frameworks.

- :mod:`sirf_ddip.backends.sirf`: ``sirf.STIR`` objects as a :class:`~sirf_ddip.physics.likelihood.PoissonLogLikelihood`
  (``SirfLogLikelihood``); ``sirf.STIR`` itself is imported lazily, only when a SIRF object is used.
"""

__all__ = ["sirf"]
