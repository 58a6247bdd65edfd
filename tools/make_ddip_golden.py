#!/usr/bin/env python3
"""Record the DDIP golden hashes of the current code on this CPU in ``tests/data/ddip_golden.json``.

The file holds one record per CPU (``ddip_golden_case.environment``); this adds or replaces this CPU's record.

Run this only when a change of DDIP's numerics is intended (and say so in the commit); a refactoring must leave
``tests/test_ddip_golden.py`` passing against the recorded file. The cases are in ``tests/ddip_golden_case.py``.

Usage::

    PYTHONPATH=. python tools/make_ddip_golden.py [--out tests/data/ddip_golden.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(argv: list[str] | None = None) -> int:
    from ddip_golden_case import CASES, dumps, environment, run_case

    from sirf_ddip.utils.atomic import write_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "tests" / "data" / "ddip_golden.json"))
    p.add_argument("--replace-all", action="store_true",
                   help="drop the other CPUs' records (after an intended change of the numerics, re-record on each)")
    args = p.parse_args(argv)
    out = Path(args.out)
    here = environment()
    records = []
    if out.exists() and not args.replace_all:
        records = [r for r in json.loads(out.read_text())["records"] if r["environment"] != here]
    records.append({"environment": here, "cases": {name: run_case(name) for name in CASES}})
    write_text(out, dumps({"records": records}))
    print(f"wrote {out}: {len(CASES)} cases for {here['cpu']} ({here['cpu_capability']}); {len(records)} record(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
