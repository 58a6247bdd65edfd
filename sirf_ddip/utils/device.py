"""Device and dtype selection: never a hard-coded "cuda"."""

from __future__ import annotations

import torch

from ..errors import DeviceError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Resolve ``device``; ``None`` or ``"auto"`` picks CUDA when available, else CPU.

    Raises
    ------
    DeviceError
        If ``device`` is not a torch device name, or names a CUDA device this machine does not have.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"--device {device!r}: not a device name (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: this machine has no CUDA GPU that torch can use "
                              "(use --device cpu or auto)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"--device {device}: only {n} CUDA device(s) here (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device}: this machine has no Apple GPU (MPS) that torch can use")
    elif dev.type not in ("cpu", "mps"):
        raise DeviceError(f"--device {device}: device type {dev.type!r} is not supported (use auto, cpu or cuda)")
    return dev


def require_device_kind(want: str | None, have: str | torch.device, key: str = "device") -> torch.device:
    """``have`` (the data's device); :class:`ConfigError` when the setting ``want`` (not "auto") asks for another
    kind of device."""
    from ..errors import ConfigError

    if want not in ("auto", None) and resolve_device(want).type != torch.device(have).type:
        raise ConfigError(f"DDIP config: key '{key}' is {want!r} but the data step's tensors are on "
                          f"{have}; build the data step on the same device")
    return torch.device(have)
