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


class NoTailBinsError(DataValueError):
    """The tail mask of a scatter fit leaves no bin outside the object (the μ-map covers the whole field of view,
    or the ACF threshold / safety margin are too strict), so no scatter scale can be fitted."""


class ConfigError(SirfDdipError, ValueError):
    """An unknown, missing or ill-typed configuration key."""


class UnknownScannerError(ConfigError, KeyError):
    """A scanner name that is not one of the presets (also a ``KeyError``, as a failed look-up)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class GeometryError(SirfDdipError, ValueError):
    """Impossible geometry parameters: a non-positive voxel size, an odd detector count, a span that is even."""


class DeviceError(SirfDdipError, ValueError):
    """A compute device that does not exist on this machine (``cuda`` without a GPU) or is not a device name."""


class OutputPathError(SirfDdipError, ValueError):
    """An output path that cannot be used: wrong suffix, a folder that is a file, the same file twice.

    Parameters
    ----------
    path : str or Path
        The output at fault.
    message : str
        What is wrong.
    option : str, optional
        The command-line option or argument that named it (``--out``).
    """

    def __init__(self, path: str | Path, message: str, option: str | None = None):
        self.path = str(path)
        self.option = option
        where = f"{option} {self.path}" if option else self.path
        super().__init__(f"{where}: {message}")


class OutputWriteError(SirfDdipError, OSError):
    """Writing an output failed (disk full, file-size limit, permissions); the previous file is unchanged."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"{self.path}: cannot write ({reason}); any previous file of that name is unchanged "
                         "and no partial file was left")

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0])


class ResumeMismatchError(SirfDdipError, ValueError):
    """A checkpoint resumed with inputs (data, MR, prior) other than those it was made from, or of unknown origin."""


class OutputExistsError(SirfDdipError, FileExistsError):
    """Refusing to overwrite an existing output without an explicit ``overwrite``."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        super().__init__(f"{self.path}: output exists; refusing to overwrite (pass --overwrite / overwrite=True)")


class InputFileWarning(UserWarning):
    """An inconsistency in an input file that STIR tolerates: we go on as STIR does and say so.

    The message names the file, the key and both values; ``--strict`` (or
    :func:`sirf_ddip.utils.leniency.strict_inputs`) turns it into an :class:`InputFileError`.

    Parameters
    ----------
    path : str or Path
        The file at fault.
    message : str
        What is inconsistent and what is done about it.
    key : str, optional
        The header key at fault, if any.
    """

    def __init__(self, path: str | Path, message: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        where = f"{self.path}" + (f" [key '{key}']" if key is not None else "")
        super().__init__(f"{where}: {message}")


class ConfigWarning(UserWarning):
    """A setting that still loads but should be given another way (e.g. a superseded value: use its preset)."""
