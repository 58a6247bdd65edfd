"""Tabulate ``benchmarks/ddip_sweep.py`` results per validation case, with the lesion selection rule.

Reads one or more JSON-lines files written by ``ddip_sweep.py --out`` and prints, per case, a Markdown table:
truth, OSEM's best iterate (by PSNR, over the swept subset counts), OSEM's best post-filtered iterate, MAP-RDP's
best β, then every DDIP result (labelled by its prior and the settings that differ from the shipped ones). Columns:
PSNR (dB) and SSIM in the brain, the mean bias (%) of every lesion / departure region (largest first), the Poisson
log-likelihood, the PSNR gain over the best filtered OSEM, and whether every |bias| is within OSEM's best
iterate's |bias| + ``--margin`` points (the issue-30 selection rule).

Example::

    python benchmarks/ddip_table.py runs/ddip/*.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt_bias(b: list[float]) -> str:
    return " / ".join(f"{v:+.1f}" for v in b) if b else "-"


def load(paths: list[str]) -> dict[str, dict]:
    """``{case: {"baselines": rec, "ddip": [rec, ...]}}`` from the JSON lines of ``paths`` (last baselines win)."""
    cases: dict[str, dict] = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            c = cases.setdefault(rec["case"], {"baselines": None, "ddip": []})
            if rec["method"] == "baselines":
                c["baselines"] = rec
            else:
                c["ddip"].append(rec)
    return cases


def passes(bias: list[float], ref: list[float], margin: float) -> bool:
    """Every |bias| within the reference's |bias| + ``margin`` points."""
    return len(bias) == len(ref) and all(abs(b) <= abs(r) + margin for b, r in zip(bias, ref))


def table(case: str, c: dict, margin: float) -> str:
    bl = c["baselines"]
    rows = []
    osem = max((v["best"] for k, v in bl.items() if k.startswith("osem_")), key=lambda r: r["psnr"])
    osem_key = next(k for k, v in bl.items() if k.startswith("osem_") and v["best"] is osem)
    filt = max((v["best_filtered"] for k, v in bl.items() if k.startswith("osem_")), key=lambda r: r["psnr"])
    filt_key = next(k for k, v in bl.items() if k.startswith("osem_") and v["best_filtered"] is filt)
    ref = osem["lesion_bias"]
    fpsnr = filt["psnr"]

    def row(label, r, gain=True, rule=True):
        g = f"{r['psnr'] - fpsnr:+.2f}" if gain else ""
        ok = ("yes" if passes(r["lesion_bias"], ref, margin) else "no") if rule else ""
        ll = f"{r['loglik']:.0f}" if "loglik" in r else "-"
        rows.append(f"| {label} | {r['psnr']:.2f} | {r['ssim']:.3f} | {_fmt_bias(r['lesion_bias'])} | {ll} | {g} "
                    f"| {ok} |")

    t = bl["truth"]
    rows.append(f"| truth | - | - | {_fmt_bias(t['lesion_bias'])} | {t['loglik']:.0f} | | |")
    row(f"OSEM best iterate ({osem_key[5:]}, it {osem['iter']})", osem, rule=False)
    row(f"OSEM best filtered ({filt_key[5:]}, it {filt['iter']}, {filt['fwhm']:g} mm)", filt)
    row(f"MAP-RDP (β {bl['map_rdp']['beta']:g})", bl["map_rdp"])
    for r in c["ddip"]:
        s = {k: v for k, v in r.get("settings", {}).items() if not (k == "final_em" and v == 0)}
        w = Path(str(r.get("weights", "default"))).name
        label = f"DDIP {w}" + (" " + " ".join(f"{k}={v}" for k, v in s.items()) if s else "")
        row(label + f" ({r.get('seconds', 0):.0f} s)", r)
    head = (f"**{case}** (OSEM rule: each |bias| ≤ OSEM best iterate's + {margin:g} points)\n\n"
            "| method | PSNR | SSIM | bias % | log-lik | vs filt. OSEM | rule |\n|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="ddip_sweep.py JSON-lines outputs")
    ap.add_argument("--margin", type=float, default=3.0, help="points above OSEM's best iterate's |bias| (3)")
    args = ap.parse_args(argv)
    for case, c in load(args.files).items():
        if c["baselines"] is None:
            continue
        print(table(case, c, args.margin) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
