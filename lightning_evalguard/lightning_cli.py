"""``EvalGuardCLI``: LightningCLI whose configuration errors fit on one line.

LightningCLI reports a bad callback value as a nested jsonargparse message that starts with the
*list* the callback sits in (``Parser key "trainer.callbacks": Does not validate against any of the
Union subtypes ...``), and a value the callback's own ``__init__`` refuses as a traceback. This
subclass puts the offending parameter first, then the full message, and exits with code 2:

.. code-block:: text

    error: GuardedEvaluation: parameter 'mode': Expected a typing.Literal['stream', ...]. Got value: bogus

Use it exactly like ``LightningCLI``.

Examples:
    >>> summarize_parser_error('''Parser key "trainer.callbacks":
    ...   Errors:
    ...     - Problem with given class_path 'lightning_evalguard.callbacks.evaluation.GuardedEvaluation':
    ...         Parser key "mode":
    ...           Expected a typing.Literal['stream', 'subprocess', 'inline']. Got value: bogus''')
    "GuardedEvaluation: parameter 'mode': Expected a typing.Literal['stream', 'subprocess', 'inline']. Got value: bogus"
"""

from __future__ import annotations

import re
import sys
from argparse import ArgumentError
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

__all__ = ["EvalGuardCLI", "summarize_parser_error"]

_KEY = re.compile(r'Parser key "([^"]+)":\s*$')
_CLASS = re.compile(r"class_path '([^']+)'")
# The callbacks' own argument errors: "`timeout` must be a finite number > 0, got -1.0",
# "`rules['train/*']`: invalid rule 'median:5': ...".
_OWN = re.compile(r"^\s*-?\s*(`[^`]+`.*)$")


def summarize_parser_error(message: str) -> str:
    """The most specific line of a jsonargparse error: a callback's own message naming its
    parameter, else the deepest ``Parser key`` with its reason, prefixed with the class it belongs
    to (falls back to the first line)."""
    lines = message.splitlines()
    for line in lines:
        own = _OWN.match(line)
        if own is not None:
            return own.group(1).strip()
    best: str | None = None
    for i, line in enumerate(lines):
        key = _KEY.search(line)
        if key is None:
            continue
        reason = next((nxt.strip() for nxt in lines[i + 1 :] if nxt.strip()), "")
        if _KEY.search(reason) or reason.startswith(("Does not validate", "Errors:")):
            continue  # a container: its children say what is wrong
        owner = next((_CLASS.search(prev) for prev in reversed(lines[:i]) if _CLASS.search(prev)), None)
        prefix = f"{owner.group(1).rsplit('.', 1)[-1]}: " if owner is not None else ""
        best = f"{prefix}parameter {key.group(1)!r}: {reason}"
    if best is not None:
        return best
    return next((line.strip() for line in lines if line.strip()), message)


class EvalGuardCLI(LightningCLI):
    """:class:`~lightning.pytorch.cli.LightningCLI` with one-line configuration errors.

    Parse errors name the offending parameter on their first line; a ``ValueError`` or
    ``TypeError`` raised while the classes are built (e.g. a callback refusing ``timeout: -1``)
    is shown as one ``error:`` line instead of a traceback. Both exit with code 2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Let parse errors reach us instead of jsonargparse printing the usage and exiting.
        merged: dict[str, Any] = {"exit_on_error": False, **(kwargs.get("parser_kwargs") or {})}
        for name in ("fit", "validate", "test", "predict"):
            merged[name] = {"exit_on_error": False, **merged.get(name, {})}
        kwargs["parser_kwargs"] = merged
        super().__init__(*args, **kwargs)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            self._fail(summarize_parser_error(str(exc)), details=str(exc))

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as exc:
            text = str(exc)
            self._fail(summarize_parser_error(text), details=text if "\n" in text else None)

    @staticmethod
    def _fail(first_line: str, details: str | None = None) -> NoReturn:
        print(f"error: {first_line}", file=sys.stderr)
        if details:
            print(f"\n{details}", file=sys.stderr)
        raise SystemExit(2)
