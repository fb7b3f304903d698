"""The ``scaledl`` command line: one sub-command per capability, each thin over the library.

A capability registers itself by providing a module with ``register(parser)`` that adds its
arguments (or its own sub-commands) and sets ``func`` to a handler ``func(args) -> int | None``.
Capability modules are imported only to build their parser; heavy libraries are imported
inside the handlers, so ``scaledl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from scaledl import __version__

#: (sub-command, module providing ``register``, one-line help). The order is the help order.
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "scaledl.demo", "a short tour of every implemented system on embedded defaults"),
    ("expand", "scaledl.expansion.cli", "LEMON: grow a pre-trained Transformer losslessly"),
    ("place", "scaledl.placement.cli", "Baechi: place a model's graph on memory-limited devices"),
    ("comm", "scaledl.comm.cli", "compressed gradient communication for DDP"),
    ("optim", "scaledl.optim.cli", "CSER and Local AdaAlter communication-efficient optimizers"),
    ("segment", "scaledl.medical.segment_cli", "shape-prior template-conditioned segmentation"),
    ("detect", "scaledl.medical.detect_cli", "RECIST-Net lesion detection with FROC evaluation"),
]


def _unavailable(name: str, module: str):
    def handler(args: argparse.Namespace) -> int:
        raise ValueError(f"'scaledl {name}' is not available yet ({module} is not implemented)")

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaledl",
        description="scaledl: published systems for scaling deep learning.",
    )
    parser.add_argument("--version", action="version", version=f"scaledl {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
            p = sub.add_parser(name, help=f"{help_text} [not yet available]", description=help_text)
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(func=_unavailable(name, module))
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.register(p)
    return parser


#: Bad input (a wrong value, a missing file): one line and exit status 2, like argparse's.
USER_ERRORS = (ValueError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, also after the sub-command.
    debug = "--debug" in argv or os.environ.get("SCALEDL_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        code = func(args)
    except KeyboardInterrupt:
        print("scaledl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            kind = "" if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: "
            print(f"scaledl: error: {kind}{first} (use --debug for the traceback)", file=sys.stderr)
        return 2 if isinstance(exc, USER_ERRORS) else 1
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
