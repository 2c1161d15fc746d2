"""Clear errors instead of tracebacks for hostile input files (issue 16, item 6): GGUF files that are empty,
random or truncated; JSON nested 100,000 deep in every kind of input file; teacher responses whose token ids
lie outside the tokenizer's vocabulary. Each error names the file (and line, and field) and says how to fix it."""

import json
import os

import pytest

from distillm.cli import main
from distillm.config import AlignConfig, load_config
from distillm.data.prompts import DataError, load_prompts
from distillm.errors import DistillmError
from distillm.io import iter_json_objects, read_jsonl
from distillm.models import ModelLoadError, _smollm2_gguf, check_gguf_file, gguf_to_safetensors, resolve_model_source
from distillm.pipeline import import_teacher_responses

DEEP = 100_000


def _run_main(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ GGUF


@pytest.fixture(scope="module")
def smollm2_bytes():
    return _smollm2_gguf().read_bytes()


def _bad_gguf(kind: str, directory, smollm2: bytes):
    path = directory / f"{kind}.gguf"
    path.write_bytes({"empty": b"", "random": os.urandom(4096), "magic-then-random": b"GGUF" + os.urandom(4092),
                      "header-cut": smollm2[:4000], "data-cut": smollm2[:2_000_000]}[kind])
    return path


KINDS = {"empty": "is empty (0 bytes)", "random": "is not a GGUF file: it does not start with the bytes 'GGUF'",
         "magic-then-random": "is a damaged or truncated GGUF file (4096 bytes): its header cannot be read",
         "header-cut": "is a damaged or truncated GGUF file (4000 bytes): its header cannot be read",
         "data-cut": "is a truncated GGUF file: 2000000 bytes, but its tensors need 98362432"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_gguf_files_are_refused_when_resolved(tmp_path, smollm2_bytes, kind):
    path = _bad_gguf(kind, tmp_path, smollm2_bytes)
    with pytest.raises(ModelLoadError, match="(?s)" + KINDS[kind].replace("(", r"\(").replace(")", r"\)")):
        resolve_model_source(str(path))
    assert len(smollm2_bytes) == 98362432  # the byte count in KINDS["data-cut"]


def test_a_whole_gguf_file_passes_the_check():
    check_gguf_file(_smollm2_gguf())  # the header walk agrees with the file's real size, to the byte


@pytest.mark.parametrize("flag", ["--teacher", "--student", "--model"])
@pytest.mark.parametrize("kind", ["empty", "random", "data-cut"])
def test_bad_gguf_on_the_command_line_is_an_error_not_a_traceback(tmp_path, capsys, smollm2_bytes, flag, kind):
    path = _bad_gguf(kind, tmp_path, smollm2_bytes)
    if flag == "--model":
        args = ["generate", "--model", str(path), "--output", str(tmp_path / "r.jsonl")]
    else:
        args = ["train", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), flag, str(path)]
    code, err = _run_main(capsys, *args)
    assert code == 2 and err.startswith("distillm: error: ") and str(path) in err and KINDS[kind] in err


def test_gguf_reader_errors_become_model_load_errors(tmp_path, monkeypatch):
    import struct

    import distillm.models

    def broken(*args, **kwargs):
        raise struct.error("unpack_from requires a buffer of at least 4009 bytes")

    monkeypatch.setattr(distillm.models.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(ModelLoadError, match=r"Cannot load the GGUF file .*SmolLM2.*: error: unpack_from.*again"):
        gguf_to_safetensors(_smollm2_gguf(), cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------- deep JSON nesting


def _deep(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("name,text,where", [
    ("p.jsonl", '{"prompt": "fine"}\n{"prompt": ' + _deep() + "}\n", "p.jsonl:2"),
    ("p.json", '[{"prompt": ' + _deep() + "}]", "p.json"),
    ("p.jsonl", '{"prompt": "x", "messages": "' + _deep() + '"}\n', "p.jsonl:1: field 'messages'"),
    ("p.csv", 'prompt,messages\nhi,"' + _deep(60_000) + '"\n', "p.csv:2: field 'messages'"),
])
def test_deeply_nested_prompt_files_are_refused(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=f"{where}: the JSON is nested too deeply"):
        load_prompts(path)


def test_a_csv_cell_over_the_csv_field_limit_is_named(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt\nhi\n"' + "x" * 200_000 + '"\n')
    with pytest.raises(DataError, match=r"p.csv:3: unreadable CSV \(field larger than field limit.*\.jsonl"):
        load_prompts(path)


def test_deeply_nested_preference_file_is_refused(tmp_path):
    from distillm.align import load_preferences
    from distillm.testing.tiny import build_tiny_tokenizer

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "Hi", "chosen": "a", "rejected": "b"}\n{"prompt": "Hi", "chosen": ' + _deep() + "}\n")
    config = load_config(overrides={"policy": "tiny-random", "preferences": str(prefs)}, config_cls=AlignConfig)
    with pytest.raises(DataError, match="prefs.jsonl:2: the JSON is nested too deeply"):
        load_preferences(config, build_tiny_tokenizer())


@pytest.mark.parametrize("reader", [read_jsonl, lambda path: list(iter_json_objects(path))])
def test_deeply_nested_jsonl_lines_are_refused_by_the_shared_readers(tmp_path, reader):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n{"id": ' + _deep() + "}\n")
    with pytest.raises(DistillmError, match="rows.jsonl:2: the JSON is nested too deeply"):
        reader(path)


def test_iter_json_objects_names_the_line_of_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": "caf\xe9"}\n')
    with pytest.raises(DistillmError, match="rows.jsonl:2: not a valid JSON line"):
        list(iter_json_objects(path))


# ------------------------------------------------------------------------------------------- teacher responses


def _responses(tmp_path, encoded_prompts, bad_line: str | None, bad_at: int = 3):
    path = tmp_path / "teacher.jsonl"
    lines = [json.dumps({"id": p.id, "response": "ok", "response_ids": [5, 6, 7]}) for p in encoded_prompts]
    if bad_line is not None:
        lines[bad_at - 1] = bad_line
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("row,message", [
    ({"response_ids": [5, -1, 7]}, "field 'response_ids' holds the token id -1, outside the tokenizer's vocabulary"),
    ({"response_ids": [5, "VOCAB", 7]}, "field 'response_ids' holds the token id VOCAB, outside"),
    ({"response_ids": [5, 10**30]}, "field 'response_ids' holds the token id 1000000000000000000000000000000"),
    ({"response_ids": [5, 6.0]}, "field 'response_ids' must be a list of integer token ids"),
    ({"response_ids": [5, True]}, "field 'response_ids' must be a list of integer token ids"),
    ({"response_ids": "5 6"}, "field 'response_ids' must be a list of integer token ids"),
    ({"response": ["not", "text"]}, "field 'response' must be a string"),
    ({"id": {"a": 1}}, "field 'id' must be a string or an integer"),
])
def test_bad_teacher_response_rows_name_file_line_and_field(tmp_path, tokenizer, encoded_prompts, row, message):
    vocab = len(tokenizer)
    row = {"id": encoded_prompts[2].id, "response": "ok", **row}
    row = {k: ([vocab if i == "VOCAB" else i for i in v] if k == "response_ids" and isinstance(v, list) else v)
           for k, v in row.items()}
    path = _responses(tmp_path, encoded_prompts, json.dumps(row))
    message = message.replace("VOCAB", str(vocab))
    with pytest.raises(DistillmError, match=rf"teacher.jsonl:3: {message}"):
        import_teacher_responses(str(path), encoded_prompts, tokenizer, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_teacher_response_errors_name_the_file_line_not_the_row_number(tmp_path, tokenizer, encoded_prompts):
    path = tmp_path / "teacher.jsonl"
    good = [json.dumps({"id": p.id, "response": "ok"}) for p in encoded_prompts]
    path.write_text(good[0] + "\n\n\n" + json.dumps({"id": "x", "response": "ok", "response_ids": [-3]}) + "\n")
    with pytest.raises(DistillmError, match="teacher.jsonl:4: field 'response_ids' holds the token id -3"):
        import_teacher_responses(str(path), encoded_prompts, tokenizer, tmp_path / "out.jsonl")


def test_valid_teacher_responses_at_the_vocabulary_edges_are_imported(tmp_path, tokenizer, encoded_prompts):
    path = tmp_path / "teacher.jsonl"
    rows = [{"id": p.id, "response": "ok", "response_ids": [0, len(tokenizer) - 1]} for p in encoded_prompts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_teacher_responses(str(path), encoded_prompts, tokenizer, tmp_path / "out.jsonl")
    assert [r["response_ids"] for r in read_jsonl(tmp_path / "out.jsonl")] == [[0, len(tokenizer) - 1]] * len(rows)


def test_deeply_nested_teacher_responses_are_refused(tmp_path, tokenizer, encoded_prompts):
    path = _responses(tmp_path, encoded_prompts, '{"id": "p02", "response": ' + _deep() + "}")
    with pytest.raises(DistillmError, match="teacher.jsonl:3: the JSON is nested too deeply"):
        import_teacher_responses(str(path), encoded_prompts, tokenizer, tmp_path / "out.jsonl")


def test_teacher_responses_with_bad_token_ids_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps({"id": f"builtin-train-{i}", "response": "ok", "response_ids": [1, -5]}) + "\n"
                            for i in range(1, 5)))
    code, err = _run_main(capsys, "train", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), "--num-prompts",
                          "4", "--teacher-responses", str(path))
    assert code == 2 and f"{path}:1: field 'response_ids' holds the token id -5" in err
