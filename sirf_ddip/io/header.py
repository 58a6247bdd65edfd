"""Parsing of Interfile headers (STIR dialect) into a normalised, queryable mapping.

Keys are normalised: leading ``!`` dropped, lower case, runs of white space collapsed, spaces around
``[`` removed (``"!matrix size [1]"`` -> ``"matrix size [1]"``).  The ``Scanner parameters :=`` block keys are
stored with the same normalisation (they are unique in STIR headers).  Every lookup error names the file
and the key.

A key given more than once takes its last value, as in STIR's ``KeyParser`` (each occurrence assigns the
variable again); when the values differ, one :class:`~sirf_ddip.errors.InputFileWarning` names the key and both
values (strict mode, :func:`~sirf_ddip.utils.leniency.strict_inputs`, refuses the header instead).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from ..errors import InputFileError
from ..utils.leniency import lenient

_WS = re.compile(r"\s+")

#: encoding of the headers we write; STIR copies header bytes into file names unchanged, so UTF-8 names
#: written here are the names STIR opens on a UTF-8 file system
HEADER_ENCODING = "utf-8"


def decode_header(raw: bytes) -> str:
    """Header text: UTF-8 (what we write) when it decodes, else latin-1 (older headers with 8-bit bytes)."""
    try:
        return raw.decode(HEADER_ENCODING)
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _same_value(value: str) -> str:
    """A value as compared for repeated keys (case, white space and ``{ }`` spacing ignored)."""
    return "".join(value.split()).lower()


def normalise_key(key: str) -> str:
    """Normalise an Interfile key: strip ``!``, lower case, collapse white space."""
    k = key.strip().lstrip("!").strip().lower()
    k = _WS.sub(" ", k)
    k = k.replace(" [", "[").replace("[ ", "[").replace(" ]", "]")
    k = k.replace("[", " [")  # canonical: "matrix size [1]"
    return k


class InterfileHeader:
    """A parsed Interfile header.

    Parameters
    ----------
    path : path
        The header file (used in error messages and to resolve the data file).
    entries : list of (key, value)
        Normalised keys and raw string values, in file order.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, str]]):
        self.path = Path(path)
        self.entries = entries
        self._map: dict[str, str] = {}
        for k, v in entries:
            old = self._map.get(k)
            if old is not None and v == "":
                continue  # STIR assigns nothing for a key without a value
            if old and _same_value(old) != _same_value(v):
                lenient(self.path, f"key given twice with different values {old!r} and {v!r}; using the last, "
                        f"{v!r} (as STIR)", key=k,
                        refusal=f"key given twice with different values {old!r} and {v!r}")
            self._map[k] = v  # the last occurrence wins, as in STIR

    # ------------------------------------------------------------------ construction
    @classmethod
    def read(cls, path: str | Path) -> "InterfileHeader":
        """Read and parse ``path``; raises :class:`InputFileError` if missing or not Interfile."""
        path = Path(path)
        if path.is_dir():
            raise InputFileError(path, "is a folder, not an Interfile header")
        if not path.is_file():
            raise InputFileError(path, "header file not found")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InputFileError(path, f"cannot read header: {exc.strerror or exc}") from None
        return cls.parse(decode_header(raw), path)

    @classmethod
    def parse(cls, text: str, path: str | Path = "<string>") -> "InterfileHeader":
        entries: list[tuple[str, str]] = []
        lines = [ln for ln in text.splitlines()]
        first = next((ln for ln in lines if ln.strip()), "")
        if "INTERFILE" not in first.upper().replace(" ", "").replace("!", ""):
            raise InputFileError(path, "not an Interfile header (first line must be '!INTERFILE :=')",
                                 key="!INTERFILE")
        for raw in lines:
            line = raw.split(";", 1)[0] if raw.lstrip().startswith(";") else raw
            if ":=" not in line:
                continue
            key, value = line.split(":=", 1)
            entries.append((normalise_key(key), value.strip()))
        return cls(path, entries)

    # ------------------------------------------------------------------ mapping
    def __contains__(self, key: str) -> bool:
        return normalise_key(key) in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def keys(self):
        return self._map.keys()

    def get(self, key: str, default: str | None = None) -> str | None:
        """Raw string value of ``key`` or ``default``."""
        return self._map.get(normalise_key(key), default)

    def require(self, key: str) -> str:
        """Raw string value of ``key``; raises :class:`InputFileError` naming the key if absent."""
        v = self.get(key)
        if v is None or v == "":
            raise InputFileError(self.path, "required key missing", key=key)
        return v

    def get_float(self, key: str, default: float | None = None, required: bool = False) -> float | None:
        v = self.require(key) if required else self.get(key)
        if v is None or v == "":
            return default
        try:
            return float(v)
        except ValueError:
            raise InputFileError(self.path, f"expected a number, got {v!r}", key=key) from None

    def get_int(self, key: str, default: int | None = None, required: bool = False) -> int | None:
        v = self.get_float(key, None, required)
        if v is None:
            return default
        if not float(v).is_integer():
            raise InputFileError(self.path, f"expected an integer, got {v!r}", key=key)
        return int(v)

    def get_list(self, key: str, required: bool = False) -> list[float] | None:
        """Parse ``{a, b, c}`` (or a bare number) into a list of floats."""
        v = self.require(key) if required else self.get(key)
        if v is None or v == "":
            return None
        body = v.strip()
        if body.startswith("{") and body.endswith("}"):
            body = body[1:-1]
        try:
            return [float(t) for t in body.replace(",", " ").split()]
        except ValueError:
            raise InputFileError(self.path, f"expected a list like {{1,2,3}}, got {v!r}", key=key) from None

    def get_int_list(self, key: str, required: bool = False) -> list[int] | None:
        vals = self.get_list(key, required)
        if vals is None:
            return None
        if any(not float(x).is_integer() for x in vals):
            raise InputFileError(self.path, f"expected integers, got {self.get(key)!r}", key=key)
        return [int(x) for x in vals]

    def data_file(self) -> Path:
        """Path of the data file (``name of data file``), relative to the header's folder."""
        name = self.require("name of data file")
        p = Path(name)
        return p if p.is_absolute() else self.path.parent / p

    def __repr__(self) -> str:
        return f"InterfileHeader({str(self.path)!r}, {len(self._map)} keys)"
