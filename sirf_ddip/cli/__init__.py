"""The ``sirf-ddip`` command line: one entry point with sub-commands.

Parsing only; the work lives in the library modules. Each sub-module of :mod:`sirf_ddip.cli` exposes
``register(subparsers)`` that adds its sub-commands (with ``set_defaults(func=...)``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import SirfDdipError

#: sub-modules that register commands (each is imported lazily only to build the parser)
_COMMAND_MODULES = ("engine", "prior", "recon", "study", "exports", "prepare")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="sirf-ddip",
        description="Low-dose PET reconstruction with a Deep Diffusion Image Prior (HQS-DDIP).",
    )
    parser.add_argument("--version", action="version", version=f"sirf_ddip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # a command module not present in this build
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except SirfDdipError as exc:
        print(f"sirf-ddip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
