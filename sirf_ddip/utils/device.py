"""Device and dtype selection: never a hard-coded "cuda"."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Resolve ``device``; ``None`` or ``"auto"`` picks CUDA when available, else CPU.

    Raises
    ------
    ValueError
        If a CUDA device is requested but unavailable.
    """
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but torch reports no CUDA device")
    return dev
