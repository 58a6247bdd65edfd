"""Metrics of a batch image against its study's truth (when the study folder has one), and the ``report`` job.

A study folder with ``truth.hv`` and the masks ``mask_brain.hv``, ``mask_gm.hv``, ``mask_wm.hv`` (and optionally
``mask_lesion.hv``), as ``sirf-ddip simulate`` writes them, gets the metrics of :mod:`sirf_ddip.study.metrics`;
other studies (clinical data) get none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .plan import DONE_RECORD, Task

__all__ = ["image_metrics", "truth_of", "write_study_report"]

#: the metrics shown in batch.html
SHOWN = ("psnr", "ssim", "nrmse", "gm_bias", "lesion_bias", "noise")


def truth_of(study_dir: Path):
    """``(truth array, Regions, voxel size, MR array or None)`` of a study folder, or None without a truth."""
    from ..io import read_image
    from ..study.metrics import Regions

    d = Path(study_dir)
    need = [d / f for f in ("truth.hv", "mask_brain.hv", "mask_gm.hv", "mask_wm.hv")]
    if not all(p.is_file() for p in need):
        return None
    truth = read_image(need[0])
    masks = [read_image(p).array > 0.5 for p in need[1:]]
    lesion = read_image(d / "mask_lesion.hv").array > 0.5 if (d / "mask_lesion.hv").is_file() else None
    regions = Regions(*masks, lesion if lesion is not None and lesion.any() else None)
    mr = read_image(d / "mr.hv").array if (d / "mr.hv").is_file() else None
    return np.asarray(truth.array, np.float64), regions, tuple(truth.grid.voxel_size), mr


def image_metrics(study_dir: Path, image: Path) -> dict[str, Any] | None:
    """The metrics of ``image`` against the study's truth, or None when the study has no truth."""
    from ..io import read_image
    from ..study.metrics import all_metrics

    t = truth_of(study_dir)
    if t is None:
        return None
    truth, regions, _, _ = t
    x = np.asarray(read_image(image).array, np.float64)
    if x.shape != truth.shape:
        return None
    return all_metrics(x, truth, regions)


def write_study_report(task: Task) -> None:
    """The ``report`` job: ``metrics.json`` (every method's metrics and time) and, with a truth, ``report.html``."""
    from ..io import read_image
    from ..study.report import ReportCase, build_report
    from ..utils.atomic import write_text

    methods: dict[str, Any] = {}
    images: dict[str, np.ndarray] = {}
    for job, image in task.images.items():
        try:
            rec = json.loads((image.parent / DONE_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            methods[job] = {"error": "not done"}
            continue
        methods[job] = {**(rec.get("metrics") or {}), "time_s": rec.get("seconds")}
        if image.is_file():
            images[job] = np.asarray(read_image(image).array, np.float64)
    metrics = {"cases": {task.study: methods}}
    write_text(task.folder / "metrics.json", json.dumps(metrics, indent=2, default=str, allow_nan=False))
    t = truth_of(task.study_dir)
    if t is None:
        return
    truth, regions, voxel, mr = t
    case = ReportCase(task.study, truth, {k: v for k, v in images.items() if v.shape == truth.shape}, voxel,
                      mr=mr, brain=regions.brain, lesion=regions.lesion, description=str(task.study_dir))
    build_report(task.folder / "report.html", metrics, [case], title=f"sirf_ddip batch: {task.study}",
                 overwrite=True)
