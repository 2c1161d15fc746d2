"""Base models (a tokenizer with no chat template that adds a <bos>, as Gemma's): `eval` and `speculate` take
--no-chat-template, or the setting of the --run they measure, and refuse chat formatting before loading weights."""

from __future__ import annotations

import json

import pytest
import yaml
from tokenizers.processors import TemplateProcessing

from distillm.cli import main
from distillm.models import load_model, load_tokenizer
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

PROMPTS = ["Hi", "Name a colour.", "What is two plus two?"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


@pytest.fixture
def base_model(tmp_path):
    """A saved tiny base model: its tokenizer has no chat template and puts <|endoftext|> (its bos) first."""
    tokenizer = build_tiny_tokenizer(chat_template=None)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", bos)])
    path = tmp_path / "base"
    build_tiny_model(tokenizer, num_layers=4, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), bos


def _run_dir(tmp_path, base: str, chat_template: bool):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"teacher": base, "student": None, "student_layers": "0,3"},
        "data": {"chat_template": chat_template}}))
    model, tokenizer = load_model(base)
    model.save_pretrained(run / "student")
    tokenizer.save_pretrained(run / "student")
    return str(run)


def _no_weights(*args, **kwargs):
    raise AssertionError("model weights were loaded before the tokenizer was checked")


def test_load_tokenizer_is_load_models_tokenizer_without_the_weights(base_model, monkeypatch):
    path, bos = base_model
    _, from_model = load_model(path)
    monkeypatch.setattr("distillm.models.AutoModelForCausalLM.from_pretrained", _no_weights)
    tokenizer = load_tokenizer(path)
    assert tokenizer.get_vocab() == from_model.get_vocab() and tokenizer.chat_template is None
    assert tokenizer("Hi")["input_ids"][0] == bos  # its bos survives saving and loading
    assert (tokenizer.padding_side, tokenizer.pad_token_id) == ("left", from_model.pad_token_id)


def test_eval_refuses_chat_formatting_for_a_base_model_before_loading_it(tmp_path, base_model, prompt_file,
                                                                         monkeypatch, capsys):
    path, _ = base_model
    monkeypatch.setattr("distillm.evaluation.suite.load_model", _no_weights)
    argv = ["-q", "eval", "--teacher", path, "--tasks", "rouge", "--prompts", prompt_file, "--num-prompts", "2",
            "--max-new-tokens", "3", "--output-dir", str(tmp_path / "eval")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "--no-chat-template" in err and path in err


def test_eval_no_chat_template_feeds_plain_text_with_the_bos(tmp_path, base_model, prompt_file):
    path, bos = base_model
    out = tmp_path / "eval"
    argv = ["-q", "eval", "--teacher", path, "--tasks", "rouge", "--prompts", prompt_file, "--num-prompts", "2",
            "--max-new-tokens", "3", "--output-dir", str(out), "--no-chat-template"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "generations" / "teacher" / "responses.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["<|endoftext|>" + p for p in PROMPTS[:2]]
    assert all(row["prompt_ids"][0] == bos for row in rows)
    assert json.loads((out / "results.json").read_text())["settings"]["chat_template"] is False


def test_eval_of_a_run_takes_its_chat_template_setting(tmp_path, base_model, prompt_file):
    path, _ = base_model
    run = _run_dir(tmp_path, path, chat_template=False)
    out = tmp_path / "eval"
    argv = ["-q", "eval", "--run", run, "--tasks", "divergence", "--prompts", prompt_file, "--num-prompts", "2",
            "--max-new-tokens", "3", "--output-dir", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["chat_template"] is False and list(results["models"]) == ["teacher", "run",
                                                                                         "run-initial"]


def test_speculate_takes_no_chat_template_and_the_runs_setting(tmp_path, base_model, prompt_file, monkeypatch,
                                                               capsys):
    path, _ = base_model
    common = ["--prompts", prompt_file, "--num-prompts", "2", "--max-new-tokens", "4", "--num-assistant-tokens", "2"]
    with monkeypatch.context() as patch:
        patch.setattr("distillm.models.load_model", _no_weights)
        assert main(["-q", "speculate", "--teacher", path, "--draft", f"d={path}", *common,
                     "--output-dir", str(tmp_path / "a")]) == 2
        assert "--no-chat-template" in capsys.readouterr().err
    assert main(["-q", "speculate", "--teacher", path, "--draft", f"d={path}", "--no-chat-template", *common,
                 "--output-dir", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["chat_template"] is False
    run = _run_dir(tmp_path, path, chat_template=False)
    assert main(["-q", "speculate", "--run", run, *common, "--output-dir", str(tmp_path / "c")]) == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["chat_template"] is False and list(results["drafts"]) == ["run-initial", "run"]


def test_generate_refuses_chat_formatting_for_a_base_model_before_loading_it(tmp_path, base_model, prompt_file,
                                                                             monkeypatch, capsys):
    path, bos = base_model
    argv = ["-q", "generate", "--model", path, "--prompts", prompt_file, "--num-prompts", "2", "--max-new-tokens",
            "3", "--output", str(tmp_path / "out.jsonl")]
    with monkeypatch.context() as patch:
        patch.setattr("distillm.models.load_model", _no_weights)
        assert main(argv) == 2
        assert "--no-chat-template" in capsys.readouterr().err
    assert main([*argv, "--no-chat-template"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["prompt_ids"][0] for row in rows] == [bos, bos]
