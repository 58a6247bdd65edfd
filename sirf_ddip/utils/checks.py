"""Checks of array values that no valid PET input can have (NaN, Inf), with messages naming the file."""

from __future__ import annotations

import numpy as np

from ..errors import DataValueError

__all__ = ["require_finite"]


def require_finite(array, source: str, what: str = "values") -> None:
    """Raise :class:`DataValueError` if ``array`` holds NaN or ±Inf, naming ``source`` and the first bad index.

    Parameters
    ----------
    array : array-like
    source : str
        The file (or option) the values came from.
    what : str
        What they are (``"image"``, ``"projection data"``), for the message.
    """
    a = np.asarray(array)
    if a.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(a)
    if not bad.any():
        return
    n_nan = int(np.count_nonzero(np.isnan(a)))
    n_inf = int(np.count_nonzero(bad)) - n_nan
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise DataValueError(f"{source}: {n_nan} NaN and {n_inf} Inf value(s) in the {what} (first at index "
                         f"{list(first)}); no valid PET input has them: fix or regenerate the file")
