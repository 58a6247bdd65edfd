"""Atomic outputs: write to a temporary name in the same folder, rename into place only when complete.

A failure while writing (disk full, the ``ulimit -f`` file-size limit, an exception in the writer) removes the
temporary files and leaves any previous output of the same name untouched; a killed process leaves at most a
hidden ``.tmp-*`` file, never a truncated output. A group of files written together (an Interfile header and
its data file) is renamed into place data first, header last, so a header never points at data it does not
describe for longer than one ``rename``.

Usage
-----
>>> with atomic_paths(data_path, header_path) as (tmp_data, tmp_header):  # doctest: +SKIP
...     array.tofile(tmp_data)
...     tmp_header.write_text(text)
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Iterator

from ..errors import OutputPathError, OutputWriteError

__all__ = ["temporary_name", "atomic_paths", "atomic_path", "write_bytes", "write_text", "ensure_folder"]


def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden name in ``path``'s folder that keeps its suffix (writers such as nibabel read the suffix)."""
    p = Path(path)
    return p.with_name(f".tmp-{secrets.token_hex(4)}-{p.name}")


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents); a part of it that is a file is an :class:`OutputPathError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise OutputPathError(folder, f"cannot create the output folder: {blocker} is a file") from None
    except OSError as exc:
        raise OutputWriteError(folder, exc.strerror or str(exc)) from None
    return folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"{exc.strerror or 'no space'}: disk full or file-size limit"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield temporary paths for ``paths``; on success rename them into place in the given order.

    Raises
    ------
    OutputWriteError
        When the body raises an ``OSError`` (disk full, permissions); the temporaries are removed and
        existing files are unchanged. Other exceptions propagate unchanged after the same clean-up.
    """
    finals = [Path(p) for p in paths]
    for f in finals:
        ensure_folder(f.parent)
    tmps = [temporary_name(f) for f in finals]
    try:
        yield tmps
        for t in tmps:
            _fsync(t)
    except BaseException as exc:
        for t in tmps:
            with contextlib.suppress(OSError):
                t.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            name = getattr(exc, "filename", None)
            bad = next((f for f, t in zip(finals, tmps) if name is not None and str(t) == str(name)), finals[0])
            raise OutputWriteError(bad, _reason(exc)) from exc
        raise
    try:
        for t, f in zip(tmps, finals):
            os.replace(t, f)
    except OSError as exc:
        for t in tmps:
            with contextlib.suppress(OSError):
                t.unlink()
        raise OutputWriteError(finals[0], _reason(exc)) from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_paths` for one file."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 unless told otherwise)."""
    return write_bytes(path, text.encode(encoding))
