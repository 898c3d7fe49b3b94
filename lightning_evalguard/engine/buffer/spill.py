"""Spill files: rows the backend could not take, on disk as JSON lines, replayed in order later.

Layout of a spill directory (one per wrapped logger)::

    spill-20250101T120000-4242-0-00000.jsonl        a segment: header line, then one row per line
    spill-20250101T120000-4242-0-00000.jsonl.progress    byte offset replayed so far (partial replay)
    spill-20250101T120000-4242-0-00001.jsonl.replayed    a segment fully replayed: never sent again

The header line is ``{"evalguard_spill": 1, "created": ..., "logger": ..., "version": ...}``; a row
line is ``{"seq": 7, "step": 120, "t": <unix time>, "metrics": {...}}`` (Python's ``json``: NaN and
Infinity are written as bare tokens and read back as floats). Segments are rotated at
``segment_bytes``; the store refuses rows (``SpillError`` with ``reason="spill_full"``) once its
unreplayed segments would pass ``max_bytes``. A failed write (disk full, directory gone) raises
``SpillError`` with ``reason="spill_failed"`` after truncating the segment back to its last good
row, so what the store reports written is exactly what is on disk.

The same module reads segments back for ``evalguard replay`` (:func:`list_segments`,
:func:`iter_rows`, :func:`save_progress`, :func:`mark_replayed`).

Examples:
    >>> import tempfile
    >>> from lightning_evalguard.engine.buffer.core import Row
    >>> store = SpillStore(tempfile.mkdtemp(), max_bytes=1 << 20)
    >>> store.append([Row(1, 10, {"loss": 0.5}), Row(2, 11, {"loss": 0.4})])
    >>> [(e.row.step, e.row.values) for e in store.read_backlog(10)]
    [(10, {'loss': 0.5}), (11, {'loss': 0.4})]
    >>> store.close()
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import threading
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from lightning_evalguard.engine.buffer.core import Row
from lightning_evalguard.errors import SpillError

__all__ = [
    "SpillEntry",
    "SpillFailure",
    "SpillStore",
    "iter_rows",
    "list_segments",
    "load_progress",
    "mark_replayed",
    "read_header",
    "save_progress",
]

FORMAT_VERSION: Final = 1
HEADER_KEY: Final = "evalguard_spill"
SEGMENT_GLOB: Final = "spill-*.jsonl"
PROGRESS_SUFFIX: Final = ".progress"
REPLAYED_SUFFIX: Final = ".replayed"

_open = open


def _write(fh: IO[bytes], data: bytes) -> None:
    """Every write to a segment goes through here (:class:`lightning_evalguard.testing.FullDisk`
    replaces it to make writes fail with ENOSPC, as on a full disk)."""
    fh.write(data)
    fh.flush()

_store_ids = itertools.count()


class SpillFailure(SpillError):
    """A spill write was refused or failed. ``reason`` is the ledger's drop reason
    (``"spill_failed"`` or ``"spill_full"``); ``cause`` the underlying ``OSError`` if any."""

    def __init__(self, reason: str, message: str, cause: BaseException | None = None) -> None:
        self.reason = reason
        self.cause = cause
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class SpillEntry:
    """A row read back from a segment, and where the next row starts."""

    row: Row
    segment: int
    end: int


class _Segment:
    __slots__ = ("counts", "cursor", "done", "fh", "path", "persisted", "replayed_rows", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: IO[bytes] | None = None
        self.size = 0  # bytes known good on disk
        self.cursor = 0  # byte offset of the next row to replay
        self.persisted = 0  # cursor value last written to the .progress file
        self.counts = array("I")  # values per row, in file order
        self.replayed_rows = 0
        self.done = False  # closed for writing (rotated or broken)


class SpillStore:
    """Append-only spill segments for one logger, with an in-process replay cursor. Thread-safe.

    Args:
        directory: where segments go; created on the first write.
        max_bytes: bound on the bytes of segments not yet fully replayed.
        segment_bytes: rotate to a new segment past this size (default: ``max_bytes / 8``, at
            least 64 KiB and at most 16 MiB).
        meta: extra fields for each segment's header line (logger class, name, version...).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        segment_bytes: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(segment_bytes or min(16 << 20, max(64 << 10, self.max_bytes // 8)))
        self.meta = dict(meta or {})
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._stem = f"spill-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{next(_store_ids)}"
        self._backlog_rows = 0
        self._backlog_values = 0
        self.rows_written = 0
        self.values_written = 0
        self.write_errors = 0
        self.closed = False

    # -- writing ---------------------------------------------------------------------------------
    def append(self, rows: Sequence[Row]) -> None:
        """Write ``rows`` at the end of the current segment, or raise :class:`SpillFailure`."""
        if not rows:
            return
        wall = time.time()
        try:
            data = b"".join(
                json.dumps({"seq": r.seq, "step": r.step, "t": wall, "metrics": r.values}).encode() + b"\n"
                for r in rows
            )
        except (TypeError, ValueError) as exc:
            raise SpillFailure("spill_failed", f"rows cannot be written as JSON: {exc}", exc) from exc
        with self._lock:
            if self.closed:
                raise SpillFailure("spill_failed", "spill store is closed")
            if self._disk_bytes() + len(data) > self.max_bytes:
                raise SpillFailure(
                    "spill_full", f"spill files under {str(self.directory)!r} reached max_spill_mb"
                )
            seg = self._writable_segment()
            assert seg.fh is not None
            try:
                _write(seg.fh, data)
            except OSError as exc:
                self.write_errors += 1
                self._rewind(seg)
                raise SpillFailure("spill_failed", f"cannot write {str(seg.path)!r}: {exc}", exc) from exc
            seg.size += len(data)
            seg.counts.extend(len(r.values) for r in rows)
            n_values = sum(len(r.values) for r in rows)
            self._backlog_rows += len(rows)
            self._backlog_values += n_values
            self.rows_written += len(rows)
            self.values_written += n_values
            if seg.size >= self.segment_bytes:
                self._finish(seg)

    def _disk_bytes(self) -> int:
        return sum(s.size for s in self._segments if s.cursor < s.size or not s.done)

    def _writable_segment(self) -> _Segment:
        seg = self._segments[-1] if self._segments else None
        if seg is not None and not seg.done and seg.fh is not None:
            return seg
        path = self.directory / f"{self._stem}-{len(self._segments):05d}.jsonl"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fh = _open(path, "ab")
        except OSError as exc:
            self.write_errors += 1
            raise SpillFailure("spill_failed", f"cannot create {str(path)!r}: {exc}", exc) from exc
        seg = _Segment(path)
        seg.fh = fh
        header = {HEADER_KEY: FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.meta}
        data = json.dumps(header, default=str).encode() + b"\n"
        try:
            _write(fh, data)
        except OSError as exc:
            self.write_errors += 1
            self._discard(seg)
            raise SpillFailure("spill_failed", f"cannot write {str(path)!r}: {exc}", exc) from exc
        seg.size = seg.cursor = seg.persisted = len(data)
        self._segments.append(seg)
        return seg

    def _rewind(self, seg: _Segment) -> None:
        """After a failed write: cut the segment back to its last good row, or give it up."""
        assert seg.fh is not None
        try:
            seg.fh.truncate(seg.size)
            seg.fh.seek(seg.size)
        except (OSError, ValueError):
            self._finish(seg)  # a torn tail stays past `size`; readers here never go past `size`

    def _discard(self, seg: _Segment) -> None:
        try:
            if seg.fh is not None:
                seg.fh.close()
            seg.path.unlink()
        except OSError:
            pass

    def _finish(self, seg: _Segment) -> None:
        seg.done = True
        if seg.fh is not None:
            with contextlib.suppress(OSError):
                seg.fh.close()
            seg.fh = None

    # -- replay ----------------------------------------------------------------------------------
    @property
    def backlog_rows(self) -> int:
        """Rows written by this store and not yet replayed."""
        return self._backlog_rows

    @property
    def backlog_values(self) -> int:
        """Values in those rows."""
        return self._backlog_values

    def read_backlog(self, max_rows: int) -> list[SpillEntry]:
        """Up to ``max_rows`` unreplayed rows, oldest first, without moving the cursor (see
        :meth:`advance`). Raises :class:`SpillFailure` (``reason="spill_failed"``) when a segment
        cannot be read; :meth:`skip_segment` then gives its rows up."""
        with self._lock:
            entries: list[SpillEntry] = []
            for index, seg in enumerate(self._segments):
                if seg.cursor >= seg.size:
                    continue
                try:
                    with _open(seg.path, "rb") as fh:
                        fh.seek(seg.cursor)
                        offset = seg.cursor
                        row_index = seg.replayed_rows
                        while offset < seg.size and len(entries) < max_rows:
                            line = fh.readline()
                            if not line.endswith(b"\n"):
                                raise ValueError(f"truncated row at byte {offset}")
                            offset += len(line)
                            record = json.loads(line)
                            row = Row(int(record["seq"]), record["step"], record["metrics"])
                            if len(row.values) != seg.counts[row_index]:
                                raise ValueError(f"row at byte {offset - len(line)} does not match what was written")
                            entries.append(SpillEntry(row, index, offset))
                            row_index += 1
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    if entries:
                        return entries  # deliver what was read; the bad row comes up next time
                    raise SpillFailure("spill_failed", f"cannot read {str(seg.path)!r}: {exc}", exc) from exc
                if len(entries) >= max_rows:
                    break
            return entries

    def advance(self, entry: SpillEntry) -> int:
        """Mark ``entry`` (the next unreplayed row) as replayed. Returns its number of values."""
        with self._lock:
            seg = self._segments[entry.segment]
            n = seg.counts[seg.replayed_rows]
            seg.cursor = entry.end
            seg.replayed_rows += 1
            self._backlog_rows -= 1
            self._backlog_values -= n
            return n

    def skip_segment(self) -> int:
        """Give up the unreadable remainder of the oldest unreplayed segment. Returns the values lost."""
        with self._lock:
            for seg in self._segments:
                if seg.cursor < seg.size:
                    lost_counts = seg.counts[seg.replayed_rows :]
                    lost = sum(lost_counts)
                    self._backlog_rows -= len(lost_counts)
                    self._backlog_values -= lost
                    seg.replayed_rows = len(seg.counts)
                    seg.cursor = seg.size
                    self._finish(seg)
                    return lost
            return 0

    def commit(self) -> None:
        """Persist replay progress: ``.progress`` files, and ``.replayed`` for finished segments."""
        with self._lock:
            self._commit_locked()

    def _commit_locked(self) -> None:
        for seg in self._segments:
            if seg.path.name.endswith(REPLAYED_SUFFIX):
                continue
            if seg.cursor >= seg.size and seg.done:
                with contextlib.suppress(OSError):
                    seg.path = mark_replayed(seg.path)
            elif seg.cursor != seg.persisted:
                try:
                    save_progress(seg.path, seg.cursor)
                    seg.persisted = seg.cursor
                except OSError:
                    pass

    def close(self) -> None:
        """Close files and persist progress. Idempotent; what is not replayed stays for the CLI."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for seg in self._segments:
                self._finish(seg)
            self._commit_locked()

    def paths(self) -> list[Path]:
        """Paths of this store's segments (with their current suffix)."""
        with self._lock:
            return [s.path for s in self._segments]


# -- reading spill directories (``evalguard replay``) ------------------------------------------------
def list_segments(directory: str | os.PathLike[str]) -> list[Path]:
    """Segments under ``directory`` (recursively) not yet marked replayed, oldest first."""
    root = Path(directory)
    return sorted(root.rglob(SEGMENT_GLOB), key=lambda p: (p.name, str(p)))


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a segment (empty dict if the first line is not a spill header)."""
    with _open(path, "rb") as fh:
        line = fh.readline()
    try:
        header = json.loads(line)
    except ValueError:
        return {}
    return header if isinstance(header, dict) and HEADER_KEY in header else {}


def load_progress(path: str | os.PathLike[str]) -> int:
    """Byte offset already replayed in segment ``path`` (0 when none recorded)."""
    try:
        with open(f"{os.fspath(path)}{PROGRESS_SUFFIX}", encoding="utf-8") as fh:
            return int(json.load(fh)["offset"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def save_progress(path: str | os.PathLike[str], offset: int) -> None:
    """Record (atomically) that ``path`` is replayed up to byte ``offset``."""
    target = f"{os.fspath(path)}{PROGRESS_SUFFIX}"
    tmp = f"{target}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"offset": int(offset)}, fh)
    os.replace(tmp, target)


def mark_replayed(path: str | os.PathLike[str]) -> Path:
    """Rename a fully replayed segment to ``*.replayed`` (never sent again) and drop its progress."""
    source = Path(path)
    target = source.with_name(source.name + REPLAYED_SUFFIX)
    os.replace(source, target)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{source}{PROGRESS_SUFFIX}")
    return target


def iter_rows(path: str | os.PathLike[str], start: int = 0) -> Iterator[tuple[dict[str, Any], int]]:
    """``(record, end_offset)`` for each row of a segment from byte ``start`` (0: after the header).

    A torn last line (a crash mid-write) ends the iteration; a line that is not a row is skipped.
    """
    with _open(path, "rb") as fh:
        if start <= 0:
            fh.readline()
            start = fh.tell()
        fh.seek(start)
        offset = start
        for line in fh:
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
                yield record, offset


def is_no_space(exc: BaseException | None) -> bool:
    """True for the disk-full error (ENOSPC/EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
