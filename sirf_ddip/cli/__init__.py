"""The ``sirf-ddip`` command line: one entry point with sub-commands.

Parsing only; the work lives in the library modules. Each sub-module of :mod:`sirf_ddip.cli` exposes
``register(subparsers)`` that adds its sub-commands (with ``set_defaults(func=...)``).

Errors: one of our named errors (:class:`~sirf_ddip.errors.SirfDdipError`) prints one line and exits 2; anything
else is a bug or an environment failure and prints one line saying so (exit 1). ``--debug`` (anywhere on the
command line) or ``SIRF_DDIP_DEBUG=1`` prints the traceback as well.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from ..errors import SirfDdipError

#: sub-modules that register commands (each is imported lazily only to build the parser)
_COMMAND_MODULES = ("engine", "prior", "recon", "study", "exports", "prepare", "scatter", "batch")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="sirf-ddip",
        description="Low-dose PET reconstruction with a Deep Diffusion Image Prior (HQS-DDIP).",
    )
    parser.add_argument("--version", action="version", version=f"sirf_ddip {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the Python traceback of an error (also SIRF_DDIP_DEBUG=1); may be given anywhere")
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


def debug_requested(argv: list[str] | None = None) -> bool:
    """True when ``--debug`` is on the command line or ``SIRF_DDIP_DEBUG`` is set to a true value."""
    env = os.environ.get("SIRF_DDIP_DEBUG", "").strip().lower()
    return "--debug" in (argv or []) or env not in ("", "0", "false", "no", "off")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 done, 1 unexpected failure, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = f"sirf-ddip {args.command}"
    from ..utils.leniency import collect_input_warnings

    try:
        with collect_input_warnings(name):  # input warnings as one line each (commands may also record them)
            rc = args.func(args)
    except SirfDdipError as exc:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: never a bare traceback for a user
        if debug:
            traceback.print_exc()
            print(f"{name}: unexpected error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        else:
            print(f"{name}: unexpected error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the "
                  "traceback)", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
