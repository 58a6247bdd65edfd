"""Lenient where STIR is lenient: one warning per inconsistency of an input, or a refusal in strict mode.

STIR goes on with some inconsistent inputs (a Siemens listmode whose ``%segment table`` or word count does not
describe the file, a header key given twice); we do the same, with one :class:`~sirf_ddip.errors.InputFileWarning`
that names the file, the key and both values. Strict mode (``--strict`` on the command line,
:func:`strict_inputs` in Python) refuses them instead with an :class:`~sirf_ddip.errors.InputFileError`.

Usage
-----
>>> with collect_input_warnings("sirf-ddip listmode") as seen:  # doctest: +SKIP
...     header = read_listmode_header(path)     # warnings are printed once each and kept in ``seen``
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
from pathlib import Path
from typing import Iterator

from ..errors import InputFileError, InputFileWarning

__all__ = ["strict_inputs", "is_strict", "lenient", "collect_input_warnings"]

_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("sirf_ddip_strict_inputs", default=False)


@contextlib.contextmanager
def strict_inputs(strict: bool = True) -> Iterator[None]:
    """Inside the block, inconsistencies STIR tolerates are refused (``strict=True``) or warned about."""
    token = _STRICT.set(bool(strict))
    try:
        yield
    finally:
        _STRICT.reset(token)


def is_strict(strict: bool | None = None) -> bool:
    """``strict`` if given, else the mode set by :func:`strict_inputs` (default: lenient)."""
    return _STRICT.get() if strict is None else bool(strict)


def lenient(path: str | Path, message: str, key: str | None = None, *, refusal: str | None = None,
            strict: bool | None = None, error: type[InputFileError] = InputFileError) -> None:
    """Warn that ``path`` is inconsistent (``message``: what and what is done), or refuse in strict mode.

    Parameters
    ----------
    path, key : the file and header key at fault.
    message : str
        The warning: the inconsistency with both values and what is done instead (as STIR).
    refusal : str, optional
        The error message in strict mode (default ``message``).
    strict : bool, optional
        Overrides the mode of :func:`strict_inputs`.
    error : type
        The error class raised in strict mode.

    Raises
    ------
    InputFileError
        In strict mode.
    """
    if is_strict(strict):
        raise error(path, refusal or message, key=key)
    warnings.warn(InputFileWarning(path, message, key), stacklevel=3)


@contextlib.contextmanager
def collect_input_warnings(prog: str = "sirf-ddip", stream=None) -> Iterator[list[str]]:
    """Print each :class:`InputFileWarning` raised in the block once, as ``prog: warning: ...``, and collect
    their texts in the yielded list (for the run record). Other warnings are shown as usual."""
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", InputFileWarning)
        show = warnings.showwarning

        def _show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, InputFileWarning):
                return show(message, category, filename, lineno, file, line)
            text = " ".join(str(message).split())
            if text not in seen:
                seen.append(text)
                print(f"{prog}: warning: {text}", file=stream or sys.stderr)

        warnings.showwarning = _show
        yield seen
