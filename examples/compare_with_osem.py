"""Compare OSEM and DDIP on one simulated low-dose case, in ~40 lines of the Python API.

    python examples/compare_with_osem.py /tmp/example_case

Simulates a small mMR slab (FDG, 10 % dose), reconstructs it with OSEM (3 × 21 clinical-equivalent iterations)
and DDIP (shipped prior and settings: ~6-7 min on 2 CPU cores) and prints PSNR, SSIM, biases and noise against the
truth.
"""

import sys
import time
from pathlib import Path

from sirf_ddip.recon.ddip import DDIPReconstructor
from sirf_ddip.recon.osem import OSEMReconstructor
from sirf_ddip.sim.simulate import SimulationConfig, simulate_study
from sirf_ddip.study.metrics import all_metrics
from sirf_ddip.study.study import load_case

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_case")
if not (out / "case.json").is_file():
    simulate_study(SimulationConfig(tracer="fdg", dose_fraction=0.1, seed=0, num_rings=4, max_ring_diff=3,
                                    view_mashing=2), out)
case = load_case(out)                   # data step (built-in engine), truth, masks, MR
ds, template = case.data_step, case.template

t0 = time.perf_counter()
osem = OSEMReconstructor(ds, num_subsets=7, num_iterations=9, postfilter_fwhm=4.0)   # ≙ 3 it × 21 subsets
osem.set_up(template)
osem.set_current_estimate(template.with_array(template.array * 0 + 1))
osem.process()
x_osem, t_osem = ds.to_tensor(osem.get_output()), time.perf_counter() - t0

t0 = time.perf_counter()
ddip = DDIPReconstructor()              # shipped settings; e.g. DDIPReconstructor(beta=5.0, num_steps=100)
ddip.set_anatomical_image(case.mr)
ddip.set_objective_function(ds)
image = template.with_array(template.array * 0 + 1)   # SIRF style: reconstruct(image) writes the result into image
ddip.reconstruct(image)
x_ddip, t_ddip = ds.to_tensor(image), time.perf_counter() - t0

for name, x, t in (("OSEM 9x7 + 4 mm", x_osem, t_osem), ("DDIP", x_ddip, t_ddip)):
    m = all_metrics(x.cpu().numpy(), case.truth, case.regions, extra={"time_s": t})
    print(f"{name:16s}", "  ".join(f"{k}={v:.3g}" for k, v in m.items() if v is not None))
