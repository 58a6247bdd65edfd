#!/usr/bin/env python3
"""Fail if a lower layer of sirf_ddip imports a higher one.

Layers, lowest first (a module may import its own layer and the ones below it)::

    errors, config, utils  <  geometry  <  data  <  io  <  physics  <  sim  <  backends, prior  <  recon  <  study  <  cli, batch

``data`` (the ``Image``/``ProjData`` containers) sits on the geometry it carries; ``sim`` (phantoms and the
simulator) is below ``prior`` because the prior's training data are simulated; ``backends`` and ``prior`` share
a rank and must not import each other. Every ``import`` statement counts, including those inside functions (lazy imports are
still dependencies). The package root ``sirf_ddip/__init__.py`` is exempt (it only documents the layers).

Usage::

    python tools/check_layers.py [path/to/sirf_ddip]

Exit status 0 when clean; 1 with one line per offending import (``file:line: module (layer) imports target
(layer)``) otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: rank of each top-level subpackage / module of sirf_ddip
RANK = {
    "errors": 0, "config": 0, "utils": 0,
    "geometry": 1,
    "data": 2,
    "io": 3,
    "physics": 4,
    "sim": 5,
    "backends": 6, "prior": 6,
    "recon": 7,
    "study": 8,
    "cli": 9, "batch": 9,   # batch runs the commands of cli (same rank: cli registers batch)
}
#: same-rank layers that must stay independent of each other
SIBLINGS = {"backends", "prior"}


def _layer(parts: list[str]) -> str | None:
    """Layer of a module path relative to the package (``['physics', 'model']`` -> ``'physics'``)."""
    return parts[0] if parts and parts[0] in RANK else None


def _targets(tree: ast.AST, module_parts: list[str], is_pkg: bool):
    """Yield ``(lineno, target_parts)`` for every import of sirf_ddip in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "sirf_ddip":
                    yield node.lineno, parts[1:]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "sirf_ddip":
                    continue
                base = parts[1:]
            else:
                pkg = module_parts if is_pkg else module_parts[:-1]
                up = node.level - 1
                if up > len(pkg):
                    continue
                base = pkg[:len(pkg) - up] + ((node.module or "").split(".") if node.module else [])
            if base:
                yield node.lineno, base
            else:  # "from sirf_ddip import x" / "from .. import x": the names are the modules
                for alias in node.names:
                    yield node.lineno, [alias.name]


def check(package: Path) -> list[str]:
    """Offending imports under ``package`` (the ``sirf_ddip`` folder), as printable lines."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        parts = list(rel.with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        src = _layer(parts)
        if src is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for lineno, target in _targets(tree, parts, is_pkg):
            dst = _layer(target)
            if dst is None or dst == src:
                continue
            bad = RANK[dst] > RANK[src] or (RANK[dst] == RANK[src] and src in SIBLINGS)
            if bad:
                problems.append(f"{package.name}/{rel}:{lineno}: {src} (layer {RANK[src]}) imports "
                                f"{'.'.join(target)} ({dst}, layer {RANK[dst]})")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    package = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "sirf_ddip"
    if not (package / "__init__.py").is_file():
        print(f"check_layers: {package} is not the sirf_ddip package folder", file=sys.stderr)
        return 2
    problems = check(package)
    for line in problems:
        print(line)
    if problems:
        print(f"check_layers: {len(problems)} import(s) against the layering", file=sys.stderr)
        return 1
    print("check_layers: layering OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
