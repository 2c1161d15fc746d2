"""Hostile and broken inputs through the real command line: each is a clear error (exit status 2, a message
naming the file, line and field and how to fix it) before any long work, or a counted skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillm.cli import main
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

TINY = ["run", "--preset", "tiny", "--num-prompts", "4", "--num-eval-prompts", "2", "--rounds", "1"]


def fails(capsys, argv: list[str]) -> str:
    """Run the CLI, expect the clean error exit (2, one line, no traceback), return the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars may come before it
    assert last.startswith("distillm: error: ") and "Traceback" not in err, err
    return last


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", '{"prompt": "fine"}\n{"prompt": "broken\n', [":2: invalid JSON", "one JSON object"]),
    ("bad.csv", 'id,prompt\n1,fine\n2,too,many,cells\n', [":3: row has 4 values", "Quote values"]),
    ("fields.jsonl", '{"prompt": "fine"}\n{"question": "where is the prompt?"}\n',
     [":2: no field 'prompt' or 'messages'", "fields present: question", "--prompt-field"]),
    ("types.jsonl", '{"prompt": ["not", "a", "string"]}\n', [":1: field 'prompt' must be a string"]),
    ("latin1.jsonl", '{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"),
     [":2: invalid UTF-8 (byte 0xe9", "Re-save the file as UTF-8"]),
    ("empty.jsonl", '{"prompt": ""}\n{"prompt": "   "}\n', ["no prompts found (2 empty prompts skipped)"]),
])
def test_broken_prompt_files_name_the_file_line_and_fix(tmp_path, capsys, name, content, expected):
    path = write(tmp_path / name, content)
    message = fails(capsys, [*TINY, "--prompts", str(path), "--output-dir", str(tmp_path / "run")])
    assert str(path) in message
    for part in expected:
        assert part in message


def test_empty_and_overlong_prompts_are_skipped_or_cut_and_counted(tmp_path, capsys):
    prompts = write(tmp_path / "p.jsonl", "".join(json.dumps({"id": str(i), "prompt": text}) + "\n" for i, text in
                                                enumerate(["hi", "", "x" * 5000, "  ", "what is 2+2?"])))
    out = tmp_path / "responses.jsonl"
    assert main(["generate", "--model", "tiny-random", "--prompts", str(prompts), "--output", str(out),
                 "--max-prompt-length", "64", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "3 responses" in printed and "(2 empty prompts skipped, 1 truncated)" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["0", "2", "4"]  # empty prompts skipped
    assert max(len(row["prompt_ids"]) for row in rows) == 64  # the 5000-character prompt was cut to fit


def test_lengths_beyond_the_models_context_are_refused(tmp_path, capsys):
    # the tiny models have a 1024-token context
    message = fails(capsys, [*TINY, "--max-length", "4096", "--max-prompt-length", "96",
                             "--output-dir", str(tmp_path / "a")])
    assert "max_length = 4096 tokens is longer than the teacher's context of 1024" in message
    message = fails(capsys, [*TINY, "--max-prompt-length", "1000", "--max-length", "1010", "--max-new-tokens", "100",
                             "--output-dir", str(tmp_path / "b")])
    assert "max_prompt_length + max_new_tokens = 1100" in message


def save_model(folder: Path, tokenizer) -> Path:
    build_tiny_model(tokenizer, num_layers=4, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_tokenizer_without_chat_template_is_refused_with_the_fix(tmp_path, capsys):
    model = save_model(tmp_path / "plain", build_tiny_tokenizer(chat_template=None))
    message = fails(capsys, [*TINY, "--teacher", str(model), "--output-dir", str(tmp_path / "run")])
    assert "no chat template" in message and "--no-chat-template" in message


def test_teacher_student_vocabulary_mismatch_is_refused(tmp_path, capsys):
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra_token>"])
    student = save_model(tmp_path / "student", tokenizer)
    message = fails(capsys, [*TINY, "--student", str(student), "--output-dir", str(tmp_path / "run"), "--cross-tokenizer", "off"])
    assert "vocabularies differ" in message and "the student's" in message
    assert "--student-layers" in message


@pytest.mark.parametrize("yaml_text, expected", [
    ("learnig_rate: 0.001\n", "unknown option 'learnig_rate'. Did you mean 'learning_rate'?"),
    ("training:\n  rounds: three\n", "'rounds' expects"),
    ("trainig:\n  rounds: 2\n", "Did you mean the section 'training'"),
])
def test_unknown_or_mistyped_config_keys_are_refused_with_the_closest_name(tmp_path, capsys, yaml_text, expected):
    config = write(tmp_path / "run.yaml", yaml_text)
    message = fails(capsys, [*TINY, "--config", str(config), "--output-dir", str(tmp_path / "run")])
    assert str(config) in message and expected in message


def test_a_mistyped_flag_value_names_the_option(tmp_path, capsys):
    message = fails(capsys, [*TINY, "--rounds", "two", "--output-dir", str(tmp_path / "run")])
    assert "'rounds'" in message and "two" in message


def test_an_output_directory_holding_another_run_is_refused(tmp_path, capsys):
    from distillm.config import load_config
    from distillm.pipeline import prepare_run_dir

    # a run started with 2 rounds, that has produced something
    out = tmp_path / "run"
    prepare_run_dir(load_config(preset="tiny", overrides={"output_dir": str(out), "rounds": 2, "num_prompts": 4,
                                                          "num_eval_prompts": 2}))
    (out / "data").mkdir()
    (out / "data" / "teacher_train.jsonl").write_text("")
    message = fails(capsys, [*TINY, "--output-dir", str(out)])
    assert "different config (differs in: training.rounds)" in message
    assert "--resume" in message and "--overwrite" in message
    # --resume with a clashing flag is refused too; --resume and --overwrite together are refused
    assert "started with other settings: --rounds 1 (the run has 2)" in fails(capsys, [*TINY, "--resume", "--output-dir", str(out)])
    assert "pass one of them" in fails(capsys, [*TINY, "--resume", "--overwrite", "--output-dir", str(out)])
    # a non-empty directory that is not a run is never touched, even with --overwrite
    other = tmp_path / "home"
    other.mkdir()
    write(other / "precious.txt", "keep me")
    assert "holds no distillm run" in fails(capsys, [*TINY, "--overwrite", "--output-dir", str(other)])
    assert (other / "precious.txt").read_text() == "keep me"
    assert "holds no distillm run to continue" in fails(capsys, [*TINY, "--resume", "--output-dir",
                                                                str(tmp_path / "nothing")])


def test_broken_teacher_responses_name_the_file_and_line(tmp_path, capsys):
    responses = write(tmp_path / "teacher.jsonl", '{"id": "a", "response": "fine"}\n{"id": "b"}\n')
    message = fails(capsys, ["train", "--preset", "tiny", "--num-prompts", "4", "--teacher-responses",
                             str(responses), "--output-dir", str(tmp_path / "run")])
    assert f"{responses}:2" in message and "'id' and 'response'" in message
