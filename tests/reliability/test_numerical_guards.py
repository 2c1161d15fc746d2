"""Numerical guards: a NaN/inf loss (hence NaN/inf gradients) is caught, its step skipped and counted; too many
in a row stop the run with a checkpoint and a message naming the batch, and the same command then resumes.
Extreme logits (huge magnitudes, -inf from vocabulary masking) give finite losses and gradients in every method."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from reliability_helpers import TINY_RUN, read_rows, run_distillm
from distillm.config import load_config
from distillm.methods import METHODS, build_method
from distillm.methods.base import LossInputs


def test_the_loss_poisoning_hook_is_the_identity_unless_asked(monkeypatch):
    from distillm.testing.faults import ENV, poison_loss

    loss = torch.tensor(1.5, requires_grad=True)
    monkeypatch.delenv(ENV, raising=False)
    assert poison_loss(loss, 3) is loss  # off: the very same tensor, no arithmetic
    monkeypatch.setenv(ENV, "nan_loss@3,inf_loss@5-6")
    assert poison_loss(loss, 2) is loss and torch.isnan(poison_loss(loss, 3))
    assert poison_loss(loss, 5).item() == poison_loss(loss, 6).item() == float("inf")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["nan_loss@3", "inf_loss@3"])
def test_a_non_finite_step_is_skipped_counted_and_the_run_finishes(fault, tmp_path, reference_run):
    out = tmp_path / "run"
    result = run_distillm([*TINY_RUN, "--output-dir", str(out)], fault=fault)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 6 and metrics["training"]["skipped_nonfinite_steps"] == 1
    log = read_rows(out / "logs" / "train_log.jsonl")
    assert [entry.get("skipped_nonfinite", 0) for entry in log] == [0, 0, 1, 0, 0, 0]  # logged at its step
    # the skipped step changed no weight: the student differs from the uninterrupted one, and is finite
    weights, reference = (load_file(str(d / "student" / "model.safetensors")) for d in (out, reference_run))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(weights[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_non_finite_steps_in_a_row_stop_with_a_checkpoint_naming_the_batch_then_resume(tmp_path):
    out = tmp_path / "run"
    command = [*TINY_RUN, "--output-dir", str(out), "--max-nonfinite-steps", "3"]
    stopped = run_distillm(command, fault="nan_loss@2-4")
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    message = stopped.stderr.strip().splitlines()[-1]
    assert "Training stopped at step 4: 3 optimizer steps in a row had a NaN/inf loss" in message
    assert "last batch: prompt ids" in message and "rerun the same command to resume" in message
    assert (out / "checkpoints" / "checkpoint-4" / "model.safetensors").is_file()
    assert not (out / "metrics.json").exists()
    # the batch it names is the batch of step 4
    named = message.split("prompt ids ")[1].split(")")[0].split(", ")
    assert len(named) == 4 and all(name.startswith("builtin") or name for name in named)

    resumed = run_distillm(command)  # the cause is gone (a transient fault): the same command finishes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["training"]["steps"] == 6


def extreme_batch(method_name: str, scale: float, seed: int = 0) -> LossInputs:
    """Logits of magnitude `scale`, the last 3 vocabulary entries masked to -inf in both models (as a padded or
    restricted vocabulary is): 2 groups of 2 sequences for the paired methods, else one group of 4."""
    g = torch.Generator().manual_seed(seed)
    rows, T, V = 4, 5, 13
    student = torch.randn(rows, T, V, generator=g) * scale
    teacher = torch.randn(rows, T, V, generator=g) * scale
    student[..., -3:] = float("-inf")
    teacher[..., -3:] = float("-inf")
    targets = torch.randint(0, V - 3, (rows, T), generator=g)
    targets[1, :2] = -100
    mask = targets != -100
    n_first = 2 if method_name in ("distillm2", "dpkd", "step_by_step") else rows  # two groups, or one
    counts = torch.tensor([n_first, mask[:n_first].sum().item(), mask[n_first:].sum().item()], dtype=torch.float64)
    return LossInputs(student.requires_grad_(), teacher, targets, n_first, counts, step=3, total_steps=10)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("scale", [1.0, 1e4, 3e38 / 1e4])
def test_extreme_and_masked_logits_give_finite_losses_and_gradients(name, scale):
    method = build_method(load_config(overrides={"method": name}))
    batch = extreme_batch(name, scale)
    loss, sums, _ = method.compute_loss(batch)
    assert torch.isfinite(loss), f"{name}: loss {loss.item()} at logit scale {scale:g}"
    loss.backward()
    grad = batch.student_logits.grad
    assert grad is not None and torch.isfinite(grad).all(), f"{name}: non-finite gradient at scale {scale:g}"
    assert all(torch.isfinite(torch.tensor(float(v))) for v in sums.values()), sums
