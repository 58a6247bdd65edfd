"""DDIP checkpoint files: one ``torch.save`` state per folder, written atomically, read with checks.

:class:`CheckpointMixin` says *what* a state of :class:`sirf_ddip.recon.ddip.DDIPReconstructor` holds (x_t, the
HQS image, x̂0, adapters, RNG state, step, the algorithm settings); this module also owns the file: its name and
format tag, the atomic write (temporary name in the same folder, then ``os.replace``, so an interrupted save leaves
the previous checkpoint intact), the JSON sidecar a user can read, and the checks on reading (missing, corrupt,
other format, other algorithm settings, other image shape, other prior grid), each a named error naming the file
and the key.
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


class CheckpointMixin:
    """``save_checkpoint`` / ``load_checkpoint`` of :class:`~sirf_ddip.recon.ddip.DDIPReconstructor`: what its
    state holds (:meth:`_checkpoint_state`) and how it is put back (:meth:`_restore_checkpoint_state`)."""

    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/ddip_checkpoint.pt``: the state (:meth:`_checkpoint_state`) and the algorithm settings."""
        from .base import NotSetUpError

        self._require_setup()
        if self._xt is None:
            raise NotSetUpError("DDIP: nothing to checkpoint before the warm start")
        return write_checkpoint(folder, self._checkpoint_state(), self.config.algorithm_dict())

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore a :meth:`save_checkpoint` state (after ``set_up`` on the same data, prior and MR).

        Raises
        ------
        InputFileError
            Missing/corrupt checkpoint, or one of another image shape or prior grid.
        ConfigError
            An algorithm key differs (the ``run`` options need not match).
        """
        from .config import DDIPConfig

        self._require_setup()
        state = read_checkpoint(folder, self.config.algorithm_dict(), tuple(self.data_step.image_shape),
                                defaults=DDIPConfig().algorithm_dict())
        grid, ds = self.prior_grid, self.data_step
        hw = ds.image_shape[1:] if grid is None else grid.prior_shape_yx
        check_resumable(state, folder, None if grid is None else grid.describe(),
                        tuple(int(v) for v in (ds.image_shape[0], *hw)))
        self._restore_checkpoint_state(state)

    def _checkpoint_state(self) -> dict[str, Any]:
        """x_t, the HQS image, x̂0, the output, the adapters and optimiser, the RNG, the step, the EM count, the PET
        scale, the prior's grid and planes, and the diagnostics and timings so far."""
        cpu = {k: getattr(self, a).detach().cpu() for k, a in
               (("xt", "_xt"), ("x_img", "_x_img"), ("x0_net", "_x0_net"), ("x", "x"))}
        ad = self.adaptation.state_dict() if self.adaptation is not None else {"adapters": {}, "optimizer": None}
        planes = self.prior_planes
        return {"iteration": int(self.iteration), "timesteps": [int(t) for t in self.sampler.timesteps],
                "image_shape": [int(s) for s in self.data_step.image_shape], **cpu, **ad,
                "generator": self._gen.get_state(), "em_counter": int(self.image_step.em_counter),
                "pet_scale": float(self.pet_scaler.scale), "last_loss": self.last_loss,
                "user_init": bool(self._user_init), "loglik_warm_start": self.loglik_warm_start,
                "loglik_history": [float(v) for v in self.loglik_history], "loglik_final_em": self.loglik_final_em,
                "loglik_steps": [int(v) for v in self.loglik_steps],
                "prior_grid": None if self.prior_grid is None else self.prior_grid.describe(),
                "prior_planes": [bool(v) for v in planes.tolist()] if planes is not None else None,
                "timings": dict(self.timings), "counts": dict(self.counts)}

    def _restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Put a :meth:`_checkpoint_state` (read and checked) back."""
        dev, dt = self.device, self.data_step.dtype
        self.sampler.timesteps = list(state["timesteps"])
        self._xt, self._x0_net = state["xt"].to(dev), state["x0_net"].to(dev)
        self._x_img, self.x = state["x_img"].to(dev, dt), state["x"].to(dev, dt)
        if self.adaptation is not None:
            self.adaptation.load_state_dict(state["adapters"], state.get("optimizer"))
        self._gen.set_state(state["generator"])
        self.image_step.em_counter = int(state["em_counter"])
        self.prior.set_pet_scale(float(state["pet_scale"]))
        self.last_loss, self._user_init = state.get("last_loss"), bool(state.get("user_init", False))
        self.loglik_warm_start, self.loglik_final_em = state.get("loglik_warm_start"), state.get("loglik_final_em")
        self.loglik_history = [float(v) for v in state.get("loglik_history", [])]
        # a checkpoint from before run.loglik_every holds the diagnostic of every step
        self.loglik_steps = [int(v) for v in state.get("loglik_steps", range(1, len(self.loglik_history) + 1))]
        planes = state.get("prior_planes")   # a checkpoint from before prior_planes ran the prior on every plane
        self._use_prior_planes(torch.tensor(planes, dtype=torch.bool) if planes is not None else None)
        for mine, key in ((self.timings, "timings"), (self.counts, "counts")):   # the whole run's time and work
            mine.clear()
            mine.update(state.get(key) or {})
        self.iteration = int(state["iteration"])
