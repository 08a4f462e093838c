"""``deqntk`` console script.

The vocabulary shared by the subcommands (and the earlier spellings it still accepts) is
in :mod:`.vocabulary`, the subcommands in :mod:`.commands`.  Library errors are printed on
one line, with the parameter names they mention turned into the flags that set them.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings

from ..errors import DatasetWarning, DeqntkError
from .commands import SUBCOMMANDS
from .vocabulary import FlagDeprecationWarning, flag_hints, spec_from_args

__all__ = ["FlagDeprecationWarning", "build_parser", "main", "spec_from_args"]


def build_parser() -> argparse.ArgumentParser:
    """The full ``deqntk`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="deqntk",
        description="NTK / NNGP Gram matrices of infinitely deep equilibrium models",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """An error message on one line (multi-line details joined with "; ")."""
    out = ""
    for part in (p.strip() for p in str(exc).splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for a clear user error)."""
    command = _command_of(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", FlagDeprecationWarning)
        warnings.showwarning = _one_line_warning(command)
        args = build_parser().parse_args(argv)
        return _dispatch(args)


def _command_of(argv: list[str]) -> str:
    return next((a for a in argv if not a.startswith("-")), "")


def _one_line_warning(command: str):
    """Print the package's warnings as ``deqntk CMD: warning: ...`` (others as usual)."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DatasetWarning | FlagDeprecationWarning):
            print(f"deqntk {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _quiet_interrupt(signum, frame):
    """SIGINT: silence the dask/tornado loggers *before* the KeyboardInterrupt is raised
    (a ``sync`` call cut short logs a callback traceback on the event loop thread at once),
    so that Ctrl-C ends with the one ``interrupted`` line."""
    from ..runtime import silence_dask_logs

    silence_dask_logs()
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    previous = None
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        previous = signal.signal(signal.SIGINT, _quiet_interrupt)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except DeqntkError as exc:
        print(f"deqntk {args.command}: error: {flag_hints(_one_line(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the filesystem refused (permissions, full disk, not a directory)
        print(f"deqntk {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deqntk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
