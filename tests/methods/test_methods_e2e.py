"""`distillm run --preset tiny --method M` completes for every method (at a reduced size), through the CLI."""

import json

import pytest
import torch

from tolerances import adam_atol, tiny_student_config
from distillm.cli import main
from distillm.config import METHOD_NAMES


@pytest.mark.slow
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_runs_end_to_end_from_the_cli(name, tmp_path, capsys):
    out = tmp_path / name
    code = main(["-q", "run", "--preset", "tiny", "--method", name, "--output-dir", str(out), "--rounds", "2",
                 "--num-prompts", "8", "--num-eval-prompts", "2", "--max-new-tokens", "8", "--save-steps", "100"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["method"] == name and metrics["training"]["method"] == name
    assert metrics["training"]["steps"] == 4  # 8 prompts / batch 4 x 2 rounds
    assert (out / "student" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 4 and all(loss == loss and abs(loss) < 1e6 for loss in losses)  # finite
    assert "Distilled student" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [("distillm", ["--v1-threshold-init", "1.0", "--v1-val-interval", "1"]),
                                         ("gkd", [])])
def test_on_policy_methods_resume_to_the_same_student(name, extra, tmp_path):
    """Drawn data (coin flips, fresh samples, the replay buffer) is a function of the step, so a run resumed from
    a mid-run checkpoint ends with the same weights as an uninterrupted one."""
    import shutil

    from safetensors.torch import load_file

    args = ["-q", "run", "--preset", "tiny", "--method", name, "--rounds", "2", "--num-prompts", "8",
            "--no-evaluate", "--max-new-tokens", "8", "--save-steps", "2", *extra]
    whole = tmp_path / "whole"
    assert main([*args, "--output-dir", str(whole)]) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for name_ in ("student", "metrics.json", "checkpoints/checkpoint-4"):
        path = resumed / name_
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main([*args, "--output-dir", str(resumed)]) == 0
    a, b = (load_file(str(d / "student" / "model.safetensors")) for d in (whole, resumed))
    assert a.keys() == b.keys()
    for key in a:
        # the same 4 AdamW steps (8 prompts / batch 4 x 2 rounds, lr 3e-3, at most 4 x 2 x 128 tokens a step),
        # resumed from checkpoint-2: tolerances.adam_atol
        atol = adam_atol(tiny_student_config(), 4 * 2 * 128, 4, 3e-3, a[key])
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [("gkd", ["--gkd-lambda", "1.0"]), ("speculative-kd", ["--skd-top-k", "1"]),
                                         ("kd", [])])
def test_train_log_counts_the_tokens_generated_while_training(name, extra, tmp_path):
    """Methods that draw fresh data log the tokens generated for it per step (student and teacher); the sum is
    what was sampled, at most batch x max_new_tokens per step. Off-policy methods generate nothing in training."""
    out = tmp_path / name
    assert main(["-q", "run", "--preset", "tiny", "--method", name, "--output-dir", str(out), "--rounds", "2",
                 "--num-prompts", "8", "--no-evaluate", "--max-new-tokens", "8", "--save-steps", "100", *extra]) == 0
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    if name == "kd":
        assert not any("generated_student_tokens" in entry for entry in log)
        return
    student = [entry["generated_student_tokens"] for entry in log]
    teacher = [entry["generated_teacher_tokens"] for entry in log]
    assert len(student) == 4 and all(0 < n <= 4 * 8 for n in student)  # every step sampled its 4 prompts
    if name == "gkd":
        assert sum(teacher) == 0
    else:  # top-1: the teacher replaces every proposal but those equal to its argmax, and never more than proposed
        assert 0 < sum(teacher) <= sum(student)
