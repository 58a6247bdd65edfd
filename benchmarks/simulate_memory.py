"""Peak memory of ``simulate_data`` alone (issue 33), in float64 sinograms and extrapolated to the full-size study.

The full-size study (``benchmarks/full_size_study.yaml``: mMR span 11, 837 x 252 x 344 = 72.6 M bins) has
0.58 GB per float64 sinogram, so the number of sinograms ``simulate_data`` holds at once sets its memory. This
measures it with ``tracemalloc`` (NumPy reports its allocations there) on an 8-ring span-1 mMR geometry with a
stand-in forward projector (random sinograms: no projector matrix), so that it takes seconds and little memory::

    python benchmarks/simulate_memory.py

(issue 33: 14.5 sinograms = 7.8 GiB at full size before the in-place rewrite, 6.6 = 3.6 GiB after). The whole
``sirf-ddip simulate``'s peak RSS, phantom and projector included: ``benchmarks/full_size.py --simulate``.
"""

from __future__ import annotations

import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sirf_ddip.geometry.scanner import get_scanner  # noqa: E402
from sirf_ddip.geometry.sinogram import SinogramGeometry  # noqa: E402
from sirf_ddip.sim.simulate import simulate_data  # noqa: E402

FULL_SIZE_BINS = 837 * 252 * 344


def main() -> int:
    g = SinogramGeometry(replace(get_scanner("mMR"), num_rings=8), span=1)
    grid = g.default_image_grid(xy=64)
    rng = np.random.default_rng(0)
    sinos = iter([(1 + rng.random(g.shape)).astype(np.float32), (0.1 * rng.random(g.shape)).astype(np.float32),
                  (1 + rng.random(g.shape)).astype(np.float32)])   # A x, A mu, A (x brain): stand-ins
    one = int(np.prod(g.shape)) * 8
    img = np.ones(grid.shape, np.float32)
    tracemalloc.start()
    data = simulate_data(img, img, g, lambda x: next(sinos), 1e6, np.random.default_rng(1), brain_fraction=img)
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del data
    print(f"simulate_data on {g.shape}: peak {peak / 2 ** 20:.0f} MiB = {peak / one:.1f} float64 sinograms "
          f"(returned: {cur / one:.1f}); at full size ({FULL_SIZE_BINS / 1e6:.1f} M bins): "
          f"{peak / one * FULL_SIZE_BINS * 8 / 2 ** 30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
