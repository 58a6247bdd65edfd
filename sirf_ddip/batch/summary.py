"""The end of a batch: ``DIR/batch.json`` (one row per task) and ``DIR/batch.html`` (a table per study: each
job's method, status, time, metrics against the truth when the study has one, and the failure messages).

Both are written atomically, ``batch.json`` last.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .metrics import SHOWN

if TYPE_CHECKING:  # pragma: no cover
    from .manifest import Manifest
    from .runner import JobRecord

__all__ = ["write_summary", "batch_html", "SUMMARY_JSON", "SUMMARY_HTML"]

SUMMARY_JSON = "batch.json"
SUMMARY_HTML = "batch.html"
_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "nrmse": "NRMSE", "gm_bias": "GM bias (%)",
           "lesion_bias": "lesion bias (%)", "noise": "noise (CoV %)"}

_CSS = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td.l,th.l{text-align:left}"
        ".failed{background:#fdd}.skipped{color:#666}.msg{font-family:monospace;font-size:90%;text-align:left}")


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float)):
        return f"{v:.4f}" if key in ("ssim", "nrmse") else f"{v:.2f}"
    return html.escape(str(v))


def batch_html(records: Sequence["JobRecord"], manifest: "Manifest | None" = None) -> str:
    """The HTML page of a batch (self-contained)."""
    studies: dict[str, list] = {}
    for r in records:
        studies.setdefault(r.task.study, []).append(r)
    n = {s: sum(r.status == s for r in records) for s in ("done", "skipped", "failed")}
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    src = html.escape(str(manifest.path)) if manifest is not None else ""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sirf_ddip batch</title><style>{_CSS}"
             f"</style></head><body><h1>sirf_ddip batch</h1><p>{src} — {len(studies)} studies, {len(records)} "
             f"jobs: {n['done']} done, {n['skipped']} skipped (complete before), {n['failed']} failed. Generated "
             f"{now}.</p>"]
    for study, rows in studies.items():
        keys = [k for k in SHOWN if any((r.metrics or {}).get(k) is not None for r in rows)]
        parts.append(f"<h2>{html.escape(study)}</h2><p class='small'>{html.escape(str(rows[0].task.study_dir))}"
                     "</p><table><tr><th class='l'>job</th><th class='l'>method</th><th class='l'>status</th>"
                     "<th>time (s)</th><th>attempts</th>" + "".join(f"<th>{_LABELS[k]}</th>" for k in keys)
                     + "<th class='l'>message</th></tr>")
        for r in rows:
            m = r.metrics or {}
            parts.append(f"<tr class='{r.status}'><td class='l'>{html.escape(r.task.job)}</td><td class='l'>"
                         f"{r.task.method}</td><td class='l'>{r.status}</td><td>{_fmt(r.seconds, 's')}</td>"
                         f"<td>{r.attempts}</td>" + "".join(f"<td>{_fmt(m.get(k), k)}</td>" for k in keys)
                         + f"<td class='msg'>{html.escape(r.message)}</td></tr>")
        parts.append("</table>")
        if not keys:
            parts.append("<p class='small'>No metrics: the study folder has no truth.hv with its masks.</p>")
    parts.append("</body></html>")
    return "".join(parts)


def write_summary(out: Path, records: Sequence["JobRecord"], manifest: "Manifest | None" = None) -> None:
    """Write ``out/batch.html`` and ``out/batch.json`` (``{"jobs": [{"study", "job", "status", "message",
    "seconds", ...}]}``)."""
    from ..utils.atomic import write_text

    write_text(Path(out) / SUMMARY_HTML, batch_html(records, manifest))
    doc = {"manifest": str(manifest.path) if manifest is not None else None,
           "jobs": [r.as_json() for r in records]}
    write_text(Path(out) / SUMMARY_JSON, json.dumps(doc, indent=2, default=str))
