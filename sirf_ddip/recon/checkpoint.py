"""DDIP checkpoint files: one ``torch.save`` state per folder, written atomically, read with checks.

The reconstructor (:meth:`sirf_ddip.recon.ddip.DDIPReconstructor.save_checkpoint` / ``load_checkpoint``) decides
*what* a state holds (x_t, the HQS image, x̂0, adapters, RNG state, step, the algorithm settings); this module owns
the file: its name and format tag, the atomic write (temporary name in the same folder, then ``os.replace``, so an
interrupted save leaves the previous checkpoint intact), the JSON sidecar a user can read, and the checks on
reading (missing, corrupt, other format, other algorithm settings, other image shape), each a named error naming
the file and the key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InputFileError
from ..utils.atomic import atomic_path, write_text

CHECKPOINT_FORMAT = "sirf_ddip-ddip-checkpoint/2"
CHECKPOINT_FILE = "ddip_checkpoint.pt"
SIDECAR_FILE = "ddip_checkpoint_config.json"


def write_checkpoint(folder: str | os.PathLike, state: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write ``state`` (+ the format tag and the algorithm ``config``) to ``folder/ddip_checkpoint.pt``.

    Returns
    -------
    Path
        The checkpoint file.
    """
    folder = Path(folder)
    full = {"format": CHECKPOINT_FORMAT, "config": json.dumps(config), **state}
    path = folder / CHECKPOINT_FILE
    with atomic_path(path) as tmp:
        torch.save(full, tmp)
    write_text(folder / SIDECAR_FILE,
               json.dumps({"iteration": int(state.get("iteration", 0)), "config": config}, indent=2))
    return path


def read_checkpoint(folder: str | os.PathLike, config: dict[str, Any],
                    image_shape: tuple[int, ...], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read ``folder/ddip_checkpoint.pt`` and check it against this run.

    Parameters
    ----------
    folder : path
    config : dict
        This run's algorithm settings (:meth:`DDIPConfig.algorithm_dict`); every key must match the checkpoint's.
    image_shape : tuple
        This run's image shape.
    defaults : dict, optional
        Values of keys added after a checkpoint was written (the key's default, which keeps the behaviour of the
        version that wrote it): a key missing from the checkpoint's config counts as this value.

    Raises
    ------
    InputFileError
        Missing or unreadable file, unknown format, other image shape.
    ConfigError
        Other algorithm settings (the keys and both values are named).
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise InputFileError(path, "no DDIP checkpoint here")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise InputFileError(path, f"cannot read checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else None
        raise InputFileError(path, f"unknown checkpoint format {fmt!r} (this version writes {CHECKPOINT_FORMAT!r})",
                             key="format")
    try:
        saved = json.loads(state["config"])
    except (KeyError, TypeError, ValueError):
        raise InputFileError(path, "checkpoint has no readable config", key="config") from None
    saved = {**{k: v for k, v in (defaults or {}).items() if k not in saved}, **saved}
    diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if diff:
        raise ConfigError(f"{path}: checkpoint config differs from this run in key(s) "
                          + ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {config.get(k)!r})" for k in diff))
    if list(state.get("image_shape", [])) != [int(s) for s in image_shape]:
        raise InputFileError(path, f"checkpoint image shape {state.get('image_shape')} != {list(image_shape)}",
                             key="image_shape")
    return state


def check_resumable(state: dict[str, Any], folder: str | os.PathLike, prior_grid: str | None,
                    xt_shape: tuple[int, ...]) -> None:
    """:class:`InputFileError` when a checkpoint was made on another prior grid or with another ``x_t`` shape.

    ``prior_grid`` is this run's ``PriorGrid.describe()`` (None: the PET grid is the prior's own).
    """
    where = Path(folder) / CHECKPOINT_FILE
    if "prior_grid" in state and state["prior_grid"] != prior_grid:
        raise InputFileError(where, f"checkpoint made on {state['prior_grid'] or 'the prior grid itself'}, "
                                    f"this run is on {prior_grid or 'the prior grid itself'}", key="prior_grid")
    if tuple(state["xt"].shape) != tuple(xt_shape):
        raise InputFileError(where, f"checkpoint x_t shape {tuple(state['xt'].shape)} != this run's "
                                    f"{tuple(xt_shape)} (another prior or prior grid)", key="xt")
