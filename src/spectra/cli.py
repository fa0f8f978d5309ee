"""The ``spectra`` command line.

Each subcommand lives in ``spectra/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the
parsed args; returns an exit code or None). Command modules import torch and
friends inside ``func`` so that ``spectra --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from spectra import __version__
from spectra.errors import SpectraError

# Order = the life of a model: data -> train -> quantize/pack -> eval/serve -> report.
COMMAND_MODULES = [
    "info", "data", "train", "quantize", "pack", "generate", "eval", "serve",
    "interop", "suite", "report", "tasks",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spectra",
        description="Train, quantize, pack, evaluate and serve FloatLM / TriLM / QuantLM suites (Spectra).",
    )
    p.add_argument("--version", action="version", version=f"spectra-lm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"spectra.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"spectra.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # A fallback (e.g. no C compiler -> PyTorch path) is one line for a CLI user, not a source excerpt.
    return f"spectra: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes a nargs='*' positional only once: dotted overrides (train) that come after a
        # flag land here; anything else is still an error.
        if isinstance(getattr(args, "overrides", None), list) and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except SpectraError as e:
        print(f"spectra {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:  # sizes are checked up front (spectra.validate); this is the last line of defence
        print(f"spectra {args.command}: error: out of memory: an input size or a flag asks for more memory "
              "than this machine has (see docs/security.md, Limits)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
