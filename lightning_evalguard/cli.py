"""The ``evalguard`` console script: ``demo``, ``report``, ``replay``.

Only :mod:`argparse` is imported at start-up; each subcommand imports what it needs when it runs,
so ``evalguard --help`` does not import torch.

Examples:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    evalguard ...
    0
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lightning_evalguard._version import __version__

__all__ = ["build_parser", "main"]


class _UsageError(Exception):
    """A bad argument or a missing file: exit code 2, one line on stderr."""


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line saying what is wrong, exit code 2 (argparse's default prints the whole usage).
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``evalguard`` (exposed for docs and tests)."""
    parser = _Parser(
        prog="evalguard",
        description="Guarded evaluation, buffered logging and resource cleanup for PyTorch Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"evalguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="train a small model on bundled data with all four callbacks")
    demo.add_argument("--mode", choices=("stream", "subprocess", "inline"), default="stream",
                      help="GuardedEvaluation mode (default: stream)")
    demo.add_argument("--epochs", type=_positive_int, default=3, help="training epochs (default: 3)")
    demo.add_argument("--out", default="evalguard_out", help="output directory (default: ./evalguard_out)")

    report = sub.add_parser("report", help="draw the timeline picture of a PerformanceMonitor report")
    report.add_argument("report", type=_existing_file, metavar="REPORT.json")
    report.add_argument("-o", "--output", default=None, help="PNG path (default: next to the report)")

    replay = sub.add_parser("replay", help="send rows spilled by BufferedLogging to W&B after the run")
    replay.add_argument("spill_dir", type=_existing_dir, metavar="SPILL_DIR")
    replay.add_argument("--project", required=True, help="W&B project")
    replay.add_argument("--run-id", default=None, help="W&B run id to resume (default: a new run)")
    replay.add_argument("--offline", action="store_true", help="write an offline W&B run instead of syncing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``evalguard`` console script. Returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version / usage errors
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from lightning_evalguard.demo import run_demo

            return run_demo(mode=args.mode, epochs=args.epochs, out=args.out)
        if args.command == "report":
            from lightning_evalguard.report import run_report

            return run_report(args.report, output=args.output)
        if args.command == "replay":
            from lightning_evalguard.replay import run_replay

            return run_replay(args.spill_dir, project=args.project, run_id=args.run_id, offline=args.offline)
    except _UsageError as exc:
        print(f"evalguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command!r}")  # pragma: no cover


UsageError = _UsageError
