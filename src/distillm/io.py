"""Crash-safe files: whole files are written to a temporary name and renamed; JSONL is appended in whole lines.

A JSONL file being produced lives at `NAME.partial` until it is complete, then is renamed to `NAME`, so a
half-written file never passes for a whole one. Reading a `.partial` file drops a torn last line (a crash
mid-write) so the rows it held are regenerated rather than trained on.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import DistillmError
from .faults import fault_point

logger = logging.getLogger("distillm")


#: The error text for JSON nested deeper than Python's parser recurses (json raises RecursionError).
TOO_DEEP = "the JSON is nested too deeply to read (thousands of levels); no distillm file nests more than a few."


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def iter_json_objects(path: str | os.PathLike, error: type[Exception] = DistillmError):
    """(line number, object) for each non-empty line of a JSONL file (gzipped if it ends in .gz); a line that is
    not a JSON object raises `error` naming the file and line."""
    import gzip

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
        self.path.parent.mkdir(parents=True, exist_ok=True)

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
        with open(self.partial, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self, rows_in_order: list[dict] | None = None) -> None:
        """Publish the file under its final name (optionally rewritten in a given row order)."""
        if rows_in_order is not None:
            write_jsonl(self.partial, rows_in_order)
        elif not self.partial.exists():
            write_jsonl(self.partial, [])
        os.replace(self.partial, self.path)
