"""Load the prompts the pipeline generates responses for, and encode them with the model's chat template.

`load_prompts` reads JSONL, JSON, CSV, Parquet, a Hugging Face dataset saved with `save_to_disk`, or the built-in
set, and turns every row into a `PromptRecord` holding chat messages that end with the user turn to answer.
Every problem with the input raises `DataError`, whose message names the file, the line or row, and the field,
and says how to fix it. `encode_prompts` renders the messages with the tokenizer's own chat template and
truncates long prompts from the left, so the generation-prompt suffix always survives.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillm.data.builtin import BUILTIN_SPLITS, load_builtin
from distillm.errors import DistillmError
from distillm.io import TOO_DEEP

logger = logging.getLogger("distillm")

SUPPORTED_FORMATS = (
    ".jsonl, .json, .csv, .parquet, a dataset directory saved with datasets' save_to_disk "
    "(DIR or DIR:split), or builtin / builtin:train / builtin:eval"
)


class DataError(DistillmError):
    """Bad prompt input. The message names the file, the line or row (1-based) and the field, and how to fix it."""


@dataclass
class PromptRecord:
    """One prompt: chat messages ending with the user turn to answer, plus an optional reference response."""

    id: str
    messages: list[dict]
    response: str | None = None
    source: str = ""


@dataclass
class LoadReport:
    """What `load_prompts` read: the source, how many prompts it kept and how many empty ones it skipped."""

    path: str
    n_loaded: int
    n_empty_skipped: int


@dataclass
class EncodedPrompt:
    """A prompt as the model sees it: the templated text (after truncation) and its token ids."""

    id: str
    text: str
    input_ids: list[int]
    response: str | None = None
    image: str | None = None  # vision-language prompts (data.vision): the image's path


@dataclass(frozen=True)
class _Where:
    """Where a row came from, printed as "path:LINE" (text files) or "path: row N" (tables, JSON lists)."""

    path: str
    number: int
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.path}:{self.number}" if self.unit == "line" else f"{self.path}: {self.unit} {self.number}"


@dataclass(frozen=True)
class PromptFields:
    """The column names to read each part of a record from."""

    prompt: str = "prompt"
    messages: str = "messages"
    response: str = "response"
    id: str = "id"


# A row as the readers yield it: (number used in the fallback id, where it came from, the raw record).
_Row = tuple[int, _Where, Any]


# ------------------------------------------------------------------------------------------------
# load_prompts
# ------------------------------------------------------------------------------------------------


def load_prompts(
    path: str | os.PathLike | None,
    *,
    prompt_field: str = "prompt",
    messages_field: str = "messages",
    response_field: str = "response",
    id_field: str = "id",
    system_prompt: str | None = None,
    limit: int | None = None,
) -> tuple[list[PromptRecord], LoadReport]:
    """Read prompts from `path` (a file, a saved dataset directory, or None / "builtin[:train|:eval]").

    Each record takes its messages from `messages_field` (a list of {"role", "content"} dicts; a trailing
    assistant turn becomes the `response`) or else from `prompt_field` (a string, used as one user turn).
    `system_prompt`, if given, is prepended unless the messages already start with a system turn. Records whose
    user turn is empty are skipped and counted; `limit` keeps the first N records that are loaded.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be zero or positive, got {limit}")
    label, stem, rows, fields = open_source(path, PromptFields(prompt_field, messages_field, response_field, id_field))
    records, n_empty = collect_records(rows, stem, fields, system_prompt, limit)
    if not records and limit != 0:
        raise DataError(f"{label}: no prompts found ({n_empty} empty prompts skipped). Check the file's contents.")
    return records, LoadReport(path=label, n_loaded=len(records), n_empty_skipped=n_empty)


def open_source(path: str | os.PathLike | None, fields: PromptFields) -> tuple[str, str, Iterator[_Row], PromptFields]:
    """Resolve `path` to (label for reports, stem for fallback ids, row iterator, field names to use)."""
    spec = "builtin" if path is None else os.fspath(path)
    if spec == "builtin" or spec.startswith("builtin:"):
        split = spec.partition(":")[2] or "train"
        return f"builtin:{split}", f"builtin-{split}", _read_builtin(split), PromptFields()
    file = Path(spec)
    if file.is_dir():
        return spec, file.name, _read_saved_dataset(file, None, spec), fields
    if not file.exists():
        base, _, split = spec.rpartition(":")
        if base and split and Path(base).is_dir():
            return spec, Path(base).name, _read_saved_dataset(Path(base), split, spec), fields
        raise DataError(f"prompt file not found: {spec}. Check the path, or use 'builtin' for the built-in prompts.")
    reader = _READERS.get(file.suffix.lower())
    if reader is None:
        suffix = file.suffix or "(no extension)"
        raise DataError(f"{spec}: unsupported file type {suffix!r}. Supported: {SUPPORTED_FORMATS}.")
    return spec, file.stem, reader(file, spec), fields


def collect_records(
    rows: Iterable[_Row], stem: str, fields: PromptFields, system_prompt: str | None, limit: int | None,
    extend=None,
) -> tuple[list[PromptRecord], int]:
    """Parse rows into records until `limit` is reached; returns the records and the number of empty ones skipped.
    `extend(record, raw, where)`, if given, turns each parsed record into the record kept (e.g. adds its image;
    it raises DataError for a bad row)."""
    records: list[PromptRecord] = []
    first_seen: dict[str, str] = {}
    n_empty = 0
    for number, where, raw in rows:
        if limit is not None and len(records) >= limit:
            break
        record = _parse_record(raw, number, where, stem, fields, system_prompt)
        if record is None:
            n_empty += 1
            continue
        if record.id in first_seen:
            raise DataError(
                f"{where}: duplicate id {record.id!r} (first used at {first_seen[record.id]}). Ids must be unique."
            )
        first_seen[record.id] = record.source
        records.append(record if extend is None else extend(record, raw, where))
    return records, n_empty


# ------------------------------------------------------------------------------------------------
# Readers: each yields (number, where, raw record)
# ------------------------------------------------------------------------------------------------


def _read_text(file: Path, label: str) -> str:
    """The file's text as UTF-8 (a leading byte-order mark is dropped); bad bytes raise DataError with the line."""
    data = file.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{label}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at column {column}). Re-save the file as UTF-8."
        ) from None


def _read_jsonl(file: Path, label: str) -> Iterator[_Row]:
    """One JSON object per line; blank lines are ignored."""
    for lineno, line in enumerate(_read_text(file, label).split("\n"), start=1):
        if not line.strip():
            continue
        where = _Where(label, lineno)
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: invalid JSON ({e.msg} at column {e.colno}). "
                "Each line of a .jsonl file must be one JSON object."
            ) from None
        except RecursionError:
            raise DataError(f"{where}: {TOO_DEEP}") from None
        yield lineno, where, raw


def _read_json(file: Path, label: str) -> Iterator[_Row]:
    """A JSON list of objects, or an object with exactly one list-valued key (e.g. {"data": [...]})."""
    try:
        data = json.loads(_read_text(file, label))
    except json.JSONDecodeError as e:
        raise DataError(f"{label}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
    except RecursionError:
        raise DataError(f"{label}: {TOO_DEEP}") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{label}: expected a list of records, or an object with exactly one list-valued key "
                f"(found {len(lists)}: {', '.join(lists) or 'none'}). Put the records in a top-level list."
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{label}: expected a list of records at the top level, got {type_name(data)}.")
    for index, raw in enumerate(data, start=1):
        yield index, _Where(label, index, "item"), raw


def _read_csv(file: Path, label: str) -> Iterator[_Row]:
    """A header row, then one record per row; empty cells read as missing values (None)."""
    reader = csv.reader(io.StringIO(_read_text(file, label), newline=""))
    header = next(reader, None)
    if not header:
        raise DataError(f"{label}: empty CSV file; the first row must name the columns (e.g. id,prompt).")
    row_number, last_line = 0, reader.line_num
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a cell over the csv module's field size limit (128 KiB)
            raise DataError(f"{_Where(label, last_line + 1)}: unreadable CSV ({e}). Store long texts in a .jsonl "
                            "file instead.") from None
        where, last_line = _Where(label, last_line + 1), reader.line_num
        if not cells:  # a blank line
            continue
        row_number += 1
        if len(cells) != len(header):
            raise DataError(
                f"{where}: row has {len(cells)} values but the header has {len(header)} columns. "
                'Quote values that contain commas, e.g. "Hello, world".'
            )
        yield row_number, where, {key: (value if value != "" else None) for key, value in zip(header, cells)}


def _read_parquet(file: Path, label: str) -> Iterator[_Row]:
    """A Parquet table, read with pyarrow (or pandas when pyarrow is missing)."""
    try:
        rows = _parquet_rows(file)
    except ImportError:
        raise DataError(f"{label}: reading .parquet needs pyarrow or pandas; pip install pyarrow.") from None
    except Exception as e:  # a corrupt or non-Parquet file: the readers raise assorted error types
        raise DataError(f"{label}: not a readable Parquet file ({e}).") from None
    for index, raw in enumerate(rows, start=1):
        yield index, _Where(label, index, "row"), raw


def _parquet_rows(file: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq  # optional: pyarrow (the dev extra), only for .parquet prompts
    except ImportError:
        import pandas as pd  # optional: pandas (the dev extra), the fallback .parquet reader

        frame = pd.read_parquet(file)
        return frame.astype(object).where(frame.notna(), None).to_dict("records")
    return pq.read_table(file).to_pylist()


def _read_saved_dataset(directory: Path, split: str | None, label: str) -> Iterator[_Row]:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (its "train" split by default)."""
    if (directory / "dataset_dict.json").exists():
        dataset = _pick_split(_load_from_disk(directory, label), split, label)
    elif (directory / "state.json").exists():
        if split is not None:
            raise DataError(
                f"{label}: {directory} holds a single Dataset, not a DatasetDict; drop ':{split}' from the path."
            )
        dataset = _load_from_disk(directory, label)
    else:
        raise DataError(
            f"{label}: is a directory but not a dataset saved with save_to_disk. Supported: {SUPPORTED_FORMATS}."
        )
    for index, raw in enumerate(dataset, start=1):
        yield index, _Where(label, index, "row"), raw


def _load_from_disk(directory: Path, label: str) -> Any:
    import datasets  # optional: heavy (pyarrow, pandas), only for a saved Hugging Face dataset

    try:
        return datasets.load_from_disk(str(directory))
    except Exception as e:  # damaged dataset files: datasets raises assorted error types
        raise DataError(f"{label}: could not load the saved dataset ({e}).") from None


def _pick_split(dataset_dict: Any, split: str | None, label: str) -> Any:
    """The requested split of a DatasetDict ("train" when none is named)."""
    name = split or "train"
    if name not in dataset_dict:
        available = ", ".join(dataset_dict.keys())
        directory = label.rpartition(":")[0] if split is not None else label
        raise DataError(
            f"{label}: the dataset has no split {name!r} (splits: {available}). Pick one as {directory}:SPLIT."
        )
    return dataset_dict[name]


def _read_builtin(split: str) -> Iterator[_Row]:
    """The packaged prompt set (see distillm.data.builtin)."""
    if split not in BUILTIN_SPLITS:
        raise DataError(f"unknown built-in split {split!r}; use builtin:train or builtin:eval.")
    for index, raw in enumerate(load_builtin(split), start=1):
        yield index, _Where(f"builtin:{split}", index, "item"), raw


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


# ------------------------------------------------------------------------------------------------
# Record parsing
# ------------------------------------------------------------------------------------------------


def _parse_record(
    raw: Any, number: int, where: _Where, stem: str, fields: PromptFields, system_prompt: str | None
) -> PromptRecord | None:
    """Turn one raw record into a PromptRecord, or None when its prompt is empty."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with a '{fields.prompt}' field, got {type_name(raw)}.")
    if fields.messages not in raw and fields.prompt not in raw:
        present = ", ".join(map(str, raw)) or "none"
        raise DataError(
            f"{where}: no field '{fields.prompt}' or '{fields.messages}' (fields present: {present}). "
            "Set --prompt-field/--messages-field to the right column."
        )
    messages, trailing_response = _prompt_messages(raw, where, fields)
    if not messages or not messages[-1]["content"].strip():
        return None
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    response = _optional_string(raw, fields.response, where)
    return PromptRecord(
        id=_record_id(raw, fields.id, where) or f"{stem}-{number}",
        messages=messages,
        response=response if response is not None else trailing_response,
        source=str(where),
    )


def _prompt_messages(raw: dict, where: _Where, fields: PromptFields) -> tuple[list[dict], str | None]:
    """The messages to answer, and the content of a trailing assistant turn (removed from them), if any."""
    if raw.get(fields.messages) is not None:
        return _split_messages(_parse_messages(raw[fields.messages], where, fields.messages), where, fields.messages)
    prompt = raw.get(fields.prompt)
    if prompt is None:
        return [], None
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field '{fields.prompt}' must be a string, got {type_name(prompt)}.")
    return [{"role": "user", "content": prompt}], None


def _parse_messages(value: Any, where: _Where, field: str) -> list[dict]:
    """Validate a list of {"role", "content"} dicts (a JSON string of one is accepted, e.g. from a CSV cell)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        except RecursionError:
            raise DataError(f"{where}: field '{field}': {TOO_DEEP}") from None
    expected = 'a list of {"role": ..., "content": ...} objects'
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be {expected}, got {type_name(value)}.")
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{field}', message {i}: expected an object, got {type_name(message)}.")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(
                    f"{where}: field '{field}', message {i}: '{key}' must be a string, "
                    f"got {type_name(message.get(key))}. "
                    f"Each message must be {expected}."
                )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _split_messages(messages: list[dict], where: _Where, field: str) -> tuple[list[dict], str | None]:
    """Remove a trailing assistant turn (returned as the response); the rest must end with a user turn."""
    response = None
    if messages and messages[-1]["role"] == "assistant":
        response = messages.pop()["content"]
    if messages and messages[-1]["role"] != "user":
        raise DataError(
            f"{where}: field '{field}' must end with a user message (optionally followed by one assistant reply), "
            f"but the last turn to answer has role {messages[-1]['role']!r}."
        )
    return messages, response


def _optional_string(raw: dict, field: str, where: _Where) -> str | None:
    """A string field that may be absent or null; an empty string counts as absent."""
    value = raw.get(field)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type_name(value)}.")
    return value or None


def _record_id(raw: dict, field: str, where: _Where) -> str | None:
    """The record's id as a string (strings and integers are accepted), or None when absent."""
    value = raw.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field '{field}' must be a string or an integer, got {type_name(value)}.")
    return str(value)


def type_name(value: Any) -> str:
    """A JSON-style name for a value's type, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------
# encode_prompts
# ------------------------------------------------------------------------------------------------


def encode_prompts(
    records: Iterable[PromptRecord], tokenizer: Any, *, max_prompt_length: int, use_chat_template: bool = True
) -> tuple[list[EncodedPrompt], int]:
    """Render each record with the tokenizer's chat template and tokenize it, keeping at most the LAST
    `max_prompt_length` tokens. Returns the encoded prompts and how many were truncated (logged once).

    A chat template writes its own special tokens (e.g. a <bos>), so the rendered text is tokenized as it is. Plain
    text (`use_chat_template=False`) gets the special tokens the tokenizer itself puts before a text
    (`special_prefix`, e.g. Gemma's and Llama's <bos>): base models produce garbage without them. A long plain prompt
    keeps that prefix: the text is cut from the left and the prefix put back in front.
    """
    if max_prompt_length < 1:
        raise DataError(f"max_prompt_length must be at least 1, got {max_prompt_length}.")
    check_chat_template(tokenizer, use_chat_template)
    prefix = [] if use_chat_template else special_prefix(tokenizer)
    if len(prefix) >= max_prompt_length:
        raise DataError(f"max_prompt_length={max_prompt_length} leaves no room for the prompt text after the "
                        f"{len(prefix)} special token(s) the tokenizer puts first ({tokenizer.decode(prefix)!r}): "
                        f"raise --max-prompt-length.")
    records = list(records)
    texts = [_render(record.messages, tokenizer, use_chat_template) for record in records]
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    keep = max_prompt_length - len(prefix)
    prefix_text = tokenizer.decode(prefix, skip_special_tokens=False) if prefix else ""
    encoded, n_truncated = [], 0
    for record, text, ids in zip(records, texts, all_ids):
        if len(ids) > keep:
            ids = ids[-keep:]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            n_truncated += 1
        encoded.append(EncodedPrompt(id=record.id, text=prefix_text + text, input_ids=prefix + list(ids),
                                     response=record.response))
    if n_truncated:
        logger.warning(
            "%d of %d prompts were longer than max_prompt_length=%d tokens and were truncated from the left.",
            n_truncated, len(records), max_prompt_length,
        )
    return encoded, n_truncated


def check_chat_template(tokenizer: Any, use_chat_template: bool, model: str | None = None) -> None:
    """Refuse chat formatting with a tokenizer that has no chat template (a base model's). Cheap: callers run it on
    the tokenizer alone (`models.load_tokenizer`) before loading any weights."""
    if use_chat_template and getattr(tokenizer, "chat_template", None) is None:
        whose = f"the tokenizer of {model}" if model else "the tokenizer"
        raise DataError(
            f"{whose} has no chat template (a base model?), so prompts cannot be formatted as chat. Pass "
            "--no-chat-template to feed the plain message text instead, or use a tokenizer that ships a chat template."
        )


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text when asked to add its special tokens (a <bos> for
    Gemma and Llama; nothing for SmolLM2 or Qwen). Tokens it puts after a text (an <eos>, as T5's does) are not
    part of it: a prompt must not end a sequence. Found by tokenizing a probe text with and without them."""
    probe = "Hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    empty = tokenizer("", add_special_tokens=True)["input_ids"]  # the probe's tokens changed: fall back
    logger.warning("Could not tell which special tokens the tokenizer puts before a text; using what it adds to an "
                   "empty string: %s", empty)
    return list(empty)


def _render(messages: list[dict], tokenizer: Any, use_chat_template: bool) -> str:
    """The prompt text: the chat template with the generation prompt, or the contents joined by newlines."""
    if use_chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(message["content"] for message in messages)
