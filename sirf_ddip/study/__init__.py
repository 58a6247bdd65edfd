"""sirf_ddip.study: image-quality metrics, the HTML report and the simulation-study runner.

- :mod:`.metrics` — PSNR, SSIM, NRMSE, GM/WM/lesion bias, GM/WM contrast recovery, noise (numpy).
- :mod:`.report` — self-contained ``report.html`` (figures embedded).
- :mod:`.study` — ``StudyConfig`` and ``run_study`` (simulate → methods → metrics → report, resumable);
  CLI ``sirf-ddip study CONFIG --out DIR``.
"""

from .metrics import (METRIC_LABELS, Regions, all_metrics, contrast_recovery, mean_bias, noise_cov, nrmse, psnr,
                      ssim, uniform_region)

__all__ = ["METRIC_LABELS", "Regions", "all_metrics", "contrast_recovery", "mean_bias", "noise_cov", "nrmse", "psnr",
           "ssim", "uniform_region", "StudyConfig", "load_study_config", "run_study", "build_report"]


def __getattr__(name):  # lazy: the runner and report pull in more modules
    if name in ("StudyConfig", "load_study_config", "run_study"):
        from . import study as _s

        return getattr(_s, name)
    if name == "build_report":
        from .report import build_report

        return build_report
    raise AttributeError(name)
