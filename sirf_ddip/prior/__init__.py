"""sirf_ddip.prior: the MR-guided 2.5D diffusion prior.

- :mod:`.schedule`  ``NoiseSchedule`` (linear β, q_sample, Tweedie, DDIM)
- :mod:`.network`   ``ScoreNetwork`` / ``build_network`` (MONAI DiffusionModelUNet, 3-plane slabs, MR channels)
- :mod:`.scaling`   ``PETScaler`` / ``MRScaler`` (reversible image ⇄ network units)
- :mod:`.slabs`     whole-volume inference over overlapping slabs (``DiffusionPrior``, ``predict_eps``, ``predict_x0``)
- :mod:`.adapters`  peft LoRA (``add_lora``, ``lora_parameters``, ``reset_adapters``, adapter state)
- :mod:`.weights`   ``save_prior`` / ``load_prior`` / ``load_default`` → ``PriorBundle`` (safetensors + card)
- :mod:`.data`, :mod:`.train`  pretraining (phantoms or NIfTI pairs; DDP-ready, exact resume)
- :mod:`.grid`      ``PriorGrid`` (PET grid ⇄ the prior's in-plane training grid), ``mr_on_pet_grid``
- :mod:`.check`     ``prior check``: noise to step t and denoise, PSNR

Submodules are imported on use (``import sirf_ddip.prior`` stays cheap).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NoiseSchedule": "schedule",
    "ScoreNetwork": "network", "build_network": "network", "reinit_zero_layers": "network",
    "PETScaler": "scaling", "MRScaler": "scaling",
    "predict_eps": "slabs", "predict_x0": "slabs", "DiffusionPrior": "slabs", "volume_to_slabs": "slabs",
    "slabs_to_volume": "slabs",
    "add_lora": "adapters", "lora_parameters": "adapters", "adapter_state_dict": "adapters",
    "load_adapter_state_dict": "adapters", "reset_adapters": "adapters",
    "PriorBundle": "weights", "load_prior": "weights", "load_default": "weights", "save_prior": "weights",
    "PriorGrid": "grid", "PriorGridError": "grid", "mr_on_pet_grid": "grid",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
