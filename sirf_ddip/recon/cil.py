"""A CIL ``Algorithm`` around a sirf_ddip reconstructor, for PETRIC-style loops.

PETRIC runs ``algorithm = Submission(data); algorithm.run(numpy.inf, callbacks=metrics + submission_callbacks)``
(``SyneRBI/PETRIC: main_OSEM.py``, ``petric.py``): the metric callbacks read ``algorithm.x`` (a SIRF
``ImageData``), ``algorithm.iteration`` and the loss, and stop the run by raising ``StopIteration``. CIL's
``Algorithm`` (``TomographicImaging/CIL: Wrappers/Python/cil/optimisation/algorithms/Algorithm.py``, v25.0.0)
drives that loop: ``run`` calls ``__next__`` (lines 230-285), which calls ``update_objective()`` once before
the first update (iteration −1 → 0), then ``update()``, ``iteration += 1`` and, every
``update_objective_interval`` iterations, ``update_objective()`` (lines 88-112); ``get_output()`` returns
``self.x`` (line 128-137); subclasses append to ``self.loss`` and ``get_last_loss()`` reads its last entry
(lines 164-186); ``max_iteration`` is set by ``run`` to ``iteration + iterations`` (line 276) and
``should_stop()`` compares with it (lines 69-73).

:func:`cil_algorithm` builds such an ``Algorithm`` whose ``x`` **is** a SIRF ``ImageData`` updated in place by the
reconstructor's SIRF ``update(image)`` each iteration (one OSEM sub-iteration or one DDIP diffusion step). CIL is
imported only when no base class is given (``pip install cil`` is not possible; CIL comes with conda-forge or the
SyneRBI Docker images, as SIRF).
"""

from __future__ import annotations

from typing import Any

from ..errors import SirfDdipError

__all__ = ["CILNotAvailableError", "cil_algorithm_class", "cil_algorithm"]


class CILNotAvailableError(SirfDdipError, ImportError):
    """``import cil.optimisation.algorithms`` failed."""


_CLASSES: dict[type, type] = {}


def _cil_base() -> type:
    try:
        from cil.optimisation.algorithms import Algorithm  # noqa: PLC0415 - lazy by design
    except ImportError as exc:
        raise CILNotAvailableError(
            f"cannot import cil.optimisation.algorithms ({exc}): CIL is installed with conda "
            "(`conda install -c conda-forge cil`) or comes with the SyneRBI Docker images; or pass base=... "
            "(a class with CIL's Algorithm API)") from exc
    return Algorithm


def cil_algorithm_class(base: type | None = None) -> type:
    """The ``Algorithm`` subclass wrapping a sirf_ddip reconstructor, derived from ``base`` (default: CIL's).

    Parameters
    ----------
    base : type, optional
        A class with CIL's ``Algorithm`` API (``__init__(update_objective_interval=…)``, ``iteration``, ``loss``,
        ``configured``, ``run``); default ``cil.optimisation.algorithms.Algorithm``.
    """
    if base is None:
        base = _cil_base()
    if base in _CLASSES:
        return _CLASSES[base]

    class ReconstructorAlgorithm(base):  # type: ignore[misc, valid-type]
        """CIL ``Algorithm`` whose ``x`` is the SIRF image that ``reconstructor.update(x)`` updates in place.

        Parameters
        ----------
        reconstructor : IterativeReconstructor
            An ``OSEMReconstructor`` or ``DDIPReconstructor`` with its objective function set (and, optionally,
            already ``set_up``; otherwise it is set up on ``initial``).
        initial : sirf.STIR.ImageData
            Initial estimate (and geometry template); copied, so the caller's image is left alone. For DDIP it
            seeds the warm start (PETRIC passes its ``OSEM_image``), as ``set_current_estimate`` before step 1.
        update_objective_interval : int
            CIL's interval of :meth:`update_objective` (0: never).
        """

        def __init__(self, reconstructor: Any, initial: Any, update_objective_interval: int = 1,
                     **kwargs: Any) -> None:
            super().__init__(update_objective_interval=update_objective_interval, **kwargs)
            self.reconstructor = reconstructor
            self.set_up(initial)

        def set_up(self, initial: Any) -> None:
            """Set the reconstructor up on ``initial`` (if needed) and make ``x`` a copy of it."""
            rec = self.reconstructor
            self.x = initial.clone() if hasattr(initial, "clone") else initial
            if not rec.configured:
                rec.set_up(self.x)  # OSEM's initial positivity acts on this copy, as STIR's set_up does
            rec.set_current_estimate(self.x)
            self.configured = True

        def update(self) -> None:
            """One sub-iteration (OSEM) / diffusion step (DDIP): SIRF's ``update(x)``, in place on ``self.x``."""
            self.reconstructor.update(self.x)

        def update_objective(self) -> None:
            """Append the loss: minus the Poisson log-likelihood at ``x`` (CIL minimises; no prior term)."""
            ds = self.reconstructor.data_step
            self.loss.append(-float(ds.value(ds.to_tensor(self.x))))

        def get_subiteration_num(self) -> int:
            """The reconstructor's STIR-style sub-iteration number."""
            return self.reconstructor.get_subiteration_num()

    ReconstructorAlgorithm.__qualname__ = f"ReconstructorAlgorithm[{base.__module__}.{base.__name__}]"
    _CLASSES[base] = ReconstructorAlgorithm
    return ReconstructorAlgorithm


def cil_algorithm(reconstructor: Any, initial: Any, update_objective_interval: int = 1, base: type | None = None,
                  **kwargs: Any) -> Any:
    """A CIL ``Algorithm`` running ``reconstructor`` from ``initial`` (see :func:`cil_algorithm_class`).

    Examples
    --------
    >>> algo = cil_algorithm(OSEMReconstructor(obj, num_subsets=7), data.OSEM_image)  # doctest: +SKIP
    >>> algo.run(numpy.inf, callbacks=metrics + [MaxIteration(660)])                  # doctest: +SKIP
    """
    return cil_algorithm_class(base)(reconstructor, initial, update_objective_interval=update_objective_interval,
                                     **kwargs)
