"""Progress bars that behave in terminals, logs and CI (tqdm, disabled when not wanted)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_enabled(default: bool = True) -> bool:
    """Progress is shown unless ``SIRF_DDIP_PROGRESS=0``."""
    env = os.environ.get("SIRF_DDIP_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "no", "off")
    return default


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
             enabled: bool | None = None, **kw):
    """A tqdm progress bar on stderr (a no-op wrapper if disabled)."""
    from tqdm.auto import tqdm

    disable = not (progress_enabled() if enabled is None else enabled)
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, **kw)
