"""The console shows one plain line per logging step (no log dicts inside tqdm bars); the logs themselves, which
become logs/train_log.jsonl, are unchanged."""

from __future__ import annotations

import io

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from distillm.training.callbacks import StepLineCallback
from test_trainer import distillm2, make_pairs, make_trainer


def test_line_format():
    logs = {"loss": 2.9134, "grad_norm": 3.25, "learning_rate": 1.2e-4, "epoch": 0.25, "skl": 1.4123,
            "srkl": 1.4871, "skew_t": 0.0912, "skew_s": 0.1, "b": 1.25, "source_fixed": 1.0,
            "generated_student_tokens": 512}
    line = StepLineCallback().format_line(logs, 12, 48, 3.14159)
    assert line == ("step 12/48  loss 2.91  skl 1.41  srkl 1.49  a_t 0.0912  a_s 0.1  b 1.25  fixed 1  "
                    "gen_student 512  lr 1.2e-04  grad 3.25  3.14 s/step")
    assert StepLineCallback().format_line({"loss": float("nan")}, 1, 2, None) == "step 1/2  loss nan"


def test_trainer_prints_one_line_per_logging_step_and_keeps_the_log(tmp_path, teacher, student, tokenizer, capsys):
    trainer = make_trainer(tmp_path, teacher, student, tokenizer, make_pairs(tokenizer, n=4), batch=2, accum=1,
                           steps=2, options=distillm2(curriculum=True, b_ramp=True))
    callbacks = trainer.callback_handler.callbacks
    assert not any(isinstance(c, (PrinterCallback, ProgressCallback)) for c in callbacks)
    lines_cb = next(c for c in callbacks if isinstance(c, StepLineCallback))
    trainer.train()
    out = capsys.readouterr().out
    assert "{'loss'" not in out and "{\"loss\"" not in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[0] for line in lines] == ["step 1/2", "step 2/2"]
    for line in lines:
        for key in ("loss ", "skl ", "srkl ", "a_t ", "a_s ", "b ", "lr ", "s/step"):
            assert key in line
    assert any(line.startswith("done: 2 steps in ") for line in out.splitlines())
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 2 and {"skl", "srkl", "skew_t", "b", "learning_rate", "epoch"} <= set(history[0])

    # between logging steps, a progress line at most every heartbeat_s seconds
    stream = io.StringIO()
    beat = StepLineCallback(stream=stream, heartbeat_s=0.0)
    state = trainer.state
    beat.on_train_begin(trainer.args, state, trainer.control)
    beat.on_step_end(trainer.args, state, trainer.control)
    assert stream.getvalue().startswith(f"step {state.global_step}/{state.max_steps}  (")
    assert lines_cb.heartbeat_s == 60.0
