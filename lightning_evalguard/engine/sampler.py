"""Per-key sampling and aggregation rules for metric rows.

A rule set maps glob patterns to rules; the first pattern that matches a key decides its rule, and a
key that no pattern matches is kept as it is (``"all"``). Rules::

    all        keep every value
    drop       keep none
    every:N    keep the 1st, (N+1)-th, (2N+1)-th, ... value of the key
    mean:N     one point per N values of the key: their mean   } the point carries the
    min:N      one point per N values of the key: their min    } step of the last value
    max:N      one point per N values of the key: their max    } of the window; NaN in a
    last:N     one point per N values of the key: the last one } window makes min/max/mean NaN

Windows count *values of that key*, not trainer steps; with ``Trainer(log_every_n_steps=1)`` the two
are the same. :meth:`Sampler.drain` emits the windows still open (fewer than N values), so no value
is lost to aggregation at the end of a run.

Examples:
    >>> sampler = Sampler(RuleSet({"loss": "mean:2", "lr": "drop"}))
    >>> sampler.process({"loss": 1.0, "lr": 0.1, "acc": 0.5}, step=0)
    {'acc': 0.5}
    >>> sampler.process({"loss": 3.0, "lr": 0.1}, step=1)
    {'loss': 2.0}
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final

__all__ = ["AGGREGATES", "Rule", "RuleSet", "Sampler", "clean_values", "parse_rule"]

AGGREGATES: Final = ("mean", "min", "max", "last")
_RULE_RE = re.compile(r"(?P<kind>every|mean|min|max|last):(?P<n>[0-9]+)")
_PLAIN_TYPES: Final = frozenset({float, int})
_MAX_PLANS: Final = 1024  # distinct key sets remembered; more are rare, and only cost a re-plan


@dataclass(frozen=True, slots=True)
class Rule:
    """One parsed rule: ``kind`` is ``"all"``, ``"drop"``, ``"every"`` or an aggregate, ``n`` its N."""

    kind: str
    n: int = 1

    def __str__(self) -> str:
        return self.kind if self.kind in ("all", "drop") else f"{self.kind}:{self.n}"


ALL: Final = Rule("all")


def parse_rule(text: str) -> Rule:
    """Parse a rule string.

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: ``text`` is not one of the rules, or N is not an integer >= 1.

    Examples:
        >>> parse_rule("mean:10")
        Rule(kind='mean', n=10)
    """
    if not isinstance(text, str):
        raise TypeError(f"a rule must be a string, got {text!r}")
    if text in ("all", "drop"):
        return Rule(text)
    match = _RULE_RE.fullmatch(text)
    if match is None or int(match["n"]) < 1:
        raise ValueError(
            f"invalid rule {text!r}: expected 'all', 'drop', or one of every/mean/min/max/last "
            "followed by ':N' with an integer N >= 1 (e.g. 'mean:10')"
        )
    return Rule(match["kind"], int(match["n"]))


def _check_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise TypeError(f"a rule pattern must be a string, got {pattern!r}")
    if not pattern:
        raise ValueError("invalid rule pattern '': expected a glob such as 'train/*'")
    # fnmatch reads an unclosed '[' as a literal; in a metric pattern it is always a typo.
    start = pattern.find("[")
    while start != -1:
        inner = start + 1
        inner += pattern.startswith("!", inner)
        inner += pattern.startswith("]", inner)  # a ']' first in a set is a literal
        close = pattern.find("]", inner)
        if close == -1:
            raise ValueError(f"invalid rule pattern {pattern!r}: unclosed '[' (write '[[]' for a literal '[')")
        start = pattern.find("[", close + 1)
    return pattern


class RuleSet:
    """Glob pattern -> rule, first match wins; a key that matches nothing is kept (``"all"``).

    Args:
        rules: mapping of glob pattern (``fnmatch``, case-sensitive) to rule text.

    Raises:
        TypeError: ``rules`` is not a mapping of strings to strings.
        ValueError: a pattern or a rule is invalid; the message quotes it.
    """

    def __init__(self, rules: Mapping[str, str] | None = None) -> None:
        if rules is None:
            rules = {"*": "all"}
        if not isinstance(rules, Mapping):
            raise TypeError(f"`rules` must be a mapping of glob pattern to rule, got {rules!r}")
        compiled: list[tuple[str, Rule]] = []
        for pattern, text in rules.items():
            _check_pattern(pattern)
            try:
                compiled.append((pattern, parse_rule(text)))
            except ValueError as exc:
                raise ValueError(f"`rules[{pattern!r}]`: {exc}") from None
        self.rules: tuple[tuple[str, Rule], ...] = tuple(compiled)
        #: True when every key is kept as it is: the hot path then skips the sampler entirely.
        self.passthrough = all(rule == ALL for _, rule in compiled)
        self._cache: dict[str, Rule] = {}

    def rule_for(self, key: str) -> Rule:
        """The rule that applies to ``key`` (cached: patterns are matched once per key)."""
        rule = self._cache.get(key)
        if rule is None:
            rule = next((r for pattern, r in self.rules if fnmatchcase(key, pattern)), ALL)
            self._cache[key] = rule
        return rule

    def as_dict(self) -> dict[str, str]:
        """The rules as given (pattern -> rule text)."""
        return {pattern: str(rule) for pattern, rule in self.rules}

    def __repr__(self) -> str:
        return f"RuleSet({self.as_dict()!r})"


class _KeyState:
    """Sampling state of one key: a counter for ``every``, a window for the aggregates."""

    __slots__ = ("acc", "count", "kind", "last_seq", "n", "step")

    def __init__(self, rule: Rule) -> None:
        self.kind = rule.kind
        self.n = rule.n
        self.count = 0
        self.acc: Any = 0.0
        self.step: int | None = None
        self.last_seq = 0

    def fold(self, value: Any) -> None:
        kind = self.kind
        if self.count == 0 or kind == "last":
            self.acc = value
        elif kind == "mean":
            self.acc = self.acc + value
        elif self.acc != self.acc:  # NaN already in the window: it stays (min/max)
            pass
        elif value != value or (value < self.acc if kind == "min" else value > self.acc):
            self.acc = value
        self.count += 1

    def result(self) -> Any:
        return self.acc / self.count if self.kind == "mean" else self.acc


_SKIP: Final = object()


class Sampler:
    """Applies a :class:`RuleSet` to rows of metric values. Not thread-safe: one caller thread.

    Counters (for ``stats()``): ``values_in`` valid values seen; ``passed`` kept as they are;
    ``skipped`` discarded by ``every:N`` / ``drop``; ``folded`` taken into windows; ``windows``
    aggregated points emitted; ``held`` values in windows still open. Always
    ``values_in == passed + skipped + folded``.
    """

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self._states: dict[str, _KeyState | None] = {}
        self._plans: dict[tuple[str, ...], tuple[tuple[str, _KeyState], ...]] = {}
        self._seq = 0
        self.values_in = 0
        self.passed = 0
        self.skipped = 0
        self.folded = 0
        self.windows = 0
        self.held = 0

    @property
    def passthrough(self) -> bool:
        """True when every key is kept as it is."""
        return self.rules.passthrough

    def _state_for(self, key: str) -> _KeyState | None:
        rule = self.rules.rule_for(key)
        state = None if rule == ALL else _KeyState(rule)
        self._states[key] = state
        return state

    def _plan(self, keys: tuple[str, ...]) -> tuple[tuple[str, _KeyState], ...]:
        """The keys of a row that have a rule other than ``all``, with their state (cached per key
        set: rows from one ``log`` call site have the same keys every step)."""
        states = self._states
        plan = []
        for key in keys:
            state = states[key] if key in states else self._state_for(key)
            if state is not None:
                plan.append((key, state))
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[keys] = result = tuple(plan)
        return result

    def process(self, row: dict[str, Any], step: int | None) -> dict[str, Any]:
        """The points to emit at ``step`` for one row of valid values (possibly empty).

        The row is modified in place and returned: keys under ``all`` stay, the others are taken
        out and come back only when their rule emits a point (at the end of the row).
        """
        keys = tuple(row)
        plan = self._plans.get(keys)
        if plan is None:
            plan = self._plan(keys)
        self._seq += 1
        self.values_in += len(keys)
        self.passed += len(keys) - len(plan)
        for key, state in plan:
            value = row.pop(key)
            kind = state.kind
            if kind == "drop":
                self.skipped += 1
            elif kind == "every":
                if state.count % state.n == 0:
                    row[key] = value
                    self.passed += 1
                else:
                    self.skipped += 1
                state.count += 1
            else:
                state.fold(value)
                state.step = step
                state.last_seq = self._seq
                self.folded += 1
                self.held += 1
                if state.count >= state.n:
                    row[key] = state.result()
                    self.held -= state.count
                    self.windows += 1
                    state.count = 0
        return row

    def drain(self) -> list[tuple[int | None, dict[str, Any]]]:
        """Emit every open window (fewer than N values) as ``(step, points)`` rows, oldest first."""
        open_states = [
            (k, s) for k, s in self._states.items() if s is not None and s.kind in AGGREGATES and s.count > 0
        ]
        open_states.sort(key=lambda item: item[1].last_seq)
        rows: list[tuple[int | None, dict[str, Any]]] = []
        last_seq = -1
        for key, state in open_states:
            if rows and state.last_seq == last_seq:
                rows[-1][1][key] = state.result()
            else:
                rows.append((state.step, {key: state.result()}))
            last_seq = state.last_seq
            self.held -= state.count
            self.windows += 1
            state.count = 0
        return rows

    def stats(self) -> dict[str, int]:
        """Counters as plain ints."""
        return {
            "values_in": self.values_in,
            "passed": self.passed,
            "skipped": self.skipped,
            "folded": self.folded,
            "windows": self.windows,
            "held": self.held,
        }


def _coerce(value: object) -> object:
    """A plain Python number for ``value``, or ``_SKIP`` when it is not a number."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    # 0-d tensors and arrays (duck-typed: the engine does not import torch).
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        try:
            item = value.item()  # type: ignore[attr-defined]
        except Exception:
            return _SKIP
        if isinstance(item, (bool, int, float)):
            return item
    return _SKIP


def clean_values(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split a row into a fresh dict of plain numbers and the keys whose values are not numbers.

    ``int``, ``float`` and ``bool`` pass as they are; other real numbers (numpy scalars, fractions)
    become ``int``/``float``; 0-d tensors and arrays become their ``item()``. Non-finite floats are
    values like any other. Strings, ``None``, containers, and non-string keys are invalid.

    Examples:
        >>> clean_values({"a": 1.0, "b": "text", "c": float("nan")})
        ({'a': 1.0, 'c': nan}, ['b'])
    """
    # Fast path (the common case): every value already a plain int or float. Checking the types of
    # the keys too would double the cost, so a non-string key is only caught on the slow path.
    if set(map(type, metrics.values())) <= _PLAIN_TYPES:
        return dict(metrics), []
    clean: dict[str, Any] = {}
    invalid: list[str] = []
    for key, value in metrics.items():
        coerced = _coerce(value) if isinstance(key, str) else _SKIP
        if coerced is _SKIP:
            invalid.append(str(key))
        else:
            clean[key] = coerced
    return clean, invalid
