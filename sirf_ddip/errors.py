"""Exception types shared by the whole package.

Every error that comes from user input names the file and, where there is one, the header or config key,
so that a PET user can fix the input without reading code.
"""

from __future__ import annotations

from pathlib import Path


class SirfDdipError(Exception):
    """Base class of all sirf_ddip errors."""


class InputFileError(SirfDdipError, ValueError):
    """A file (header, data or weights) is missing, corrupt or unsupported.

    Parameters
    ----------
    path : str or Path
        The file at fault.
    message : str
        What is wrong.
    key : str, optional
        The header key at fault, if any.
    """

    def __init__(self, path: str | Path, message: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        where = f"{self.path}"
        if key is not None:
            where += f" [key '{key}']"
        super().__init__(f"{where}: {message}")


class UnsupportedDataError(InputFileError):
    """Valid data that this version does not support (e.g. TOF projection data)."""


class GeometryMismatchError(SirfDdipError, ValueError):
    """Two objects (image/template, prompts/factors, MR/PET) do not share a geometry."""


class DataValueError(SirfDdipError, ValueError):
    """Data values that cannot be right: NaN, Inf or negative counts, for example."""


class ConfigError(SirfDdipError, ValueError):
    """An unknown, missing or ill-typed configuration key."""


class OutputExistsError(SirfDdipError, FileExistsError):
    """Refusing to overwrite an existing output without an explicit ``overwrite``."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        super().__init__(f"{self.path}: output exists; refusing to overwrite (pass --overwrite / overwrite=True)")
