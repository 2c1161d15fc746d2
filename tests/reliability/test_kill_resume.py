"""Kill a real `distillm run` with SIGKILL in every phase, rerun the same command, and check that nothing was
lost: the same generated data (no prompt lost or duplicated), the same optimizer steps, the same final student
(to float tolerance) and the same metrics as an uninterrupted run.

The kill is a real signal sent by the process to itself at a named point (DISTILLM_FAULT, see distillm.testing.faults),
so each test interrupts exactly the phase it names, with no timing guesswork."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tolerances import adam_atol, model_atol, tiny_student_config
from reliability_helpers import TINY_RUN, read_rows, run_distillm

pytestmark = pytest.mark.slow

# fault -> (phase, a file that must hold the interrupted work when the process dies)
FAULTS = {
    "gen:teacher_train@2": ("teacher generation", "data/teacher_train.jsonl.partial"),
    "torn:teacher_train@3": ("teacher generation, mid-line", "data/teacher_train.jsonl.partial"),
    "gen:student@8": ("student generation (round 1, after a checkpoint)", "rounds/round_1/student.jsonl.partial"),
    "train_step@5": ("training, between checkpoints", "checkpoints/checkpoint-4"),
    "checkpoint@2": ("training, checkpoint half written", "checkpoints/checkpoint-4"),
    "eval:before@1": ("evaluation before training", "eval/before_samples.jsonl"),
    "gen:after_samples@1": ("evaluation after training", "eval/after_samples.jsonl.partial"),
}


def data_files(run: Path) -> list[Path]:
    return sorted(p.relative_to(run) for p in run.rglob("*.jsonl") if "logs" not in p.parts)


def compare_with_reference(run: Path, reference: Path) -> None:
    # every generated file is whole, with each prompt exactly once and the same rows as the uninterrupted run
    assert not list(run.rglob("*.partial")), "a half-written file was left behind"
    assert data_files(run) == data_files(reference)
    for name in data_files(reference):
        rows, expected = read_rows(run / name), read_rows(reference / name)
        ids = [row["id"] for row in rows]
        assert len(ids) == len(set(ids)), f"{name}: duplicated prompts"
        assert ids == [row["id"] for row in expected], f"{name}: prompts lost or reordered"
        assert rows == expected, f"{name}: rows differ from the uninterrupted run"
    metrics, ref_metrics = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert metrics["complete"] and metrics["training"]["steps"] == ref_metrics["training"]["steps"] == 6
    # a resumed run repeats the uninterrupted one's operations (same data, seeds and order): its weights are at most
    # what reordered sums could make of 6 AdamW steps (tolerances.adam_atol; a step: 4 pairs x 2 sequences x 128
    # tokens at most, learning rate 3e-3), its held-out figures what fp32 rounding makes of 4 prompts x 8 tokens
    config = tiny_student_config()
    for tag in ("before", "after"):
        for key, value in ref_metrics[tag].items():
            if key == "seconds":
                continue
            if isinstance(value, float):
                atol = model_atol(config, 4 * 8, value)
                assert metrics[tag][key] == pytest.approx(value, rel=0, abs=atol), (tag, key)
            else:  # counts, flags, reasons, and figures that are None when undefined (no 4-word answer): equal
                assert metrics[tag][key] == value, (tag, key)
    weights, ref_weights = (load_file(str(d / "student" / "model.safetensors")) for d in (run, reference))
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        atol = adam_atol(config, 4 * 2 * 128, 6, 3e-3, ref_weights[key])
        assert torch.allclose(weights[key], ref_weights[key], rtol=0, atol=atol), key
    steps = [entry["step"] for entry in read_rows(run / "logs" / "train_log.jsonl")]
    assert steps == list(range(1, 7)), "optimizer steps lost or repeated in the log"


@pytest.mark.parametrize("fault", list(FAULTS), ids=[v[0] for v in FAULTS.values()])
def test_a_run_killed_in_any_phase_resumes_to_the_uninterrupted_result(fault, tmp_path, reference_run):
    out = tmp_path / "run"
    command = [*TINY_RUN, "--output-dir", str(out)]
    killed = run_distillm(command, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"SIGKILL at {fault}" in killed.stderr
    evidence = out / FAULTS[fault][1]
    assert evidence.exists(), "the kill did not happen in the phase under test"
    if fault.startswith("torn:"):  # the file really ends in half a line
        assert not evidence.read_bytes().endswith(b"\n")
    if fault.startswith("checkpoint"):  # weights written, the method state (written last) not
        assert (evidence / "model.safetensors").is_file() and not (evidence / "distillm_method_state.json").exists()
    assert not (out / "metrics.json").exists()

    resumed = run_distillm(command)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    compare_with_reference(out, reference_run)


def test_resume_flag_continues_a_killed_run_with_its_own_config(tmp_path, reference_run):
    out = tmp_path / "run"
    killed = run_distillm([*TINY_RUN, "--output-dir", str(out)], fault="train_step@3")
    assert killed.returncode == -signal.SIGKILL
    # only the directory is named: the settings come from the run's config.yaml
    resumed = run_distillm(["run", "--resume", "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    compare_with_reference(out, reference_run)
