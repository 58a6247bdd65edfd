"""Callbacks for iterative reconstructors, in CIL's style: ``callback(algorithm)`` after each iteration.

A callback may raise :class:`StopIteration` to end :meth:`IterativeReconstructor.run` early.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable


class Callback:
    """Base class; subclasses override :meth:`__call__` (and optionally :meth:`on_start` / :meth:`on_end`)."""

    def on_start(self, algorithm: Any, total: int | None) -> None:  # noqa: D401 - hook
        """Called once before the first iteration of a ``run``."""

    def __call__(self, algorithm: Any) -> None:
        """Called after every iteration."""

    def on_end(self, algorithm: Any) -> None:
        """Called once when a ``run`` ends (normally or by StopIteration)."""


class ProgressCallback(Callback):
    """A tqdm bar over the iterations, with the algorithm's ``progress_info()`` as postfix."""

    def __init__(self, desc: str | None = None, enabled: bool | None = None):
        self.desc = desc
        self.enabled = enabled
        self._bar = None

    def on_start(self, algorithm, total):
        from ..utils.progress import progress

        self._bar = progress(total=total, desc=self.desc or type(algorithm).__name__, enabled=self.enabled)

    def __call__(self, algorithm):
        if self._bar is not None:
            self._bar.update(1)
            info = getattr(algorithm, "progress_info", None)
            if callable(info):
                self._bar.set_postfix(info(), refresh=False)

    def on_end(self, algorithm):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LoggingCallback(Callback):
    """Append one JSON line per iteration (iteration, wall time, ``progress_info()``) to ``path``."""

    def __init__(self, path: str | Path, every: int = 1):
        self.path = Path(path)
        self.every = max(1, int(every))
        self._t0 = None

    def on_start(self, algorithm, total):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()

    def __call__(self, algorithm):
        it = int(getattr(algorithm, "iteration", 0))
        if it % self.every:
            return
        rec = {"iteration": it, "time_s": round(time.perf_counter() - (self._t0 or time.perf_counter()), 4)}
        info = getattr(algorithm, "progress_info", None)
        if callable(info):
            rec.update({k: (float(v) if isinstance(v, (int, float)) else str(v)) for k, v in info().items()})
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


class CheckpointCallback(Callback):
    """Call ``algorithm.save_checkpoint(folder)`` every ``every`` iterations (and at the end)."""

    def __init__(self, folder: str | Path, every: int = 10, at_end: bool = True):
        self.folder = Path(folder)
        self.every = max(1, int(every))
        self.at_end = at_end

    def __call__(self, algorithm):
        if int(getattr(algorithm, "iteration", 0)) % self.every == 0:
            algorithm.save_checkpoint(self.folder)

    def on_end(self, algorithm):
        if self.at_end:
            algorithm.save_checkpoint(self.folder)


class EarlyStopping(Callback):
    """Stop when ``criterion(algorithm)`` is true, or after ``max_seconds`` of wall time."""

    def __init__(self, criterion: Callable[[Any], bool] | None = None, max_seconds: float | None = None):
        self.criterion = criterion
        self.max_seconds = max_seconds
        self._t0 = None

    def on_start(self, algorithm, total):
        self._t0 = time.perf_counter()

    def __call__(self, algorithm):
        if self.criterion is not None and self.criterion(algorithm):
            raise StopIteration("early-stopping criterion met")
        if self.max_seconds is not None and time.perf_counter() - (self._t0 or 0) > self.max_seconds:
            raise StopIteration(f"time limit of {self.max_seconds} s reached")


def as_callback(cb: Any) -> Callback:
    """Wrap a plain callable ``f(algorithm)`` as a :class:`Callback`."""
    if isinstance(cb, Callback):
        return cb

    class _Fn(Callback):
        def __call__(self, algorithm):
            cb(algorithm)

    return _Fn()
