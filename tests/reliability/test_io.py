"""Crash-safe file helpers: torn-tail tolerant JSONL reading, atomic writes and the .partial appender."""

from __future__ import annotations

import json
import os

import pytest

from distillm.io import JsonlAppender, atomic_write_json, atomic_write_text, read_jsonl, write_jsonl

ROWS = [{"id": "a", "n": 1}, {"id": "b", "text": "héllo ✓"}, {"id": "c", "list": [1, 2]}]


def _lines(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ------------------------------------------------------------------------------------------------ read_jsonl


def test_read_jsonl_round_trips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + _lines(ROWS[1:]), encoding="utf-8")
    assert read_jsonl(path) == ROWS
    assert read_jsonl(path, tolerate_torn_tail=True) == ROWS
    write_jsonl(path, ROWS)
    assert read_jsonl(path) == ROWS
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert read_jsonl(empty) == [] and read_jsonl(empty, tolerate_torn_tail=True) == []


def test_torn_last_line_is_dropped_only_when_tolerated(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(_lines(ROWS[:2]) + '{"id": "c", "li')
    assert read_jsonl(path, tolerate_torn_tail=True) == ROWS[:2]
    with pytest.raises(ValueError, match=f"{path}:3"):
        read_jsonl(path)


def test_torn_multibyte_character_at_the_tail_is_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    tail = json.dumps({"id": "x", "text": "✓✓"}, ensure_ascii=False).encode("utf-8")
    cut = tail.index("✓".encode("utf-8")) + 1  # in the middle of a 3-byte character
    path.write_bytes(_lines(ROWS[:1]).encode("utf-8") + tail[:cut])
    assert read_jsonl(path, tolerate_torn_tail=True) == ROWS[:1]
    with pytest.raises(ValueError, match=f"{path}:2"):
        read_jsonl(path)


def test_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(_lines(ROWS[:1]) + "{not json\n" + _lines(ROWS[1:]))
    for tolerate in (False, True):
        with pytest.raises(ValueError, match=f"{path}:2: not a valid JSON line"):
            read_jsonl(path, tolerate_torn_tail=tolerate)


def test_unterminated_but_parseable_last_line_is_dropped_when_tolerated(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(_lines(ROWS[:2]) + json.dumps(ROWS[2]))  # no final newline: the write was cut short
    assert read_jsonl(path, tolerate_torn_tail=True) == ROWS[:2]
    assert read_jsonl(path) == ROWS  # a finished file without a final newline is still read whole


def test_unparsable_but_terminated_last_line_is_dropped_when_tolerated(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(_lines(ROWS[:2]) + '{"id": "c"\n')
    assert read_jsonl(path, tolerate_torn_tail=True) == ROWS[:2]
    with pytest.raises(ValueError, match=f"{path}:3"):
        read_jsonl(path)


# ----------------------------------------------------------------------------------------- atomic_write_text


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "first version, rather long\n")
    assert path.read_text() == "first version, rather long\n"
    atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    atomic_write_json(tmp_path / "sub" / "obj.json", {"é": [1, 2]})
    assert json.loads((tmp_path / "sub" / "obj.json").read_text(encoding="utf-8")) == {"é": [1, 2]}
    assert sorted(os.listdir(path.parent)) == ["obj.json", "out.txt"]


def test_failed_atomic_write_keeps_the_old_content_and_cleans_up(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old\n")
    with pytest.raises(TypeError):
        atomic_write_text(path, 12345)  # write() fails after the temp file was created
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]


# ---------------------------------------------------------------------------------------------- JsonlAppender


def test_appender_round_trip(tmp_path):
    path = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    writer = JsonlAppender(path)
    assert writer.partial == partial
    assert writer.existing_rows() == []
    writer.append(ROWS[:1])
    writer.append(ROWS[1:2])
    assert not path.exists() and partial.read_text(encoding="utf-8") == _lines(ROWS[:2])
    # a new appender (a restarted process) sees what was written and continues after it
    again = JsonlAppender(path)
    assert again.existing_rows() == ROWS[:2]
    again.append(ROWS[2:])
    assert again.existing_rows() == ROWS
    again.finish()
    assert not partial.exists()
    assert read_jsonl(path) == ROWS
    assert JsonlAppender(path).existing_rows() == ROWS


def test_appender_finish_in_a_given_order(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = JsonlAppender(path)
    writer.append([ROWS[2], ROWS[0]])
    writer.append([ROWS[1]])
    writer.finish(ROWS)
    assert path.read_text(encoding="utf-8") == _lines(ROWS)
    assert not writer.partial.exists()


def test_appender_finish_with_nothing_written_publishes_an_empty_file(tmp_path):
    writer = JsonlAppender(tmp_path / "deep" / "out.jsonl")
    writer.finish()
    assert (tmp_path / "deep" / "out.jsonl").read_text() == ""
    assert not writer.partial.exists()


def test_appender_drops_a_torn_tail_before_appending(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = JsonlAppender(path)
    writer.partial.write_text(_lines(ROWS[:2]) + '{"id": "c", "li')
    assert writer.existing_rows() == ROWS[:2]
    assert writer.partial.read_text(encoding="utf-8") == _lines(ROWS[:2])  # the torn bytes are gone from disk
    writer.append(ROWS[2:])
    assert read_jsonl(writer.partial) == ROWS  # no corrupt line between the old rows and the new one
    writer.finish()
    assert read_jsonl(path) == ROWS and not writer.partial.exists()
