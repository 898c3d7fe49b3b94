"""Sampling and aggregation rules: parsing, each rule's semantics, and a property test against a
straightforward reference model."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_evalguard.engine.sampler import Rule, RuleSet, Sampler, clean_values, parse_rule


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("all", Rule("all")),
        ("drop", Rule("drop")),
        ("every:1", Rule("every", 1)),
        ("every:25", Rule("every", 25)),
        ("mean:10", Rule("mean", 10)),
        ("min:3", Rule("min", 3)),
        ("max:3", Rule("max", 3)),
        ("last:100", Rule("last", 100)),
    ],
)
def test_parse_rule_accepts_the_grammar(text: str, rule: Rule) -> None:
    assert parse_rule(text) == rule
    assert str(rule) == text


@pytest.mark.parametrize(
    "text", ["", "ALL", "mean", "mean:", "mean:0", "mean:-1", "mean:1.5", "median:3", " all", "every:x", "all:2"]
)
def test_parse_rule_rejects_and_quotes_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match=f"invalid rule {text!r}"):
        parse_rule(text)


@pytest.mark.parametrize(
    ("rules", "error", "match"),
    [
        ({"train/*": "mean:0"}, ValueError, r"rules\['train/\*'\].*'mean:0'"),
        ({"": "all"}, ValueError, "invalid rule pattern ''"),
        ({"train/[ab": "all"}, ValueError, r"invalid rule pattern 'train/\[ab'.*unclosed"),
        ({"x": 3}, TypeError, "a rule must be a string, got 3"),
        ({3: "all"}, TypeError, "a rule pattern must be a string, got 3"),
        (["*"], TypeError, "`rules` must be a mapping"),
    ],
)
def test_ruleset_rejects_bad_patterns_and_rules(rules: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RuleSet(rules)


def test_first_match_wins_and_unmatched_keys_are_kept() -> None:
    rules = RuleSet({"train/loss": "all", "train/*": "drop", "val/[ab]*": "mean:2"})
    assert rules.rule_for("train/loss") == Rule("all")
    assert rules.rule_for("train/acc") == Rule("drop")
    assert rules.rule_for("val/acc") == Rule("mean", 2)
    assert rules.rule_for("val/loss") == Rule("all")  # no pattern matches: kept
    assert rules.rule_for("Train/acc") == Rule("all")  # patterns are case-sensitive
    assert not rules.passthrough
    assert RuleSet(None).passthrough
    assert RuleSet({"*": "all", "x": "all"}).passthrough


def test_every_keeps_the_first_then_each_nth() -> None:
    sampler = Sampler(RuleSet({"x": "every:3"}))
    kept = [step for step in range(10) if sampler.process({"x": float(step)}, step)]
    assert kept == [0, 3, 6, 9]
    assert sampler.stats()["skipped"] == 6


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("mean:3", [2.0, 5.0]), ("min:3", [1.0, 4.0]), ("max:3", [3.0, 6.0]), ("last:3", [3.0, 6.0])],
)
def test_aggregates_emit_one_point_per_window_at_the_last_step(rule: str, expected: list[float]) -> None:
    sampler = Sampler(RuleSet({"x": rule}))
    points = []
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], start=100):
        out = sampler.process({"x": value, "other": 0.5}, step)
        assert out["other"] == 0.5  # keys under "all" pass through every row
        if "x" in out:
            points.append((step, out["x"]))
    assert points == [(102, expected[0]), (105, expected[1])]
    assert sampler.stats() == {"values_in": 12, "passed": 6, "skipped": 0, "folded": 6, "windows": 2, "held": 0}


def test_non_finite_values_are_values() -> None:
    sampler = Sampler(RuleSet({"m": "mean:2", "lo": "min:2", "hi": "max:2", "a": "all"}))
    sampler.process({"m": math.inf, "lo": 1.0, "hi": math.nan, "a": math.nan}, 0)
    out = sampler.process({"m": 1.0, "lo": math.nan, "hi": 5.0, "a": -math.inf}, 1)
    assert out["m"] == math.inf
    assert math.isnan(out["lo"])
    assert math.isnan(out["hi"])
    assert out["a"] == -math.inf


def test_drain_emits_open_windows_at_their_last_step_grouped_by_row() -> None:
    sampler = Sampler(RuleSet({"a": "mean:4", "b": "max:4", "c": "last:10"}))
    sampler.process({"a": 1.0, "b": 1.0}, 0)
    sampler.process({"a": 3.0, "b": 7.0, "c": 2.0}, 1)
    sampler.process({"c": 9.0}, 2)
    assert sampler.stats()["held"] == 6
    assert sampler.drain() == [(1, {"a": 2.0, "b": 7.0}), (2, {"c": 9.0})]
    assert sampler.drain() == []
    assert sampler.stats()["held"] == 0


def test_clean_values_keeps_numbers_and_reports_the_rest() -> None:
    row = {
        "f": 1.5,
        "i": 3,
        "b": True,
        "np32": np.float32(0.25),
        "np_int": np.int64(7),
        "frac": Fraction(1, 4),
        "t0": torch.tensor(2.5),
        "a0": np.array(4.0),
        "nan": float("nan"),
        "s": "text",
        "n": None,
        "d": {"nested": 1.0},
        "t1": torch.ones(2),
        "lst": [1.0],
    }
    clean, invalid = clean_values(row)
    assert invalid == ["s", "n", "d", "t1", "lst"]
    assert clean["np32"] == 0.25
    assert type(clean["np32"]) is float
    assert clean["np_int"] == 7
    assert type(clean["np_int"]) is int
    assert clean["frac"] == 0.25
    assert clean["t0"] == 2.5
    assert clean["a0"] == 4.0
    assert clean["b"] is True
    assert math.isnan(clean["nan"])
    plain = {"a": 1.0, "b": 2}
    copy, none = clean_values(plain)
    assert copy == plain
    assert copy is not plain
    assert none == []


# -- property test against a reference model -------------------------------------------------------
RULES = st.sampled_from(["all", "drop", "every:1", "every:3", "mean:1", "mean:4", "min:3", "max:2", "last:5"])
KEYS = ["a", "b", "c", "d"]
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(min_value=-1000, max_value=1000),
)


def _reference(rule: str, series: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """What each rule should emit for one key, drained at the end."""
    if rule == "all":
        return list(series)
    if rule == "drop":
        return []
    kind, n = rule.split(":")
    size = int(n)
    if kind == "every":
        return [point for i, point in enumerate(series) if i % size == 0]
    out = []
    for start in range(0, len(series), size):
        window = series[start : start + size]
        values = [v for _, v in window]
        if kind == "mean":
            value: Any = sum(values[1:], values[0]) / len(values)
        elif kind == "last":
            value = values[-1]
        elif any(isinstance(v, float) and math.isnan(v) for v in values):
            value = math.nan
        else:
            value = min(values) if kind == "min" else max(values)
        out.append((window[-1][0], value))
    return out


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return bool(x == y)


@settings(max_examples=150, deadline=None)
@given(
    rules=st.fixed_dictionaries({k: RULES for k in KEYS}),
    rows=st.lists(st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1), max_size=40),
)
def test_sampler_matches_the_reference_model(rules: dict[str, str], rows: list[dict[str, Any]]) -> None:
    sampler = Sampler(RuleSet(rules))
    emitted: dict[str, list[tuple[int, Any]]] = {k: [] for k in KEYS}
    for step, row in enumerate(rows):
        for key, value in sampler.process(dict(row), step).items():
            emitted[key].append((step, value))
    for step, row in sampler.drain():
        for key, value in row.items():
            emitted[key].append((step, value))

    for key in KEYS:
        series = [(step, row[key]) for step, row in enumerate(rows) if key in row]
        expected = _reference(rules[key], series)
        assert len(emitted[key]) == len(expected), (key, rules[key])
        for (step, value), (ref_step, ref_value) in zip(emitted[key], expected, strict=True):
            assert step == ref_step, (key, rules[key])
            assert _same(value, ref_value), (key, rules[key], value, ref_value)

    stats = sampler.stats()
    total = sum(len(r) for r in rows)
    assert stats["values_in"] == total == stats["passed"] + stats["skipped"] + stats["folded"]
    assert stats["held"] == 0
