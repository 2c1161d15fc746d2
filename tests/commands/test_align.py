"""`distillm align`: DPO with TRL on a (tiny) distilled student as initialisation and frozen reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tolerances import model_atol
from distillm.align import build_trainer, load_preferences
from distillm.cli import main
from distillm.config import AlignConfig, ConfigError, load_config
from distillm.data.prompts import DataError
from distillm.evaluation.cli import run_dir_models
from distillm.pipeline import RunPaths
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

PAIRS = [
    ("Is the sky blue?", "Yes, it is.", "No idea, go away."),
    ("Name a colour.", "Blue.", "I will not."),
    ("What is two plus two?", "Four.", "Who cares."),
    ("Say hello.", "Hello!", "No."),
    ("Name a fruit.", "An apple.", "Stop asking."),
    ("Is water wet?", "Yes.", "Leave me alone."),
    ("Count to three.", "One, two, three.", "Nope."),
    ("Greet me.", "Good morning!", "Go away."),
]


@pytest.fixture
def student_dir(tmp_path):
    """A saved tiny model standing in for a distilled student."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, num_layers=2, seed=3)
    path = tmp_path / "student"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def preferences(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return path


def _config(tmp_path, student_dir, preferences, **extra):
    overrides = dict(policy=str(student_dir), preferences=str(preferences), output_dir=str(tmp_path / "align"),
                     rounds=4, learning_rate=3e-3, warmup_ratio=0.0, per_device_train_batch_size=4,
                     gradient_accumulation_steps=1, save_steps=4, max_prompt_length=64, max_length=128, dpo_beta=0.1,
                     **extra)
    return load_config(overrides=overrides, config_cls=AlignConfig)


def _response_logps(model, tokenizer, rows, key):
    """Brute force: the sum of log p(response token | prompt, previous tokens), one sequence at a time."""
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            response = tokenizer(row[key] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + response])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            token_logps = logp.gather(-1, targets[:, None])[:, 0]
            out.append(token_logps[len(prompt) - 1:].sum().item())
    return torch.tensor(out)


def _dpo_margin(policy, reference, tokenizer, rows, beta):
    """Mean implicit-reward margin beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)]."""
    chosen = _response_logps(policy, tokenizer, rows, "chosen") - _response_logps(reference, tokenizer, rows, "chosen")
    rejected = (_response_logps(policy, tokenizer, rows, "rejected")
                - _response_logps(reference, tokenizer, rows, "rejected"))
    return (beta * (chosen - rejected)).mean().item()


def test_dpo_keeps_reference_frozen_and_grows_the_margin(tmp_path, student_dir, preferences):
    config = _config(tmp_path, student_dir, preferences)
    trainer, rows = build_trainer(config, RunPaths(tmp_path / "align"))
    policy, reference = trainer.model, trainer.ref_model
    assert policy is not reference
    ref_before = {name: p.detach().clone() for name, p in reference.named_parameters()}
    policy_before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    tokenizer = trainer.processing_class
    # same init: each response log-prob is a sum of at most max_length = 128 token log-probs of size <= log V, and
    # the margin combines four of them times beta = 0.1, each fp32 rounding apart (tolerances.model_atol)
    margin_atol = 0.1 * 4 * model_atol(policy.config, 128, 128 * math.log(len(tokenizer)))
    assert _dpo_margin(policy, reference, tokenizer, rows, 0.1) == pytest.approx(0.0, abs=margin_atol)

    trainer.train()

    for name, p in reference.named_parameters():
        assert torch.equal(p, ref_before[name]), f"reference parameter {name} changed"
    assert any(not torch.equal(p, policy_before[name]) for name, p in policy.named_parameters())
    assert _dpo_margin(policy.eval(), reference, tokenizer, rows, 0.1) > 0.05
    margins = [e["rewards/margins"] for e in trainer.state.log_history if "rewards/margins" in e]
    assert len(margins) == trainer.state.global_step == 8
    assert margins[0] == pytest.approx(0.0, abs=margin_atol)  # the first step is measured before any update
    assert margins[-1] > margins[0]


def test_align_command_writes_the_run_layout_and_resumes(tmp_path, student_dir, preferences, capsys):
    out = tmp_path / "align"
    argv = ["-q", "align", "--policy", str(student_dir), "--preferences", str(preferences), "--output-dir", str(out),
            "--rounds", "2", "--learning-rate", "3e-3", "--warmup-ratio", "0", "--per-device-train-batch-size", "4",
            "--gradient-accumulation-steps", "1", "--save-steps", "2", "--max-prompt-length", "64",
            "--max-length", "128"]
    assert main(argv) == 0
    assert "rewards/margins" in capsys.readouterr().out
    for part in ("config.yaml", "metrics.json", "logs/train_log.jsonl", "student/config.json",
                 "checkpoints/checkpoint-4"):
        assert (out / part).exists(), part
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == len(PAIRS) and metrics["steps"] == 4
    assert metrics["last"]["rewards/margins"] > metrics["first"]["rewards/margins"]
    aligned = AutoModelForCausalLM.from_pretrained(out / "student")
    base = AutoModelForCausalLM.from_pretrained(student_dir)
    assert any(not torch.equal(a, b) for a, b in zip(aligned.state_dict().values(), base.state_dict().values()))
    # `distillm eval --run` takes an align run: the aligned model and its base (the policy) as the initial model
    specs, teacher = run_dir_models(str(out), True)
    assert [(s.name, s.source) for s in specs] == [("align", str(out / "student")), ("align-initial", str(student_dir))]
    assert teacher is None
    # the same command again resumes from the last checkpoint: nothing left to train, same result
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    # a different config in the same directory is refused
    assert main([*argv, "--dpo-beta", "0.5"]) == 2
    assert "different config" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Hi", "chosen": "Hello"}', "prefs.jsonl:2: no 'rejected' response"),
    ('{"prompt": "Hi", "rejected": "Go"}', "prefs.jsonl:2: no 'chosen' response"),
    ('{"prompt": "Hi", "chosen": "Hello", "rejected": 3}', "prefs.jsonl:2: field 'rejected' must be a string"),
    ('{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"', "prefs.jsonl:2: invalid JSON"),
    ('{"question": "Hi", "chosen": "Hello", "rejected": "Go"}', "prefs.jsonl:2: no field 'prompt' or 'messages'"),
])
def test_bad_preference_rows_name_file_and_line(tmp_path, student_dir, line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "Ok", "chosen": "Yes", "rejected": "No"}) + "\n" + line + "\n")
    config = _config(tmp_path, student_dir, path)
    with pytest.raises(DataError, match=message.replace("'", ".").replace("(", ".")):
        load_preferences(config, build_tiny_tokenizer())


def test_preferences_use_the_chat_template_and_custom_fields(tmp_path, student_dir):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "good": "Hello", "bad": "Go"}) + "\n")
    config = _config(tmp_path, student_dir, path, chosen_field="good", rejected_field="bad", system_prompt="Be kind.")
    rows = load_preferences(config, build_tiny_tokenizer())
    tokenizer = build_tiny_tokenizer()
    text = "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert rows == [{"id": "prefs-1", "prompt": text, "chosen": "Hello", "rejected": "Go",
                     "prompt_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}]


def test_trainer_sees_the_generation_time_prompt_ids(tmp_path, student_dir, preferences):
    trainer, rows = build_trainer(_config(tmp_path, student_dir, preferences), RunPaths(tmp_path / "align"))
    tokenizer = trainer.processing_class
    first = trainer.train_dataset[0]
    assert first["prompt_ids"] == rows[0]["prompt_ids"]
    assert tokenizer.decode(first["prompt_ids"]) == rows[0]["prompt"]
    assert first["chosen_ids"] == tokenizer(PAIRS[0][1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert first["rejected_ids"][-1] == tokenizer.eos_token_id


def test_align_needs_policy_and_preferences(tmp_path, preferences, student_dir):
    with pytest.raises(ConfigError, match="--policy"):
        main_config = load_config(overrides={"preferences": str(preferences)}, config_cls=AlignConfig)
        build_trainer(main_config, RunPaths(tmp_path / "x"))
    config = load_config(overrides={"policy": str(student_dir)}, config_cls=AlignConfig)
    with pytest.raises(ConfigError, match="--preferences"):
        load_preferences(config, build_tiny_tokenizer())
    with pytest.raises(ConfigError, match="dpo_beta"):
        load_config(overrides={"dpo_beta": 0}, config_cls=AlignConfig)
    with pytest.raises(ConfigError, match="teacher_cache is a distillation option"):
        load_config(overrides={"teacher_cache": "exact"}, config_cls=AlignConfig)
    with pytest.raises(ConfigError, match="Did you mean 'dpo_beta'"):
        load_config(overrides={"dpo_betta": 0.1}, config_cls=AlignConfig)
