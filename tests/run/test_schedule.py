"""The optimizer-step count and warm-up of a run (pipeline.step_plan / check_step_plan), checked against what
transformers' Trainer and accelerate actually do, and the checks a run makes before loading any model weights."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler
from transformers import Trainer, TrainingArguments

from distillm import pipeline
from distillm.config import load_config
from distillm.data.prompts import DataError
from distillm.errors import DistillmError
from distillm.pipeline import MIN_OPTIMIZER_STEPS, RunPaths, check_step_plan, learning_rates, step_plan, training_kwargs
from distillm.testing.tiny import build_tiny_tokenizer


def tiny_config(tmp_path, **overrides):
    return load_config(preset="tiny", overrides={"output_dir": str(tmp_path / "run"), **overrides})


class _Scalar(torch.nn.Module):
    """One weight; loss = w * x, so every batch gives a gradient and the Trainer takes real steps."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x=None, **_):
        return {"loss": (self.w * x.float()).sum()}


# (rows, batch, accumulation, rounds, warm-up ratio): short last batches and short last accumulation groups
CASES = [(10, 4, 2, 2, 0.5), (16, 4, 4, 1, 0.1), (5, 8, 4, 3, 0.0), (33, 4, 3, 2, 0.25), (7, 2, 1, 1, 0.9)]


@pytest.mark.parametrize("rows, batch, accumulation, rounds, ratio", CASES)
def test_step_plan_and_learning_rates_are_what_the_trainer_does(tmp_path, rows, batch, accumulation, rounds, ratio):
    config = tiny_config(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         rounds=rounds, warmup_ratio=ratio, learning_rate=0.1, lr_scheduler_type="cosine")
    kwargs = training_kwargs(config, RunPaths(tmp_path), num_rows=rows)
    kwargs.update(save_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False)
    trainer = Trainer(model=_Scalar(), args=TrainingArguments(**kwargs),
                      train_dataset=[{"x": torch.tensor([1.0])} for _ in range(rows)])
    trainer.train()
    plan = step_plan(config.training, rows)
    assert trainer.state.global_step == trainer.state.max_steps == plan.total
    assert plan.per_round * rounds == plan.total
    assert isinstance(kwargs["warmup_steps"], int) and kwargs["warmup_steps"] == plan.warmup
    assert plan.warmup == math.ceil(plan.total * ratio)
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    # the Trainer's scheduler and learning_rates build the same LambdaLR from the same Python floats: no arithmetic
    # differs between the two, so the rates are the same numbers
    assert logged == learning_rates(config.training, plan)


@pytest.mark.parametrize("rows, batch, processes", [(16, 4, 2), (17, 4, 2), (5, 2, 4), (100, 8, 3), (3, 4, 2)])
def test_step_plan_counts_the_micro_batches_accelerate_gives_each_process(tmp_path, rows, batch, processes):
    batches = BatchSampler(SequentialSampler(range(rows)), batch_size=batch, drop_last=False)
    lengths = {len(BatchSamplerShard(batches, num_processes=processes, process_index=i, even_batches=True))
               for i in range(processes)}
    assert len(lengths) == 1  # even batches: every process takes as many micro-batches
    (micro_batches,) = lengths
    for accumulation in (1, 2, 3):
        config = tiny_config(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             rounds=2)
        plan = step_plan(config.training, rows, processes)
        # the Trainer's count from its (sharded) dataloader's length, as in the one-process test above
        assert plan.per_round == max(math.ceil(micro_batches / accumulation), 1)
        assert plan.total == 2 * plan.per_round


def test_a_run_whose_only_step_is_warm_up_is_refused_naming_the_options(tmp_path):
    # the case: 16 prompts, batch 4, accumulation 4 -> 1 step, which the warm-up takes at learning rate 0
    config = tiny_config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=4, rounds=1,
                         warmup_ratio=0.1)
    with pytest.raises(DistillmError, match="train nothing") as err:
        check_step_plan(config, 16)
    for option in ("--num-prompts", "--per-device-train-batch-size", "--gradient-accumulation-steps", "--rounds",
                   "--warmup-ratio"):
        assert option in str(err.value)
    assert "16 training prompts" in str(err.value) and "1 optimizer step" in str(err.value)
    config.training.warmup_ratio = 0.0  # the one step now runs at the peak learning rate: allowed, with a warning
    assert check_step_plan(config, 16).total == 1
    config.training.warmup_ratio, config.training.learning_rate = 0.1, 0.0
    with pytest.raises(DistillmError, match="--learning-rate is 0"):
        check_step_plan(config, 64)


def test_warm_up_over_every_step_and_few_steps_are_warned_about(tmp_path, caplog):
    config = tiny_config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, rounds=1,
                         warmup_ratio=0.9)
    with caplog.at_level(logging.WARNING, logger="distillm"):
        plan = check_step_plan(config, 12)  # 3 steps, all warm-up (learning rates 0, 1/3, 2/3 of the peak)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert plan.total == 3 and plan.warmup == 3
    assert any("warm-up covers all 3 optimizer steps" in m for m in messages)
    assert any(m.startswith("Only 3 optimizer steps") for m in messages)
    caplog.clear()
    config.training.warmup_ratio = 0.1
    with caplog.at_level(logging.WARNING, logger="distillm"):
        plan = check_step_plan(config, 4 * MIN_OPTIMIZER_STEPS)
    assert plan.total == MIN_OPTIMIZER_STEPS and not [r for r in caplog.records if r.levelno == logging.WARNING]


def _no_weights(*args, **kwargs):
    raise AssertionError("model weights were loaded before the cheap checks")


def test_run_refuses_a_schedule_that_trains_nothing_before_loading_any_model(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.modality, "load_text_models", _no_weights)
    config = tiny_config(tmp_path, num_prompts=16, per_device_train_batch_size=4, gradient_accumulation_steps=4,
                         rounds=1, warmup_ratio=0.1)
    with pytest.raises(DistillmError, match="train nothing"):
        pipeline.run(config)


def test_run_refuses_a_tokenizer_without_chat_template_before_loading_any_model(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.modality, "load_tokenizer", lambda spec, **_: build_tiny_tokenizer(chat_template=None))
    monkeypatch.setattr(pipeline.modality, "load_text_models", _no_weights)
    with pytest.raises(DataError, match="no chat template.*--no-chat-template"):
        pipeline.run(tiny_config(tmp_path))


@pytest.mark.parametrize("method", ["kd", "distillm2"])
def test_a_runs_optimizer_steps_are_the_planned_ones(tmp_path, method):
    # 10 prompts, batch 4, accumulation 2: 3 micro-batches a round (the last one short), 2 steps a round
    config = tiny_config(tmp_path, method=method, num_prompts=10, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, rounds=2, max_new_tokens=4, evaluate=False)
    metrics = pipeline.run(config)
    plan = step_plan(config.training, 10)
    assert metrics["training"]["steps"] == plan.total == 4
