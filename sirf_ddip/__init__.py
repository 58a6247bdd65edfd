"""sirf_ddip: low-dose PET reconstruction with a Deep Diffusion Image Prior.

Layers (a sinogram travels one way: io -> geometry/physics -> recon; the prior sits beside recon):

- :mod:`sirf_ddip.geometry`  scanner, sinogram layout (STIR ``ProjDataInfoCylindricalNoArcCorr``), image grid
- :mod:`sirf_ddip.io`        STIR Interfile and NIfTI
- :mod:`sirf_ddip.physics`   projector, acquisition model, Poisson likelihood
- :mod:`sirf_ddip.prior`     diffusion U-Net, noise schedule, LoRA adapters, pretraining, default weights
- :mod:`sirf_ddip.recon`     OSEM, MAP-RDP, DDIP (on the physics.likelihood protocol)
- :mod:`sirf_ddip.backends`  sirf.STIR adapter (imported lazily)
- :mod:`sirf_ddip.sim`       brain phantoms and simulated studies
- :mod:`sirf_ddip.study`     metrics, reports, studies
"""

__version__ = "0.7.0"

__all__ = ["__version__", "DDIPReconstructor", "OSEMReconstructor"]


def __getattr__(name):  # lazy top-level re-exports keep ``import sirf_ddip`` cheap
    if name == "DDIPReconstructor":
        from .recon.ddip import DDIPReconstructor

        return DDIPReconstructor
    if name == "OSEMReconstructor":
        from .recon.osem import OSEMReconstructor

        return OSEMReconstructor
    raise AttributeError(f"module 'sirf_ddip' has no attribute {name!r}")
