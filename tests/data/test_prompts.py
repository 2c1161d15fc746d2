"""Behaviour of the prompt loader (every input format, every error path) and of prompt encoding."""

from __future__ import annotations

import csv
import json
import logging
import re

import pytest

from distillm.data.builtin import builtin_prompts_path, load_builtin
from distillm.data.prompts import DataError, PromptRecord, encode_prompts, load_prompts
from distillm.testing.tiny import build_tiny_tokenizer

ROWS = [
    {"id": "q1", "prompt": "What is 2 + 2?", "response": "4"},
    {"id": "q2", "prompt": "Name three fruits, please.", "response": None},
    {"id": "q3", "prompt": "Décris un café en une phrase.", "response": "Un café est petit."},
]
EXPECTED = [
    ("q1", [{"role": "user", "content": "What is 2 + 2?"}], "4"),
    ("q2", [{"role": "user", "content": "Name three fruits, please."}], None),
    ("q3", [{"role": "user", "content": "Décris un café en une phrase."}], "Un café est petit."),
]


def summary(records: list[PromptRecord]) -> list[tuple]:
    return [(r.id, r.messages, r.response) for r in records]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------------


def make_jsonl(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", ROWS)


def make_json_list(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    return path


def make_json_data(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"version": 2, "data": ROWS}), encoding="utf-8")
    return path


def make_csv(tmp_path):
    path = tmp_path / "prompts.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "prompt", "response"])
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in ROWS)
    return path


def make_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


def make_saved_dataset(tmp_path):
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


def make_saved_dataset_dict(tmp_path):
    import datasets

    path = tmp_path / "saved_dict"
    other = [{"id": "t1", "prompt": "Held-out question?", "response": None}]
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(other), "train": datasets.Dataset.from_list(ROWS)}
    ).save_to_disk(str(path))
    return path


MAKERS = [
    make_jsonl, make_json_list, make_json_data, make_csv, make_parquet, make_saved_dataset, make_saved_dataset_dict,
]


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__.removeprefix("make_"))
def test_every_format_loads_the_same_records(tmp_path, make):
    path = make(tmp_path)
    records, report = load_prompts(path)
    assert summary(records) == EXPECTED
    assert (report.path, report.n_loaded, report.n_empty_skipped) == (str(path), 3, 0)
    assert all(r.source.startswith(str(path)) for r in records)


def test_dataset_dict_split_is_chosen_with_a_colon_suffix(tmp_path):
    path = make_saved_dataset_dict(tmp_path)
    records, _ = load_prompts(f"{path}:test")
    assert [r.id for r in records] == ["t1"]
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: test, train\)"):
        load_prompts(f"{path}:validation")


def test_split_suffix_on_a_single_dataset_is_rejected(tmp_path):
    path = make_saved_dataset(tmp_path)
    with pytest.raises(DataError, match="single Dataset"):
        load_prompts(f"{path}:train")


def test_csv_rows_report_their_file_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,prompt\n1,fine\n2,too,many\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: row has 3 values but the header has 2 columns"):
        load_prompts(path)


# ------------------------------------------------------------------------------------------------
# Record contents
# ------------------------------------------------------------------------------------------------


def test_custom_field_names(tmp_path):
    path = write_jsonl(
        tmp_path / "custom.jsonl",
        [
            {"qid": 7, "question": "Why is the sky blue?", "gold": "Scattering."},
            {"qid": "x", "chat": [{"role": "user", "content": "Hi there"}]},
        ],
    )
    records, _ = load_prompts(
        path, prompt_field="question", messages_field="chat", response_field="gold", id_field="qid"
    )
    assert summary(records) == [
        ("7", [{"role": "user", "content": "Why is the sky blue?"}], "Scattering."),
        ("x", [{"role": "user", "content": "Hi there"}], None),
    ]


def test_messages_keep_system_and_turn_a_final_assistant_reply_into_the_response(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "7"},
    ]
    records, _ = load_prompts(write_jsonl(tmp_path / "chat.jsonl", [{"id": "c", "messages": messages}]))
    assert records[0].messages == messages[:-1]
    assert records[0].response == "7"


def test_messages_must_end_with_a_user_turn(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]}]
    with pytest.raises(DataError, match=r"ends?\.jsonl:1: field 'messages' must end with a user message"):
        load_prompts(write_jsonl(tmp_path / "ends.jsonl", rows))


def test_system_prompt_is_prepended_unless_one_is_present(tmp_path):
    rows = [
        {"prompt": "Plain prompt"},
        {"messages": [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Hi"}]},
    ]
    records, _ = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), system_prompt="You are helpful.")
    assert records[0].messages == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Plain prompt"},
    ]
    assert records[1].messages[0] == {"role": "system", "content": "Own system."}
    assert len(records[1].messages) == 2


def test_empty_prompts_are_skipped_and_counted(tmp_path):
    rows = [
        {"prompt": "Keep me"},
        {"prompt": ""},
        {"prompt": "   \n\t"},
        {"messages": [{"role": "user", "content": " "}]},
        {"prompt": "Keep me too"},
    ]
    records, report = load_prompts(write_jsonl(tmp_path / "e.jsonl", rows))
    assert [r.messages[-1]["content"] for r in records] == ["Keep me", "Keep me too"]
    assert (report.n_loaded, report.n_empty_skipped) == (2, 3)


def test_missing_ids_fall_back_to_stem_and_line_number(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": "given"}\n{"prompt": "c"}\n', encoding="utf-8")
    records, _ = load_prompts(path)
    assert [r.id for r in records] == ["mine-1", "given", "mine-4"]
    assert records[2].source == f"{path}:4"


def test_duplicate_ids_are_rejected(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(DataError, match=r"dup\.jsonl:2: duplicate id 'a' \(first used at .*dup\.jsonl:1\)"):
        load_prompts(path)


def test_limit_keeps_the_first_records(tmp_path):
    records, report = load_prompts(make_jsonl(tmp_path), limit=2)
    assert [r.id for r in records] == ["q1", "q2"]
    assert report.n_loaded == 2


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": "ok again"}\n{"prompt": "oops",,}\n', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_prompts(path)
    message = str(excinfo.value)
    assert f"{path}:4:" in message
    assert "invalid JSON" in message and "Expecting" in message


def test_missing_field_names_line_field_and_fields_present(tmp_path):
    path = write_jsonl(tmp_path / "fields.jsonl", [{"prompt": "fine"}, {"question": "Why?", "answer": "Because."}])
    with pytest.raises(DataError) as excinfo:
        load_prompts(path)
    message = str(excinfo.value)
    assert f"{path}:2: no field 'prompt' or 'messages'" in message
    assert "(fields present: question, answer)" in message
    assert "--prompt-field" in message


@pytest.mark.parametrize(
    "row, pattern",
    [
        ({"prompt": 42}, r"field 'prompt' must be a string, got a number"),
        ({"messages": "hello"}, r"field 'messages' must be a list"),
        ({"messages": ["hello"]}, r"field 'messages', message 1: expected an object, got a string"),
        ({"messages": [{"role": "user"}]}, r"field 'messages', message 1: 'content' must be a string, got null"),
        ({"prompt": "hi", "response": ["no"]}, r"field 'response' must be a string, got a list"),
        ({"prompt": "hi", "id": {"a": 1}}, r"field 'id' must be a string or an integer"),
    ],
)
def test_wrong_types_name_the_field_and_line(tmp_path, row, pattern):
    path = write_jsonl(tmp_path / "types.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + pattern):
        load_prompts(path)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "fine"}\n{"prompt": "also fine"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid UTF-8")):
        load_prompts(path)


def test_non_record_json_is_rejected(tmp_path):
    path = tmp_path / "two_lists.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}), encoding="utf-8")
    with pytest.raises(DataError, match="exactly one list-valued key"):
        load_prompts(path)


def test_unknown_extension_lists_supported_formats(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl, \.json, \.csv, \.parquet"):
        load_prompts(path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match=re.escape(f"prompt file not found: {path}")):
        load_prompts(path)


def test_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        load_prompts(tmp_path)


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def records_of(*prompts: str) -> list[PromptRecord]:
    return [PromptRecord(id=f"p{i}", messages=[{"role": "user", "content": p}]) for i, p in enumerate(prompts)]


def test_chat_template_is_applied_exactly_as_the_tokenizer_renders_it(tokenizer):
    record = PromptRecord(
        id="c",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
        response="Hi.",
    )
    (encoded,), n_truncated = encode_prompts([record], tokenizer, max_prompt_length=512)
    expected = tokenizer.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)
    assert encoded.text == expected
    assert encoded.input_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert (encoded.id, encoded.response, n_truncated) == ("c", "Hi.", 0)


def test_long_prompts_are_truncated_from_the_left(tokenizer, caplog):
    records = records_of("short", "a long prompt " * 20, "another long prompt " * 20)
    full = encode_prompts(records, tokenizer, max_prompt_length=10_000)[0]
    with caplog.at_level(logging.WARNING, logger="distillm"):
        encoded, n_truncated = encode_prompts(records, tokenizer, max_prompt_length=40)
    assert n_truncated == 2
    assert encoded[0].input_ids == full[0].input_ids  # short enough: untouched
    for before, after in zip(full[1:], encoded[1:]):
        assert after.input_ids == before.input_ids[-40:]
        assert after.text == tokenizer.decode(before.input_ids[-40:])
        assert after.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 3 prompts" in warnings[0].getMessage()


def test_tokenizer_without_template_needs_no_chat_template_flag():
    plain = build_tiny_tokenizer(chat_template=None)
    record = PromptRecord(
        id="x", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    with pytest.raises(DataError, match="--no-chat-template"):
        encode_prompts([record], plain, max_prompt_length=64)
    (encoded,), _ = encode_prompts([record], plain, max_prompt_length=64, use_chat_template=False)
    assert encoded.text == "Be brief.\nHi"
    assert encoded.input_ids == plain("Be brief.\nHi", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------
# Built-in prompts
# ------------------------------------------------------------------------------------------------


def test_builtin_splits_load_with_unique_ids():
    train, train_report = load_prompts("builtin:train")
    evaluation, eval_report = load_prompts("builtin:eval")
    assert summary(load_prompts(None)[0]) == summary(load_prompts("builtin")[0]) == summary(train)
    assert 180 <= len(train) <= 220 and 30 <= len(evaluation) <= 50
    assert (train_report.path, eval_report.path) == ("builtin:train", "builtin:eval")
    ids = [r.id for r in train + evaluation]
    assert len(ids) == len(set(ids))
    train_texts = {r.messages[-1]["content"].strip().lower() for r in train}
    assert not any(r.messages[-1]["content"].strip().lower() in train_texts for r in evaluation)


def test_builtin_file_is_well_formed():
    rows = [json.loads(line) for line in builtin_prompts_path().read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(load_builtin("train")) + len(load_builtin("eval"))
    assert {row["split"] for row in rows} == {"train", "eval"}
    assert all(row["prompt"].strip() and len(row["prompt"].split()) <= 40 for row in rows)
    arithmetic = [row for row in rows if row["category"] == "arithmetic"]
    assert len(arithmetic) >= 20
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", row.get("answer", "")) for row in arithmetic)


def test_unknown_builtin_split_is_rejected():
    with pytest.raises(DataError, match="builtin:train or builtin:eval"):
        load_prompts("builtin:test")


def tokenizer_adding(single: str, token: str):
    """The tiny tokenizer (no chat template, like a base model's) made to add `token` around a text as `single`
    says, the way Gemma's and Llama's tokenizers add a <bos> ("<tok> $A") or T5's an <eos> ("$A <tok>")."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tiny_tokenizer(chat_template=None)
    tok._tokenizer.post_processor = TemplateProcessing(single=single,
                                                       special_tokens=[(token, tok.convert_tokens_to_ids(token))])
    return tok


def test_plain_text_prompts_start_with_the_bos_the_tokenizer_adds():
    tok = tokenizer_adding("<|endoftext|> $A", "<|endoftext|>")
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok("Hi")["input_ids"][0] == bos  # the tokenizer does add it: a base model expects it
    record = PromptRecord(id="x", messages=[{"role": "user", "content": "Say hi."}])
    (encoded,), n_truncated = encode_prompts([record], tok, max_prompt_length=64, use_chat_template=False)
    assert encoded.input_ids == [bos] + tok("Say hi.", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == tok("Say hi.")["input_ids"]  # exactly what the tokenizer itself makes of the text
    assert encoded.text == "<|endoftext|>Say hi." and n_truncated == 0


def test_long_plain_text_prompts_keep_the_bos_when_cut_from_the_left():
    tok = tokenizer_adding("<|endoftext|> $A", "<|endoftext|>")
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    text = "0123456789" * 5
    record = PromptRecord(id="x", messages=[{"role": "user", "content": text}])
    (encoded,), n_truncated = encode_prompts([record], tok, max_prompt_length=12, use_chat_template=False)
    body = tok(text, add_special_tokens=False)["input_ids"]
    assert n_truncated == 1
    assert encoded.input_ids == [bos] + body[-11:] and len(encoded.input_ids) == 12
    assert encoded.text == "<|endoftext|>" + text[-11:]
    with pytest.raises(DataError, match="--max-prompt-length"):  # no room for any text after the bos
        encode_prompts([record], tok, max_prompt_length=1, use_chat_template=False)


def test_plain_text_prompts_get_no_eos_a_tokenizer_appends():
    tok = tokenizer_adding("$A <|im_end|>", "<|im_end|>")
    assert tok("Hi")["input_ids"][-1] == tok.eos_token_id
    record = PromptRecord(id="x", messages=[{"role": "user", "content": "Hi"}])
    (encoded,), _ = encode_prompts([record], tok, max_prompt_length=64, use_chat_template=False)
    assert encoded.input_ids == tok("Hi", add_special_tokens=False)["input_ids"]  # a prompt must not end the text


def test_chat_templated_prompts_get_no_extra_bos():
    # the template writes its own special tokens; the tokenizer's bos would double them
    tok = tokenizer_adding("<|endoftext|> $A", "<|endoftext|>")
    tok.chat_template = build_tiny_tokenizer().chat_template
    record = PromptRecord(id="x", messages=[{"role": "user", "content": "Hi"}])
    (encoded,), _ = encode_prompts([record], tok, max_prompt_length=64)
    expected = tok.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)
    assert encoded.input_ids == tok(expected, add_special_tokens=False)["input_ids"]
