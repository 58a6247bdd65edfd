"""Benchmark of the data-preparation pieces on the real mMR material: ECAT8 norm and μ-map attenuation on the
full span-11 template, with their agreement with STIR 6.4 on the stored views.

Usage::

    python benchmarks/prepare.py                   # both
    python benchmarks/prepare.py --skip-attenuation
    SIRF_DDIP_SHARED=/path/to/shared python benchmarks/prepare.py

Prints seconds, peak resident memory (MB) and the relative L2 / max-abs difference with STIR.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from sirf_ddip.io.sinogram_header import geometry_from_header

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reference(geom, npz: Path):
    ref = np.load(npz)
    R = np.zeros((geom.num_sinograms, len(ref["views"]), geom.num_tangential), np.float32)
    for i, sg in enumerate(geom.segments):
        R[geom.segment_slice(sg.number)] = ref[f"seg{i}"]
    return ref["views"], R


def main(argv=None) -> int:
    from sirf_ddip.io.header import InterfileHeader
    from sirf_ddip.io.mumap import read_mu_map
    from sirf_ddip.io.siemens_norm import read_ecat8_norm
    from sirf_ddip.physics.attenuation import attenuation_factors
    from sirf_ddip.physics.normalisation import ecat8_efficiencies

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-attenuation", action="store_true")
    args = ap.parse_args(argv)
    mmr = Path(os.environ.get("SIRF_DDIP_SHARED", REPO.parent / "shared")) / "real-mmr"
    if not (mmr / "norm.n.hdr").is_file():
        print(f"real mMR material not found under {mmr}", file=sys.stderr)
        return 1
    geom = geometry_from_header(InterfileHeader.read(mmr / "templates" / "template_span11.hs"))
    print(f"geometry: {geom.describe()}")
    t0 = time.perf_counter()
    eff = ecat8_efficiencies(read_ecat8_norm(mmr / "norm.n.hdr"), geom)
    t1 = time.perf_counter()
    views, R = _reference(geom, mmr / "norm_efficiencies_shared_views.npz")
    e = eff[:, views]
    print(f"norm: {t1 - t0:.1f} s, peak {_peak_mb():.0f} MB, rel L2 vs STIR {np.linalg.norm(e - R) / np.linalg.norm(R):.3g}, "
          f"gaps identical: {bool(np.array_equal(e == 0, R == 0))}, zero fraction {np.mean(eff == 0):.4f}")
    del eff
    if not args.skip_attenuation:
        t0 = time.perf_counter()
        att = attenuation_factors(read_mu_map(mmr / "mu_map.hv"), geom).array
        t1 = time.perf_counter()
        views, R = _reference(geom, mmr / "attenuation" / "attenuation_factors_shared_views.npz")
        a = att[:, views]
        print(f"attenuation: {t1 - t0:.1f} s, peak {_peak_mb():.0f} MB, max abs vs STIR {np.abs(a - R).max():.3g}, "
              f"rel L2 {np.linalg.norm(a - R) / np.linalg.norm(R):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
