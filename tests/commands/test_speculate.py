"""`distillm speculate`: a student as the speculative-decoding draft of its teacher (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from distillm.cli import main
from distillm.models import load_model, prune_layers
from distillm.speculate import (DraftSpec, SpeculateError, assisted_generate, expected_tokens_per_call, speculate)
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer
from tolerances import sum_atol, sum_rtol

PROMPTS = ["Hi", "Name a colour.", "What is two plus two?", "Write a haiku about the sea."]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("k", [1, 4])
def test_expected_tokens_per_call_matches_enumeration(alpha, k):
    # n draft tokens accepted (then one teacher token): P(n) = alpha^n (1 - alpha) for n < k, alpha^k for n = k
    brute = sum((n + 1) * alpha ** n * (1 - alpha) for n in range(k)) + (k + 1) * alpha ** k
    # two float64 evaluations of a sum of k + 1 positive terms (the closed form sums the geometric series)
    assert expected_tokens_per_call(alpha, k) == pytest.approx(brute, rel=sum_rtol(k + 1, torch.float64), abs=0)


def test_assisted_generation_counts_and_matches_plain_greedy():
    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_model(tokenizer, num_layers=4, seed=0)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                                      add_generation_prompt=True)["input_ids"]])
    with torch.inference_mode():
        plain = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    # a perfect draft (the teacher's own weights): every proposal is accepted, k + 1 tokens per teacher call
    copy = build_tiny_model(tokenizer, num_layers=4, seed=0)
    tokens, _, calls, proposed, accepted, rejections = assisted_generate(teacher, copy, ids, tokenizer,
                                                                         max_new_tokens=12, num_assistant_tokens=3)
    assert torch.equal(tokens, plain)
    assert accepted == proposed == len(tokens) - calls and rejections == 0
    assert calls == -(-len(tokens) // 4)  # ceil: 4 new tokens per call
    # a pruned draft: same output (greedy assisted decoding is exact), fewer tokens accepted
    draft = prune_layers(teacher, [0, 3])
    tokens, _, calls, proposed, accepted, rejections = assisted_generate(teacher, draft, ids, tokenizer,
                                                                         max_new_tokens=12, num_assistant_tokens=3)
    assert torch.equal(tokens, plain)
    assert 0 <= accepted <= proposed <= 3 * calls and accepted + calls == len(tokens)
    assert 1 <= rejections <= calls  # every call that did not keep all 3 proposals (the last may propose fewer)
    assert accepted < 9


def test_speculate_reports_before_and_after_for_a_run(tmp_path, prompt_file, capsys):
    teacher, tokenizer = load_model("tiny-random")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"teacher": "tiny-random", "student": None,
                                                               "student_layers": "0,3"}}))
    _save(build_tiny_model(tokenizer, num_layers=4, seed=0), tokenizer, run / "student")  # "distilled" = the teacher
    out = tmp_path / "spec"
    argv = ["-q", "speculate", "--run", str(run), "--prompts", prompt_file, "--num-prompts", "3",
            "--max-new-tokens", "10", "--num-assistant-tokens", "4", "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| run-initial |" in printed and "| run |" in printed
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.md").is_file()
    before, after = results["drafts"]["run-initial"], results["drafts"]["run"]
    assert list(results["drafts"]) == ["run-initial", "run"]
    # the draft is the teacher: sum_v min(p, p) = 1 up to the float32 sum of V probabilities (tolerances.sum_atol)
    assert after["expected_acceptance_rate"] == pytest.approx(1.0, rel=0, abs=sum_atol(len(tokenizer), 1.0))
    assert after["top1_agreement"] == 1.0
    assert after["measured_acceptance_rate"] == after["accepted_of_proposed"] == 1.0 and after["rejections"] == 0
    assert after["identical_to_plain"] == before["identical_to_plain"] == "3/3"
    assert before["accepted_of_proposed"] <= before["measured_acceptance_rate"] < 1.0 and before["expected_acceptance_rate"] < 0.99
    assert before["tokens_per_teacher_call"] < after["tokens_per_teacher_call"] <= 5
    assert results["plain"]["new_tokens"] == after["new_tokens"] == before["new_tokens"]
    for d in (before, after):
        assert d["accepted"] + d["teacher_calls"] == d["new_tokens"]
        assert d["speedup"] > 0 and d["tokens_per_second"] > 0


def test_speculative_sampling_runs(tmp_path, prompt_file):
    tokenizer = build_tiny_tokenizer()
    draft = _save(prune_layers(build_tiny_model(tokenizer, num_layers=4, seed=0), [0, 3]), tokenizer, tmp_path / "d")
    results = speculate("tiny-random", [DraftSpec("pruned", draft)], prompts=prompt_file, num_prompts=2,
                        max_new_tokens=8, temperature=1.0, num_assistant_tokens=2)
    d = results["drafts"]["pruned"]
    assert 0.0 <= d["measured_acceptance_rate"] <= 1.0 and d["new_tokens"] > 0
    assert d["identical_to_plain"] == "n/a"


def test_draft_with_another_tokenizer_is_refused(tmp_path, prompt_file):
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    other = _save(build_tiny_model(tokenizer, num_layers=2), tokenizer, tmp_path / "other")
    with pytest.raises(SpeculateError, match="Draft 'other' .* cannot draft for the teacher .*vocabularies differ"):
        speculate("tiny-random", [DraftSpec("other", other)], prompts=prompt_file, num_prompts=1, max_new_tokens=4)


def test_speculate_argument_errors(tmp_path, capsys):
    assert main(["speculate", "--teacher", "tiny-random"]) == 2
    assert "No draft model" in capsys.readouterr().err
    assert main(["speculate", "--draft", "x=tiny-random"]) == 2
    assert "No teacher" in capsys.readouterr().err
    assert main(["speculate", "--teacher", "tiny-random", "--draft", "tiny-random"]) == 2
    assert "NAME=SPEC" in capsys.readouterr().err
    assert main(["speculate", "--run", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
