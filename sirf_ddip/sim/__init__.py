"""sirf_ddip.sim: brain phantoms from the MNI152 templates (:mod:`.phantoms`) and simulated low-dose studies
in the PETRIC folder layout (:mod:`.simulate`). Submodules are imported on use (nilearn/torch stay lazy)."""

__all__ = ["phantoms", "simulate"]
