"""Crash-safe files: whole files are written to a temporary name and renamed; JSONL is appended in whole lines.

A JSONL file being produced lives at `NAME.partial` until it is complete, then is renamed to `NAME`, so a
half-written file never passes for a whole one. Reading a `.partial` file drops a torn last line (a crash
mid-write) so the rows it held are regenerated rather than trained on.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import DistillmError
from .testing.faults import fault_point

logger = logging.getLogger("distillm")


#: The error text for JSON nested deeper than Python's parser recurses (json raises RecursionError).
TOO_DEEP = "the JSON is nested too deeply to read (thousands of levels); no distillm file nests more than a few."


#: errors of the disk or its permissions rather than of distillm: reported as a WriteError naming the file
_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space there (or choose an --output-dir on another disk)"),
    errno.EDQUOT: ("disk quota exceeded", "free space there (or choose an --output-dir on another disk)"),
    errno.EROFS: ("read-only file system", "choose a writable --output-dir"),
    errno.EACCES: ("permission denied", "choose a writable --output-dir (or make it writable)"),
    errno.EPERM: ("operation not permitted", "choose a writable --output-dir (or make it writable)"),
}


class WriteError(DistillmError):
    """A file could not be written: the disk is full or the location is not writable."""


def disk_error(path: str | os.PathLike, err: OSError) -> WriteError | None:
    """The clear error for an OSError of the disk or its permissions while writing `path`, else None."""
    if err.errno not in _DISK_ERRORS:
        return None
    reason, fix = _DISK_ERRORS[err.errno]
    return WriteError(f"Cannot write {path}: {reason} ({errno.errorcode[err.errno]}). {fix[0].upper()}{fix[1:]}, "
                      "then rerun the same command: what is already finished is kept.")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`: `path` is either the old file or
    the new one, never a part. A full disk or a location that is not writable is a WriteError naming `path`, and
    the temporary file is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise disk_error(path, err) or err
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and disk_error(path, err):
            raise disk_error(path, err) from err
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def iter_json_objects(path: str | os.PathLike, error: type[Exception] = DistillmError):
    """(line number, object) for each non-empty line of a JSONL file (gzipped if it ends in .gz); a line that is
    not a JSON object raises `error` naming the file and line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise error(f"{path}:{number}: not a valid JSON line ({err}).") from err
            except RecursionError:
                raise error(f"{path}:{number}: {TOO_DEEP}") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{number}: expected a JSON object per line.")
            yield number, row


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = False) -> list[dict]:
    """Read a JSONL file. With `tolerate_torn_tail`, an unterminated or unparsable LAST line is dropped
    (and logged); anywhere else a bad line is an error naming the file and line."""
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete = raw.endswith(b"\n") or not raw
    rows = []
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines) or (number == len(lines) - 1 and complete)
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except RecursionError:
            raise DistillmError(f"{path}:{number}: {TOO_DEEP}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if tolerate_torn_tail and is_last:
                logger.warning("%s:%d: dropping a torn last line left by an interrupted write", path, number)
                break
            raise DistillmError(f"{path}:{number}: not a valid JSON line ({err}).") from err
        if tolerate_torn_tail and is_last and not complete:
            # Parsed, but the newline never made it to disk: the write was interrupted; redo this row.
            rows.pop()
            logger.warning("%s:%d: dropping an unterminated last line left by an interrupted write", path, number)
    return rows


class JsonlAppender:
    """Appends whole rows to `NAME.partial` (each batch flushed and fsynced), renamed to NAME by `finish()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise disk_error(self.path.parent, err) or err

    def existing_rows(self) -> list[dict]:
        """Rows already complete: the finished file, or the intact lines of the partial one (rewritten clean).

        A finished file whose last line is torn (left by a crash of a version that wrote in place) is taken back
        to `.partial` without that line, so the caller regenerates the row instead of training on it."""
        if self.path.is_file():
            rows = read_jsonl(self.path, tolerate_torn_tail=True)
            if len(rows) == sum(1 for line in self.path.read_bytes().split(b"\n") if line.strip()):
                return rows
            logger.warning("%s: the last line is torn; it will be regenerated", self.path)
            write_jsonl(self.partial, rows)
            self.path.unlink()
            return rows
        if not self.partial.is_file():
            return []
        rows = read_jsonl(self.partial, tolerate_torn_tail=True)
        write_jsonl(self.partial, rows)  # drop any torn tail from disk before appending after it
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        fault_point(f"torn:{self.path.stem}", before_kill=lambda: self._write(text[: max(len(text) // 2, 1)]))
        self._write(text)

    def _write(self, text: str) -> None:
        try:
            with open(self.partial, "a", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            # the rows appended before stay in NAME.partial (a torn last line is dropped when the run continues)
            raise disk_error(self.partial, err) or err

    def finish(self, rows_in_order: list[dict] | None = None) -> None:
        """Publish the file under its final name (optionally rewritten in a given row order)."""
        if rows_in_order is not None:
            write_jsonl(self.partial, rows_in_order)
        elif not self.partial.exists():
            write_jsonl(self.partial, [])
        os.replace(self.partial, self.path)
