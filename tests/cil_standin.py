"""A minimal stand-in of CIL's ``Algorithm`` base class (CIL cannot be pip-installed), following CIL's source.

``TomographicImaging/CIL: Wrappers/Python/cil/optimisation/algorithms/Algorithm.py`` at tag v25.0.0 (the
``max_iteration`` API that PETRIC-era code uses; CIL 26 drops it). Only the loop logic is kept: the logging and
deprecated paths are left out. Line numbers refer to that file.
"""

from __future__ import annotations

from itertools import count
from numbers import Integral

import numpy as np


class Algorithm:
    """CIL's ``Algorithm``: ``iteration`` starts at −1; ``run`` adds the initial objective evaluation."""

    def __init__(self, update_objective_interval=1, max_iteration=None):  # lines 43-56
        self.iteration = -1
        self.__max_iteration = 1 if max_iteration is None else max_iteration
        self.__loss = []
        self.configured = False
        self._iteration = []
        self.update_objective_interval = update_objective_interval

    def set_up(self, *args, **kwargs):  # lines 62-64
        raise NotImplementedError

    def update(self):  # lines 65-67
        raise NotImplementedError

    def update_objective(self):  # lines 188-190
        raise NotImplementedError

    def should_stop(self):  # lines 69-73
        return self.iteration > self.max_iteration

    def __iter__(self):
        return self

    def __next__(self):  # lines 88-112
        if self.should_stop():
            raise StopIteration
        if self.iteration == -1 and self.update_objective_interval > 0:
            self._iteration.append(self.iteration)
            self.update_objective()
            self.iteration += 1
            return self.iteration
        if not self.configured:
            raise ValueError("Algorithm not configured correctly. Please run set_up.")
        self.update()
        self.iteration += 1
        if self.iteration >= 0 and self.update_objective_interval > 0 and \
                self.iteration % self.update_objective_interval == 0:
            self._iteration.append(self.iteration)
            self.update_objective()
        return self.iteration

    def get_output(self):  # lines 128-137
        return self.x

    def get_last_loss(self, return_all=False):  # lines 164-184
        try:
            objective = self.__loss[-1]
        except IndexError:
            objective = np.nan
        if isinstance(objective, list):
            return objective if return_all else objective[0]
        return [objective, np.nan, np.nan] if return_all else objective

    @property
    def iterations(self):  # lines 192-195
        return self._iteration

    @property
    def loss(self):  # lines 197-203
        return self.__loss

    @property
    def max_iteration(self):  # lines 207-216
        return self.__max_iteration

    @max_iteration.setter
    def max_iteration(self, value):
        assert isinstance(value, Integral) or np.isposinf(value)
        self.__max_iteration = value

    @property
    def update_objective_interval(self):  # lines 218-228
        return self.__update_objective_interval

    @update_objective_interval.setter
    def update_objective_interval(self, value):
        if not isinstance(value, Integral) or value < 0:
            raise ValueError("interval must be an integer >= 0")
        self.__update_objective_interval = value

    def run(self, iterations=None, callbacks=None, verbose=1):  # lines 230-285 (no default ProgressCallback)
        if iterations is None:
            raise ValueError("`run()` missing number of `iterations`")
        if np.isposinf(iterations) and callbacks is None:
            raise ValueError("Infinite iterations require a callback with a stopping criterion that raises "
                             "`StopIteration`")
        callbacks = list(callbacks or [])
        if self.iteration == -1 and self.update_objective_interval > 0:
            iterations += 1
        self.max_iteration = self.iteration + iterations
        iters = (count(self.iteration) if np.isposinf(self.max_iteration)
                 else range(self.iteration, self.max_iteration))
        for _ in iters:
            try:
                self.__next__()
                for callback in callbacks:
                    callback(self)
            except StopIteration:
                break
