"""The JSON report of :class:`~lightning_evalguard.PerformanceMonitor`, its summary table and timeline picture.

The report is one JSON object (schema :data:`SCHEMA`)::

    schema, version, status ("completed" | "failed" | "interrupted"), error, created_unix,
    t0            monotonic time of fit start; every "t" below is on the same monotonic scale
    timing        how step periods were measured: "clock" or "cuda_events"
    config        the monitor's parameters
    figures       every measured figure (null where not measured)
    thresholds    kind -> limit
    callbacks     name -> {"class": ..., "stats": {...}} for each evalguard callback found
    alerts        [{kind, value, threshold, t, step, epoch}], first violation of each kind
    violations    kind -> number of checks that found it violated
    timeline      steps:  [{t0, t1, steps, busy_steps, step, epoch}]  training steps, batched
                  memory: [{t, step, epoch, host_rss_mb, cuda_allocated_mb, cuda_reserved_mb}]
                  events: [{seq, t, source, kind, ...}]  evaluation jobs, flushes, cleanups, alerts
                  events_dropped

``evalguard report REPORT.json [-o timeline.png]`` prints :func:`summary_table` and draws
:func:`draw_timeline`. matplotlib is imported inside :func:`draw_timeline` only.

Examples:
    >>> rec = TimelineRecorder(max_points=4)
    >>> for i in range(6):
    ...     rec.step_batch(t0=float(i), t1=i + 1.0, steps=10, busy_steps=0, step=10 * i, epoch=0)
    >>> [(b["t0"], b["t1"], b["steps"]) for b in rec.to_dict()["steps"]]  # merged, still spans it all
    [(0.0, 2.0, 20), (2.0, 4.0, 20), (4.0, 5.0, 10), (5.0, 6.0, 10)]
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "SCHEMA",
    "TimelineRecorder",
    "draw_timeline",
    "json_safe",
    "load_report",
    "run_report",
    "summary_table",
    "write_report",
]

SCHEMA = "lightning_evalguard.report/1"
_OUTCOME_COLOURS = {
    "ok": "#2ca02c",
    "timeout": "#ff7f0e",
    "failed": "#d62728",
    "cancelled": "#7f7f7f",
    "running": "#9ecae1",
    "skipped": "#9467bd",
}


class TimelineRecorder:
    """Bounded raw material for the report's timeline.

    Step batches and memory readings thin themselves when ``max_points`` is reached (adjacent step
    batches are merged, every other reading dropped), so a long run keeps its whole span at a
    coarser grain. Events beyond ``max_events`` are dropped and counted.
    """

    def __init__(self, max_points: int = 4096, max_events: int = 50_000) -> None:
        if max_points < 4:
            raise ValueError(f"`max_points` must be >= 4, got {max_points!r}")
        self.max_points = max_points
        self.max_events = max_events
        self.steps: list[dict[str, Any]] = []
        self.memory: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.events_dropped = 0

    def step_batch(self, *, t0: float, t1: float, steps: int, busy_steps: int, step: int, epoch: int) -> None:
        """``steps`` training steps ran between ``t0`` and ``t1`` (``busy_steps`` of them with work in flight)."""
        if len(self.steps) >= self.max_points:
            half = len(self.steps) // 2
            merged = [self._merge(self.steps[2 * i], self.steps[2 * i + 1]) for i in range(half)]
            self.steps = merged + self.steps[2 * half :]
        self.steps.append({"t0": t0, "t1": t1, "steps": steps, "busy_steps": busy_steps, "step": step, "epoch": epoch})

    @staticmethod
    def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {
            "t0": a["t0"],
            "t1": b["t1"],
            "steps": a["steps"] + b["steps"],
            "busy_steps": a["busy_steps"] + b["busy_steps"],
            "step": a["step"],
            "epoch": a["epoch"],
        }

    def memory_reading(self, **reading: float) -> None:
        """One memory reading: ``t``, ``step``, ``epoch``, ``host_rss_mb``, ``cuda_allocated_mb``, ..."""
        if len(self.memory) >= self.max_points:
            self.memory = self.memory[::2]
        self.memory.append(dict(reading))

    def add_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Append events (plain dicts with at least ``t``, ``source`` and ``kind``)."""
        for event in events:
            if len(self.events) >= self.max_events:
                self.events_dropped += 1
            else:
                self.events.append(dict(event))

    def to_dict(self) -> dict[str, Any]:
        """The ``timeline`` section of the report (events sorted by time)."""
        return {
            "steps": list(self.steps),
            "memory": list(self.memory),
            "events": sorted(self.events, key=lambda e: (e.get("t", 0.0), e.get("seq", 0))),
            "events_dropped": self.events_dropped,
        }


# ---- reading and writing -------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats turned into ``None`` (strict JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def write_report(path: str | os.PathLike[str], report: Mapping[str, Any]) -> str:
    """Write ``report`` as strict JSON, atomically (a reader never sees half a file). Returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(json_safe(report), fh, indent=1, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report and check it is one.

    Raises:
        ValueError: the file is not JSON or not an evalguard report.
        OSError: the file cannot be read.
    """
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{os.fspath(path)!r} is not JSON: {exc}") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("lightning_evalguard.report/"):
        raise ValueError(f"{os.fspath(path)!r} is not an evalguard report (schema {schema!r})")
    for key in ("figures", "alerts", "timeline"):
        if key not in data:
            raise ValueError(f"{os.fspath(path)!r} lacks the {key!r} section")
    return data


# ---- the summary table ---------------------------------------------------------------------------

# (label, figure, threshold kind, format)
_ROWS: tuple[tuple[str, str, str | None, str], ...] = (
    ("training steps", "steps", None, "{:.0f}"),
    ("step time p50 (idle)", "step_time_idle_p50_s", None, "{:.4g} s"),
    ("step time p50 (busy)", "step_time_busy_p50_s", None, "{:.4g} s"),
    ("step slowdown while busy", "step_slowdown", "step_slowdown", "{:.2%}"),
    ("evalguard hook overhead", "hook_overhead", "hook_overhead", "{:.2%}"),
    ("evaluation jobs submitted", "eval_submitted", None, "{:.0f}"),
    ("evaluation jobs completed", "eval_completed", None, "{:.0f}"),
    ("evaluation jobs failed", "eval_failed", None, "{:.0f}"),
    ("evaluation jobs timed out", "eval_timed_out", None, "{:.0f}"),
    ("evaluations skipped", "eval_skipped", None, "{:.0f}"),
    ("evaluation latency p50", "eval_latency_p50_s", None, "{:.4g} s"),
    ("evaluation latency p95", "eval_latency_p95_s", "eval_latency", "{:.4g} s"),
    ("evaluation queue depth", "eval_queue_depth", None, "{:.0f}"),
    ("watchdog lag p95", "watchdog_lag_p95_s", "scheduler_lag", "{:.4g} s"),
    ("metric rows accepted", "logging_accepted", None, "{:.0f}"),
    ("metric rows delivered", "logging_delivered", None, "{:.0f}"),
    ("metric rows spilled", "logging_spilled", None, "{:.0f}"),
    ("metric rows dropped", "logging_dropped", None, "{:.0f}"),
    ("logging failure rate", "logging_failure_rate", "logging_failure_rate", "{:.2%}"),
    ("host RSS", "host_rss_mb", None, "{:.1f} MB"),
    ("host memory growth", "host_growth_mb_per_hour", "memory_growth", "{:+.3g} MB/h"),
    ("host memory growth per epoch", "host_growth_mb_per_epoch", None, "{:+.3g} MB"),
    ("CUDA allocated", "cuda_allocated_mb", None, "{:.1f} MB"),
    ("CUDA memory growth", "cuda_growth_mb_per_hour", "cuda_memory_growth", "{:+.3g} MB/h"),
)


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def summary_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of the report's figures, thresholds and alerts, for a terminal."""
    figures = report.get("figures", {})
    thresholds = report.get("thresholds", {})
    alerted = {a["kind"] for a in report.get("alerts", [])}
    rows = [("figure", "value", "threshold", "")]
    for label, key, kind, fmt in _ROWS:
        if key not in figures:
            continue
        limit = thresholds.get(kind) if kind else None
        limit_fmt = fmt.replace("{:+", "{:")
        status = "" if kind is None else ("ALERT" if kind in alerted else ("ok" if limit is not None else ""))
        rows.append((label, _fmt(fmt, figures.get(key)), _fmt(limit_fmt, limit), status))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"evalguard report: {report.get('status', '?')}, timing from {report.get('timing', '?')}",
        "",
    ]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    alerts = report.get("alerts", [])
    lines.append("")
    if not alerts:
        lines.append("alerts: none")
    for alert in alerts:
        lines.append(
            f"ALERT {alert['kind']}: {_fmt('{:.6g}', alert.get('value'))} > {_fmt('{:.6g}', alert.get('threshold'))}"
            f" at step {alert.get('step')} (epoch {alert.get('epoch')})"
        )
    if report.get("error"):
        lines.append(f"run ended with: {report['error']}")
    return "\n".join(lines)


# ---- the timeline picture ------------------------------------------------------------------------


def _eval_bars(events: list[dict[str, Any]], t_end: float) -> list[tuple[float, float, str]]:
    """(start, end, outcome) per evaluation job, from eval_start / eval_end events."""
    starts: dict[Any, float] = {}
    bars = []
    for e in events:
        if e.get("kind") == "eval_start":
            starts[e.get("job")] = e["t"]
        elif e.get("kind") == "eval_end":
            start = starts.pop(e.get("job"), None)
            if start is None:
                latency = e.get("latency_s")
                start = e["t"] - latency if isinstance(latency, (int, float)) else e["t"]
            bars.append((start, e["t"], str(e.get("outcome", "ok"))))
    bars.extend((start, t_end, "running") for start in starts.values())
    return bars


def draw_timeline(report: Mapping[str, Any], output: str | os.PathLike[str], *, dpi: int = 100) -> str:
    """Draw the report's timeline to a PNG file and return its path.

    Four panels share a time axis (seconds since fit start): training throughput (steps/s, with the
    share of steps run while evaluation or flushing was in flight), evaluation jobs as bars coloured
    by outcome (skips as markers), flushes and cleanups, and memory (host RSS, CUDA allocated).
    Alerts are red dashed lines across all panels.
    """
    # Not pyplot: drawing a report must not change the backend of a user's interactive session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    timeline = report.get("timeline", {})
    t0 = float(report.get("t0") or 0.0)
    steps = timeline.get("steps", [])
    memory = timeline.get("memory", [])
    events = [e for e in timeline.get("events", []) if isinstance(e.get("t"), (int, float))]
    t_candidates = [b["t1"] for b in steps] + [m["t"] for m in memory] + [e["t"] for e in events]
    t_end = max(t_candidates, default=t0)

    fig = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_steps, ax_eval, ax_io, ax_mem = fig.subplots(4, 1, sharex=True, height_ratios=[3, 1.4, 1.2, 2.2])
    status = report.get("status", "?")
    n_alerts = len(report.get("alerts", []))
    fig.suptitle(f"evalguard timeline: {status}, {n_alerts} alert(s)", fontsize=12)

    # 1. throughput
    xs, ys, busy = [], [], []
    for b in steps:
        span = b["t1"] - b["t0"]
        if span > 0 and b["steps"] > 0:
            xs.append((b["t0"] + b["t1"]) / 2 - t0)
            ys.append(b["steps"] / span)
            busy.append(b["busy_steps"] / b["steps"])
    if xs:
        ax_steps.plot(xs, ys, color="#1f77b4", lw=1.2, marker=".", ms=3, label="steps/s")
        ax_busy = ax_steps.twinx()
        ax_busy.fill_between(xs, busy, step="mid", color="#9ecae1", alpha=0.35, lw=0)
        ax_busy.set_ylim(0, 1.02)
        ax_busy.set_ylabel("share busy", color="#6baed6")
    ax_steps.set_ylabel("training steps/s")
    ax_steps.set_ylim(bottom=0)

    # 2. evaluation jobs
    for start, end, outcome in _eval_bars(events, t_end):
        colour = _OUTCOME_COLOURS.get(outcome, "#bcbd22")
        ax_eval.broken_barh([(start - t0, max(end - start, 1e-9))], (0.2, 0.6), color=colour)
    skips = [e["t"] - t0 for e in events if e.get("kind") == "eval_skipped"]
    if skips:
        ax_eval.plot(skips, [0.5] * len(skips), "x", color=_OUTCOME_COLOURS["skipped"], ms=7)
    ax_eval.set_yticks([])
    ax_eval.set_ylim(0, 1.45)  # headroom for the legend above the bars
    ax_eval.set_ylabel("evaluation")
    ax_eval.legend(
        handles=[Patch(color=c, label=k) for k, c in _OUTCOME_COLOURS.items()],
        loc="upper left",
        ncol=6,
        fontsize=7,
        frameon=False,
    )

    # 3. flushes, spills, cleanups
    rows = (
        ("flush", lambda e: e.get("kind") == "flush" and e.get("ok", True), "#2ca02c", "|"),
        (
            "flush failed",
            lambda e: e.get("kind") in ("flush", "send_failed") and not e.get("ok", False),
            "#d62728",
            "|",
        ),
        ("spill / replay", lambda e: e.get("kind") in ("spill", "replay"), "#ff7f0e", "v"),
        ("cleanup", lambda e: e.get("kind") == "cleanup", "#8c564b", "o"),
    )
    labels = []
    for y, (label, match, colour, marker) in enumerate(rows):
        ts = [e["t"] - t0 for e in events if match(e)]
        if ts:
            ax_io.plot(ts, [y] * len(ts), marker, color=colour, ms=6)
        labels.append(f"{label} ({len(ts)})")
    ax_io.set_ylim(-0.6, len(rows) - 0.4)
    ax_io.set_yticks(range(len(rows)), labels, fontsize=7)

    # 4. memory
    if memory:
        mt = [m["t"] - t0 for m in memory]
        ax_mem.plot(mt, [m.get("host_rss_mb") for m in memory], color="#1f77b4", lw=1.2, label="host RSS")
        if any(m.get("cuda_allocated_mb") for m in memory):
            ax_mem.plot(
                mt, [m.get("cuda_allocated_mb") for m in memory], color="#e377c2", lw=1.2, label="CUDA allocated"
            )
        ax_mem.legend(loc="upper left", fontsize=7, frameon=False)
    ax_mem.set_ylabel("memory (MB)")
    ax_mem.set_xlabel("seconds since fit start")

    timed_alerts = [a for a in report.get("alerts", []) if isinstance(a.get("t"), (int, float))]
    for i, alert in enumerate(sorted(timed_alerts, key=lambda a: a["t"])):
        for ax in (ax_steps, ax_eval, ax_io, ax_mem):
            ax.axvline(alert["t"] - t0, color="#d62728", ls="--", lw=1)
        label = ax_steps.annotate(
            f" {alert['kind']}",
            (alert["t"] - t0, 0.98 - 0.09 * (i % 4)),  # staggered: alerts often fire together
            xycoords=("data", "axes fraction"),
            va="top",
            ha="left",
            fontsize=8,
            color="#d62728",
        )
        label.set_in_layout(False)
    t_last = max([t_end - t0, *(a["t"] - t0 for a in timed_alerts)])
    ax_mem.set_xlim(left=0, right=max(t_last, 1e-3))
    path = os.fspath(output)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def run_report(report_path: str, *, output: str | None) -> int:
    """``evalguard report``: print the summary table and draw the timeline. Returns the exit code."""
    from lightning_evalguard.cli import UsageError

    try:
        report = load_report(report_path)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(summary_table(report))
    target = output or os.path.splitext(report_path)[0] + "_timeline.png"
    try:
        path = draw_timeline(report, target)
    except ImportError:
        print(
            "evalguard report: matplotlib is needed to draw the timeline: pip install 'lightning-evalguard[examples]'",
            file=sys.stderr,
        )
        return 1
    print(f"\ntimeline written to {path}")
    return 0
