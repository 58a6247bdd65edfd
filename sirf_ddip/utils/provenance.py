"""Output folders that say how they were made: resolved config, seed, versions; safe writing."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Mapping

from ..errors import OutputExistsError, OutputPathError
from .atomic import ensure_folder, write_text


def versions() -> dict[str, str]:
    """Versions of Python, this package and the key dependencies (those importable)."""
    from .. import __version__

    out = {"python": sys.version.split()[0], "sirf_ddip": __version__, "platform": platform.platform()}
    from importlib import metadata

    for dist in ("torch", "numpy", "peft", "monai", "nibabel", "nilearn", "safetensors", "scipy"):
        try:  # package metadata: no import of heavy modules
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - optional
            pass
    torch = sys.modules.get("torch")
    if torch is not None:  # report CUDA only when torch is already loaded by the run
        out["cuda"] = getattr(torch.version, "cuda", None) or "none"
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    try:  # SIRF is optional and imported only if already importable
        import importlib.util

        if importlib.util.find_spec("sirf") is not None:
            import sirf  # type: ignore

            out["sirf"] = str(getattr(sirf, "__version__", "present"))
    except Exception:  # pragma: no cover
        pass
    return out


def check_output_path(path: str | Path, overwrite: bool = False, option: str | None = None) -> Path:
    """Check, without creating anything, that ``path`` can be written as a new file.

    Parameters
    ----------
    path : path
    overwrite : bool
        Allow an existing file of that name.
    option : str, optional
        The option that named it (``--out``), for the message.

    Raises
    ------
    OutputPathError
        ``path`` is a folder, a part of its folder is a file, or its folder is not writable.
    OutputExistsError
        The file (or a symbolic link, even a dangling one) exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(path, "is a folder, not a file name", option)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(path, f"cannot be created: {parent} is a file, not a folder", option)
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(path, f"cannot be created: no permission to write in {parent}", option)
            break
    if (path.exists() or path.is_symlink()) and not overwrite:  # a dangling link is an existing name too
        raise OutputExistsError(path)
    return path


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Return ``path`` as a Path, refusing an existing file unless ``overwrite``; creates its folder.

    Raises
    ------
    OutputExistsError
        If the file exists and ``overwrite`` is False.
    OutputPathError
        If ``path`` is a folder or a part of its folder is a file.
    """
    path = check_output_path(path, overwrite)
    if path.exists() and overwrite:
        print(f"note: overwriting existing {path}", file=sys.stderr)
    ensure_folder(path.parent)
    return path


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except Exception:  # pragma: no cover
        pass
    return obj


def write_run_record(folder: str | Path, config: Any = None, seed: int | None = None,
                     command: list[str] | None = None, extra: Mapping[str, Any] | None = None,
                     name: str = "run_record") -> Path:
    """Write ``<folder>/<name>.json`` (config, seed, versions, command, time) and ``<name>_config.yaml``, atomically.

    Returns
    -------
    Path
        The JSON file written.
    """
    folder = ensure_folder(folder)
    texts = run_record_texts(folder, config, seed, command, extra, name)
    for path, text in texts.items():  # atomically (a temporary name, renamed when complete), the record last
        write_text(path, text)
    return folder / f"{name}.json"


def run_record_texts(folder: str | Path, config: Any = None, seed: int | None = None,
                     command: list[str] | None = None, extra: Mapping[str, Any] | None = None,
                     name: str = "run_record") -> dict[Path, str]:
    """The files of :func:`write_run_record` and their texts, the JSON record last (nothing is written), so that
    a command can write them in one set with its outputs (:func:`~sirf_ddip.utils.atomic.atomic_paths`)."""
    folder = Path(folder)
    record = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else sys.argv,
        "cwd": os.getcwd(),
        "seed": seed,
        "config": _jsonable(config),
        "versions": versions(),
    }
    if extra:
        record.update({k: _jsonable(v) for k, v in extra.items()})
    texts: dict[Path, str] = {}
    if config is not None:
        import yaml

        texts[folder / f"{name}_config.yaml"] = yaml.safe_dump(_jsonable(config), sort_keys=False,
                                                               allow_unicode=True)
    texts[folder / f"{name}.json"] = json.dumps(record, indent=2, default=str)
    return texts


def run_record_paths(folder: str | Path, name: str = "run_record", with_config: bool = True) -> list[Path]:
    """The files :func:`write_run_record` writes, so that a command can check them before any work."""
    folder = Path(folder)
    return [folder / f"{name}.json"] + ([folder / f"{name}_config.yaml"] if with_config else [])
