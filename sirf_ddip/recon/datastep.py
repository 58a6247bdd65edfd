"""TEMP-ALIAS module: the old home of the physics ↔ algorithm interface.

The interface is now :class:`sirf_ddip.physics.likelihood.PoissonLogLikelihood`, the EM update
:mod:`sirf_ddip.recon.em` and the subset count check :mod:`sirf_ddip.physics.subsets`. This shim keeps the old
imports working until every branch uses the new names; delete it then.
"""

from __future__ import annotations

from ..physics.likelihood import PoissonLogLikelihood
from ..physics.subsets import validate_num_subsets  # noqa: F401  # TEMP-ALIAS
from .em import em_multiplicative_update, em_update  # noqa: F401  # TEMP-ALIAS

DataStep = PoissonLogLikelihood  # TEMP-ALIAS

__all__ = ["DataStep", "validate_num_subsets", "em_multiplicative_update", "em_update"]  # TEMP-ALIAS
