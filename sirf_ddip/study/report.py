"""A self-contained HTML report of a simulation study (figures embedded as base64 PNG; also saved to ``figures/``).

Sections: what was compared; per case, images and error maps of every method side by side (one colour scale per
row, colour bars with units); the metrics table; bias–noise plots (with the OSEM iteration and MAP-RDP β sweeps
as curves); line profiles; and, for ablation studies, PSNR against LoRA rank, T′ and β (the paper's Figs 3–5).
Each section opens with a short paragraph saying what is shown and how to read it, so the report can be read
without the code.  Inputs are plain arrays and the ``metrics.json`` dictionary, so the report can be rebuilt
from a study folder at any time (:func:`sirf_ddip.study.study.rebuild_report`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..utils.atomic import write_bytes, write_text
from ..utils.provenance import check_output
from .metrics import METRIC_LABELS

__all__ = ["ReportCase", "build_report", "METHOD_LABELS", "TABLE_METRICS"]

#: display names of the study's methods (keys of metrics.json)
METHOD_LABELS: dict[str, str] = {
    "osem": "OSEM (best iteration)",
    "map_rdp": "MAP-RDP (oracle β)",
    "diffusion_no_finetune": "Diffusion prior, no fine-tuning",
    "ddip_no_mr": "DDIP without MR",
    "ddip": "DDIP (MR-conditioned)",
}
#: metrics in the table, in order
TABLE_METRICS: tuple[str, ...] = ("psnr", "ssim", "nrmse", "gm_bias", "wm_bias", "gm_wm_cr", "lesion_bias",
                                  "noise", "time_s")
_HIGHER_BETTER = {"psnr", "ssim"}
_LOWER_BETTER = {"nrmse", "time_s"}
_ABLATION_LABELS = {"lora_rank": "LoRA rank r", "t_start": "T′ (start step of the reverse diffusion)",
                    "beta": "HQS penalty β (network units)"}


@dataclass
class ReportCase:
    """Images of one case for the report.

    Attributes
    ----------
    name : case name (as in metrics.json).
    truth : ground-truth activity ``[z, y, x]``.
    images : method name → reconstruction (same shape).
    voxel_size_zyx : mm.
    units : activity units for colour bars (e.g. ``"kBq/mL"``).
    mr : optional MR image (shown in grey, first panel).
    brain : optional brain mask (for the colour scale and profile placement).
    lesion : optional lesion mask (the slice and the profile go through its centre).
    description : one line (tracer, dose) shown under the case title.
    """

    name: str
    truth: np.ndarray
    images: Mapping[str, np.ndarray]
    voxel_size_zyx: Sequence[float] = (1.0, 1.0, 1.0)
    units: str = "activity (a.u.)"
    mr: np.ndarray | None = None
    brain: np.ndarray | None = None
    lesion: np.ndarray | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ figure helpers
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig, save_to: Path | None) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    if save_to is not None:
        write_bytes(save_to, data)  # atomic: a temporary name, renamed when complete
    _plt().close(fig)
    return base64.b64encode(data).decode("ascii")


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _focus(case: ReportCase) -> tuple[int, int, int]:
    """Voxel the slices and profiles go through: the lesion centroid, else the brain's centre of mass."""
    for m in (case.lesion, case.brain):
        if m is not None and np.asarray(m).any():
            c = np.argwhere(np.asarray(m) > 0).mean(axis=0)
            return tuple(int(round(v)) for v in c)
    return tuple(s // 2 for s in case.truth.shape)


def _scale(case: ReportCase) -> float:
    t = np.asarray(case.truth, float)
    vals = t[np.asarray(case.brain) > 0] if case.brain is not None and np.asarray(case.brain).any() else t.ravel()
    return float(np.percentile(vals, 99.9)) * 1.15 if vals.size else float(t.max())


def _extent(case: ReportCase):
    nz, ny, nx = case.truth.shape
    _, vy, vx = case.voxel_size_zyx
    return [0, nx * vx, ny * vy, 0]


def _slices_figure(case: ReportCase, methods: Sequence[str], save_to: Path | None) -> str:
    plt = _plt()
    z, y, _ = _focus(case)
    ncol = len(methods) + 1 + (1 if case.mr is not None else 0)
    fig, axes = plt.subplots(2, ncol, figsize=(2.6 * ncol + 0.8, 5.6), squeeze=False)
    vmax = _scale(case)
    errs = [np.asarray(case.images[m], float)[z] - np.asarray(case.truth, float)[z] for m in methods]
    emax = max((float(np.percentile(np.abs(e), 99.5)) for e in errs), default=1.0) or 1.0
    ext = _extent(case)
    col = 0
    if case.mr is not None:
        axes[0, 0].imshow(np.asarray(case.mr)[z], cmap="gray", extent=ext)
        axes[0, 0].set_title("MR", fontsize=9)
        axes[1, 0].axis("off")
        col = 1
    im = axes[0, col].imshow(np.asarray(case.truth)[z], cmap="magma", vmin=0, vmax=vmax, extent=ext)
    axes[0, col].set_title("truth", fontsize=9)
    axes[1, col].axis("off")
    eim = None
    for i, m in enumerate(methods):
        c = col + 1 + i
        axes[0, c].imshow(np.asarray(case.images[m])[z], cmap="magma", vmin=0, vmax=vmax, extent=ext)
        axes[0, c].set_title(_label(m), fontsize=9)
        eim = axes[1, c].imshow(errs[i], cmap="RdBu_r", vmin=-emax, vmax=emax, extent=ext)
        axes[1, c].set_title(f"error: {_label(m)}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel(f"plane z={z}", fontsize=8)
    fig.colorbar(im, ax=list(axes[0, :]), shrink=0.85, label=case.units)
    if eim is not None:
        fig.colorbar(eim, ax=list(axes[1, :]), shrink=0.85, label=f"reconstruction − truth ({case.units})")
    fig.suptitle(f"{case.name}: transaxial plane {z} (row 1 images, row 2 errors)", fontsize=10)
    return _png(fig, save_to)


def _profile_figure(case: ReportCase, methods: Sequence[str], save_to: Path | None) -> str:
    plt = _plt()
    z, y, _ = _focus(case)
    nx = case.truth.shape[2]
    xs = (np.arange(nx) - (nx - 1) / 2) * case.voxel_size_zyx[2]
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.plot(xs, np.asarray(case.truth)[z, y], "k-", lw=2, label="truth")
    for m in methods:
        ax.plot(xs, np.asarray(case.images[m])[z, y], lw=1.2, label=_label(m))
    ax.set_xlabel("x (mm, from the image centre)")
    ax.set_ylabel(case.units)
    ax.set_title(f"{case.name}: profile along x through plane z={z}, row y={y}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig, save_to)


def lesion_components(lesion: np.ndarray | None) -> list[np.ndarray]:
    """The lesions of a lesion mask: its 26-connected components, largest first (empty list for no mask)."""
    if lesion is None or not np.asarray(lesion).any():
        return []
    from scipy import ndimage

    lab, n = ndimage.label(np.asarray(lesion) > 0, structure=np.ones((3, 3, 3), bool))
    comps = [lab == i for i in range(1, n + 1)]
    return sorted(comps, key=lambda m: -int(m.sum()))


def lesion_biases(case: ReportCase, methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per lesion: size, kind (hot/cold against its surroundings in the truth) and every method's mean bias (%)."""
    from scipy import ndimage

    t = np.asarray(case.truth, float)
    out = []
    for k, m in enumerate(lesion_components(case.lesion)):
        ring = ndimage.binary_dilation(m, iterations=2) & ~m
        if case.brain is not None:
            ring &= np.asarray(case.brain) > 0
        tl = float(t[m].mean())
        kind = "hot" if ring.any() and tl > float(t[ring].mean()) else "cold"
        row = {"lesion": k + 1, "voxels": int(m.sum()), "kind": kind, "truth_mean": tl,
               "centre_zyx": [int(round(v)) for v in np.argwhere(m).mean(axis=0)], "bias": {}}
        for meth in methods:
            x = np.asarray(case.images[meth], float)
            row["bias"][meth] = 100.0 * (float(x[m].mean()) - tl) / tl if tl != 0 else float("nan")
        out.append(row)
    return out


def _lesion_figure(case: ReportCase, methods: Sequence[str], rows: Sequence[Mapping[str, Any]],
                   save_to: Path | None, half: int = 12) -> str:
    """Per lesion: a zoomed crop (truth and every method, one colour scale) and a profile along x through it."""
    plt = _plt()
    n = len(rows)
    ncol = len(methods) + 2
    fig, axes = plt.subplots(n, ncol, figsize=(2.2 * ncol, 2.4 * n + 0.4), squeeze=False)
    vmax = _scale(case)
    _, vy, vx = case.voxel_size_zyx
    nz, ny, nx = case.truth.shape
    for r, row in enumerate(rows):
        z, y, x = row["centre_zyx"]
        y0, y1, x0, x1 = max(y - half, 0), min(y + half + 1, ny), max(x - half, 0), min(x + half + 1, nx)
        ext = [x0 * vx, x1 * vx, y1 * vy, y0 * vy]
        panels = [("truth", case.truth)] + [(_label(m), case.images[m]) for m in methods]
        for c, (name, img) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.asarray(img)[z, y0:y1, x0:x1], cmap="magma", vmin=0, vmax=vmax, extent=ext)
            title = name if c == 0 else f"{name}\n{row['bias'][methods[c - 1]]:+.0f} %"
            ax.set_title(title, fontsize=7)
            ax.axhline((y + 0.5) * vy, color="c", lw=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"lesion {row['lesion']} ({row['kind']}, {row['voxels']} vox)\nz={z}", fontsize=7)
        ax = axes[r, -1]
        xs = (np.arange(x0, x1) - x) * vx
        ax.plot(xs, np.asarray(case.truth)[z, y, x0:x1], "k-", lw=2, label="truth")
        for m in methods:
            ax.plot(xs, np.asarray(case.images[m])[z, y, x0:x1], lw=1, label=_label(m))
        ax.set_xlabel("mm from the lesion centre", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if r == 0:
            ax.legend(fontsize=5)
    fig.suptitle(f"{case.name}: lesions (zoom, mean bias per method; profile along the cyan line)", fontsize=9)
    fig.tight_layout()
    return _png(fig, save_to)


def _lesion_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(_label(m))}</th>" for m in methods)
    body = []
    for row in rows:
        vals = {m: row["bias"][m] for m in methods}
        best = min((abs(v) for v in vals.values() if np.isfinite(v)), default=None)
        cells = "".join(f"<td>{'<b>' if best is not None and abs(v) == best else ''}{v:+.1f}"
                        f"{'</b>' if best is not None and abs(v) == best else ''}</td>" for v in vals.values())
        body.append(f"<tr><th class='m'>{row['lesion']} ({row['kind']}, {row['voxels']} voxels)</th>{cells}</tr>")
    return f"<table><tr><th>lesion</th>{head}</tr>{''.join(body)}</table>"


def _finetune_ablation(metrics: Mapping[str, Any]) -> str | None:
    """Table: DDIP with against without fine-tuning, per case (the paper's ablation)."""
    rows = []
    for cname, cm in metrics.get("cases", {}).items():
        a, b = cm.get("ddip"), cm.get("diffusion_no_finetune")
        if not isinstance(a, Mapping) or not isinstance(b, Mapping) or "error" in a or "error" in b:
            continue
        cells = "".join(f"<td>{_fmt(b.get(k), k)}</td><td>{_fmt(a.get(k), k)}</td>"
                        for k in ("psnr", "ssim", "lesion_bias"))
        rows.append(f"<tr><th class='m'>{html.escape(cname)}</th>{cells}</tr>")
    if not rows:
        return None
    return ("<table><tr><th>case</th><th>PSNR without</th><th>PSNR with</th><th>SSIM without</th>"
            "<th>SSIM with</th><th>lesion bias without (%)</th><th>lesion bias with (%)</th></tr>"
            + "".join(rows) + "</table>")


def _bias_noise_figure(case_name: str, case_metrics: Mapping[str, Any], save_to: Path | None) -> str | None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn = False
    for ax, key in zip(axes, ("gm_bias", "lesion_bias")):
        for m, rec in case_metrics.items():
            if not isinstance(rec, Mapping):
                continue
            sweep = rec.get("sweep") or []
            pts = [(p.get("noise"), p.get(key)) for p in sweep if p.get("noise") is not None and p.get(key) is not None]
            if pts:
                a = np.array(pts, float)
                ax.plot(a[:, 0], a[:, 1], "-", marker=".", alpha=0.6, label=f"{_label(m)} sweep")
            if rec.get("noise") is not None and rec.get(key) is not None:
                ax.plot(rec["noise"], rec[key], "o", ms=8, label=_label(m))
                drawn = True
            clin = rec.get("clinical")
            if isinstance(clin, Mapping) and clin.get("noise") is not None and clin.get(key) is not None:
                ax.plot(clin["noise"], clin[key], "s", ms=7, label=f"{_label(m).split(' (')[0]} clinical")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel(METRIC_LABELS["noise"])
        ax.set_ylabel(METRIC_LABELS[key])
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{case_name}: bias against noise (best: bias near 0 at low noise)", fontsize=10)
    return _png(fig, save_to)


def _ablation_figure(ablations: Mapping[str, Sequence[Mapping[str, Any]]], save_to: Path | None) -> str | None:
    plt = _plt()
    keys = [k for k, v in ablations.items() if v]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = sorted(((float(p["value"]), p.get("psnr"), p.get("case", "")) for p in ablations[k]), key=lambda r: (r[2], r[0]))
        for case in sorted({p[2] for p in pts}):
            a = np.array([(v, s) for v, s, c in pts if c == case and s is not None], float)
            if a.size:
                ax.plot(a[:, 0], a[:, 1], "o-", label=case or None)
        if k == "beta" and all(p[0] > 0 for p in pts):
            ax.set_xscale("log")
        ax.set_xlabel(_ABLATION_LABELS.get(k, k))
        ax.set_ylabel(METRIC_LABELS["psnr"])
        ax.grid(alpha=0.3)
        if any(p[2] for p in pts):
            ax.legend(fontsize=7)
    fig.suptitle("DDIP ablations: PSNR against one setting at a time", fontsize=10)
    return _png(fig, save_to)


# ------------------------------------------------------------------------------------------ HTML helpers
def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            return "n/a"
        if key == "ssim" or key == "gm_wm_cr" or key == "nrmse":
            return f"{v:.4f}"
        return f"{v:.2f}"
    return html.escape(str(v))


def _metrics_table(case_metrics: Mapping[str, Any]) -> str:
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for m, rec in case_metrics.items():
        if not isinstance(rec, Mapping):
            continue
        rows.append((_label(m), rec))
        clin = rec.get("clinical")
        if isinstance(clin, Mapping):
            rows.append((f"{_label(m).split(' (')[0]} clinical ({html.escape(str(clin.get('description', '')))})",
                         {**clin, "time_s": clin.get("time_s")}))
    best: dict[str, float] = {}
    for k in TABLE_METRICS:
        vals = [r.get(k) for _, r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r.get(k))]
        if vals and k in _HIGHER_BETTER:
            best[k] = max(vals)
        elif vals and k in _LOWER_BETTER:
            best[k] = min(vals)
        elif vals and k in {"gm_bias", "wm_bias", "lesion_bias"}:
            best[k] = min(vals, key=abs)
        elif vals and k == "gm_wm_cr":
            best[k] = min(vals, key=lambda v: abs(v - 1))
    head = "".join(f"<th>{html.escape(METRIC_LABELS.get(k, k))}</th>" for k in TABLE_METRICS)
    body = []
    for label, r in rows:
        if "error" in r:
            body.append(f"<tr><th class='m'>{html.escape(label)}</th><td colspan='{len(TABLE_METRICS)}' "
                        f"style='text-align:left;color:#b00'>failed: {html.escape(str(r['error']))}</td></tr>")
            continue
        cells = []
        for k in TABLE_METRICS:
            v = r.get(k)
            s = _fmt(v, k)
            if k in best and isinstance(v, (int, float)) and v == best[k]:
                s = f"<b>{s}</b>"
            cells.append(f"<td>{s}</td>")
        body.append(f"<tr><th class='m'>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(body)}</table>"


_CSS = """
body{font-family:system-ui,Arial,sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
p.expl{background:#f6f8fa;border-left:4px solid #7a9;padding:.5em .8em;max-width:1000px}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th.m{text-align:left}img{max-width:100%}.small{color:#666;font-size:.85em}
"""


def _case_methods(metrics: dict, case) -> list[str]:
    """Methods of ``case`` that have images, in metrics.json order (else the images' own order)."""
    return [m for m in metrics.get("cases", {}).get(case.name, case.images) if m in case.images] or list(case.images)


def build_report(out_path: str | Path, metrics: Mapping[str, Any], cases: Sequence[ReportCase],
                 ablations: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 title: str = "sirf_ddip simulation study", info: Mapping[str, Any] | None = None,
                 overwrite: bool = False, save_figures: bool = True) -> Path:
    """Write a self-contained ``report.html``.

    Parameters
    ----------
    out_path : the HTML file (its folder also gets ``figures/*.png`` when ``save_figures``).
    metrics : the ``metrics.json`` dictionary ``{"cases": {case: {method: {...}}}}``; a method entry may hold
        ``"sweep"`` (list of metric dicts, drawn as bias–noise curves) and ``"clinical"`` (an extra row).
    cases : images per case (:class:`ReportCase`); cases without images still get their table.
    ablations : ``{"lora_rank"|"t_start"|"beta": [{"value": v, "psnr": p, "case": c}, ...]}``.
    info : key facts shown at the top (scanner, counts, seeds, wall time, versions).
    overwrite : replace an existing report.
    """
    out_path = check_output(out_path, overwrite)
    figdir = out_path.parent / "figures" if save_figures else None
    by_name = {c.name: c for c in cases}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<p class='small'>Generated {now} by sirf_ddip. All figures are embedded; the same PNGs are in "
                 "<code>figures/</code>.</p>")
    parts.append("<h2 id='overview'>Overview</h2><p class='expl'>Each case is a simulated low-dose PET scan of a "
                 "brain phantom with known true activity. Every method reconstructs the same measured data; images "
                 "are compared to the truth inside the brain. "
                 "<b>OSEM</b>: ordered-subsets expectation maximisation, shown at the iteration with the best PSNR "
                 "(an oracle choice) and at a fixed clinical setting. <b>MAP-RDP</b>: penalised maximum likelihood "
                 "with the relative difference prior, its strength β chosen by the best PSNR over a small sweep "
                 "(also an oracle choice, favourable to the baseline). <b>Diffusion prior, no fine-tuning</b>: the "
                 "pre-trained diffusion model used as a fixed prior. <b>DDIP</b>: the diffusion prior adapted to the "
                 "scan during reconstruction with LoRA, with or without the MR as conditioning input.</p>")
    if info:
        parts.append("<table>" + "".join(f"<tr><th class='m'>{html.escape(str(k))}</th><td style='text-align:left'>"
                                         f"{html.escape(str(v))}</td></tr>" for k, v in info.items()) + "</table>")

    parts.append("<h2 id='metrics'>Metrics</h2><p class='expl'>Computed inside masks of the true anatomy. "
                 "PSNR uses the peak of the truth in the brain and the mean squared error there (higher is better). "
                 "SSIM is the 3D structural similarity averaged over brain voxels (1 is perfect). NRMSE is "
                 "‖x−t‖/‖t‖ in the brain. Biases are the relative difference of the mean in grey matter (GM), white "
                 "matter (WM) or the lesion (0 is perfect). Contrast recovery is (x_GM/x_WM − 1)/(t_GM/t_WM − 1) "
                 "(1 is perfect). Noise is the coefficient of variation in an eroded white-matter region (the truth's "
                 "own variation there is listed in metrics.json as noise_truth). Time is the wall time of the "
                 "method on the machine given above. The best value of each column is in bold.</p>")
    for cname, cm in metrics.get("cases", {}).items():
        desc = by_name[cname].description if cname in by_name else ""
        parts.append(f"<h3>{html.escape(cname)}</h3><p class='small'>{html.escape(desc)}</p>{_metrics_table(cm)}")

    parts.append("<h2 id='images'>Images and error maps</h2><p class='expl'>One transaxial plane per case, "
                 "through the lesion when there is one. Top row: truth and each reconstruction on one shared colour "
                 "scale (units on the colour bar). Bottom row: reconstruction minus truth on one shared, symmetric "
                 "scale (red: too high, blue: too low). A good method shows a faithful image and a pale error map "
                 "without structure.</p>")
    for c in cases:
        methods = _case_methods(metrics, c)
        b64 = _slices_figure(c, methods, figdir / f"{c.name}_slices.png" if figdir else None)
        parts.append(f"<h3>{html.escape(c.name)}</h3><p class='small'>{html.escape(c.description)}</p>"
                     f"<img alt='slices {html.escape(c.name)}' src='data:image/png;base64,{b64}'>")

    parts.append("<h2 id='bias-noise'>Bias against noise</h2><p class='expl'>Each point is one reconstruction: "
                 "its noise (coefficient of variation in uniform white matter) against its bias in grey matter "
                 "(left) and in the lesion (right). Curves trace the OSEM iterations and the MAP-RDP β sweep; "
                 "large markers are the reported results, squares the clinical OSEM setting. Points near zero bias "
                 "(the black line) at little noise (left) are better; a method that only smooths moves along its "
                 "curve, a better prior moves off it, towards zero bias at the same noise.</p>")
    for cname, cm in metrics.get("cases", {}).items():
        b64 = _bias_noise_figure(cname, cm, figdir / f"{cname}_bias_noise.png" if figdir else None)
        if b64:
            parts.append(f"<h3>{html.escape(cname)}</h3><img alt='bias-noise {html.escape(cname)}' "
                         f"src='data:image/png;base64,{b64}'>")

    parts.append("<h2 id='profiles'>Line profiles</h2><p class='expl'>Values along one line (through the lesion "
                 "when there is one) for the truth (black) and each method. Look for the height of peaks "
                 "(recovered contrast), the sharpness of edges (resolution) and the wiggle in flat regions "
                 "(noise).</p>")
    for c in cases:
        methods = _case_methods(metrics, c)
        b64 = _profile_figure(c, methods, figdir / f"{c.name}_profile.png" if figdir else None)
        parts.append(f"<h3>{html.escape(c.name)}</h3><img alt='profile {html.escape(c.name)}' "
                     f"src='data:image/png;base64,{b64}'>")

    lesion_cases = [(c, _case_methods(metrics, c)) for c in cases if lesion_components(c.lesion)]
    if lesion_cases:
        parts.append("<h2 id='lesions'>Lesions</h2><p class='expl'>Each lesion (the MR does not show it) zoomed, "
                     "for the truth and every method on one colour scale, with the method's mean bias in the lesion, "
                     "and a profile along x through the lesion centre. A prior that erases what only the PET shows "
                     "fills a cold lesion (positive bias) or flattens a hot one (negative bias). The table gives the "
                     "mean bias (%) per lesion and method; the smallest magnitude is in bold.</p>")
        for c, methods in lesion_cases:
            rows = lesion_biases(c, methods)
            b64 = _lesion_figure(c, methods, rows, figdir / f"{c.name}_lesions.png" if figdir else None)
            parts.append(f"<h3>{html.escape(c.name)}</h3><img alt='lesions {html.escape(c.name)}' "
                         f"src='data:image/png;base64,{b64}'>{_lesion_table(rows, methods)}")

    ft = _finetune_ablation(metrics)
    if ft:
        parts.append("<h2 id='finetune'>Fine-tuning ablation</h2><p class='expl'>The paper's ablation: the same "
                     "diffusion prior and HQS data step with and without LoRA fine-tuning to the scan. On an "
                     "out-of-distribution tracer (amyloid-negative, white matter brighter than grey matter, for a "
                     "prior trained on FDG) the adaptation is what lets the prior follow the data.</p>" + ft)

    if ablations and any(ablations.values()):
        parts.append("<h2 id='ablations'>Ablations</h2><p class='expl'>DDIP run again with one setting changed at a "
                     "time, all else as in the main study: the LoRA rank (capacity of the adaptation), T′ (how much "
                     "noise the warm start is diffused to, i.e. how much the prior may change it) and the HQS "
                     "penalty β (how strongly the data-consistent image is pulled toward the network's estimate). "
                     "PSNR against the truth is shown for each value.</p>")
        b64 = _ablation_figure(ablations, figdir / "ablations.png" if figdir else None)
        if b64:
            parts.append(f"<img alt='ablations' src='data:image/png;base64,{b64}'>")
        rows = "".join(f"<tr><th class='m'>{html.escape(_ABLATION_LABELS.get(k, k))}</th><td>{html.escape(str(p.get('case', '')))}</td>"
                       f"<td>{_fmt(p.get('value'), '')}</td><td>{_fmt(p.get('psnr'), 'psnr')}</td>"
                       f"<td>{_fmt(p.get('ssim'), 'ssim')}</td></tr>"
                       for k, pts in ablations.items() for p in pts)
        parts.append(f"<table><tr><th>setting</th><th>case</th><th>value</th><th>PSNR (dB)</th><th>SSIM</th></tr>{rows}</table>")
    parts.append("</body></html>")
    write_text(out_path, "\n".join(parts))  # atomic, UTF-8
    return out_path
