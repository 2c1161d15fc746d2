"""Atomic files: a write killed half-way never leaves a half file under the real name; a torn last line left
by an older crash is detected and its row regenerated (identically), never trained on; damaged outputs of a
finished stage are redone."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tolerances import adam_atol, model_atol, tiny_student_config
from reliability_helpers import SRC, TINY_RUN, read_rows, run_distillm
from distillm.generation.base import SamplingParams
from distillm.generation.hf import HFBackend
from distillm.generation.runner import generate_responses
from distillm.io import JsonlAppender, read_jsonl

SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=3)


@pytest.mark.parametrize("writer", ["atomic_write_json(path, {'new': 'x' * 100_000})",
                                    "write_jsonl(path, [{'id': i, 'x': 'y' * 1000} for i in range(200)])"])
def test_a_write_killed_half_way_leaves_the_old_file_whole(tmp_path, writer):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": true}\n')
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(SRC)!r})
        from distillm import io
        from distillm.io import atomic_write_json, write_jsonl
        # die after the bytes are written but before they are published under the real name
        io.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        path = {str(path)!r}
        {writer}
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert json.loads(path.read_text()) == {"old": True}  # untouched: the half-written data is elsewhere
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert leftovers and all(p.name.endswith(".tmp") for p in leftovers)


def test_a_torn_last_line_in_a_finished_file_is_regenerated_not_used(tmp_path, teacher, tokenizer, encoded_prompts):
    reference = generate_responses(HFBackend(teacher, tokenizer, max_batch_size=4), encoded_prompts,
                                   tmp_path / "whole.jsonl", SAMPLED, tokenizer)
    # an older version crashed while writing the file in place: its last line is cut short
    out = tmp_path / "responses.jsonl"
    text = (tmp_path / "whole.jsonl").read_text()
    out.write_text(text[: len(text) - 25])
    with pytest.raises(Exception, match=r"responses.jsonl:10: not a valid JSON line"):
        read_jsonl(out)  # a plain read refuses it, naming the line
    assert len(JsonlAppender(out).existing_rows()) == len(encoded_prompts) - 1  # the torn row is dropped
    rows = generate_responses(HFBackend(teacher, tokenizer, max_batch_size=4), encoded_prompts, out, SAMPLED,
                              tokenizer)
    assert rows == reference  # the dropped row came back exactly as an uninterrupted run wrote it
    assert read_rows(out) == reference and not out.with_name(out.name + ".partial").exists()


def test_a_torn_line_inside_a_file_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "data.jsonl.partial"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(Exception, match=r"data.jsonl.partial:2: not a valid JSON line"):
        JsonlAppender(tmp_path / "data.jsonl").existing_rows()


@pytest.mark.slow
def test_damaged_outputs_of_a_finished_run_are_redone_to_the_same_result(tmp_path, reference_run):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    metrics = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(metrics[: len(metrics) // 2])  # torn by an older crash
    (run / "logs" / "training.json").unlink()  # the student was never marked complete: retrain from checkpoint
    (run / "student" / "model.safetensors").write_bytes(b"half a file")
    # round 1's training data torn, and the checkpoints since round 1 lost: round 1 must be trained again
    pairs = run / "rounds" / "round_1" / "pairs.jsonl"
    pairs.write_text(pairs.read_text()[:-30])
    for step in (4, 6):
        shutil.rmtree(run / "checkpoints" / f"checkpoint-{step}")
    result = run_distillm([*TINY_RUN, "--output-dir", str(run)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "damaged" in result.stderr and "Rebuilding it" in result.stderr
    new, old = (json.loads((d / "metrics.json").read_text()) for d in (run, reference_run))
    assert new["complete"] and new["training"]["steps"] == old["training"]["steps"]
    # round 1 trained again from checkpoint-2: the same operations (tolerances.adam_atol / model_atol, as in
    # test_kill_resume: 4 pairs x 2 sequences x 128 tokens a step, 6 steps at 3e-3; 4 held-out prompts x 8 tokens)
    config = tiny_student_config()
    kl_atol = model_atol(config, 4 * 8, old["after"]["kl"])
    assert new["after"]["kl"] == pytest.approx(old["after"]["kl"], rel=0, abs=kl_atol)
    assert read_rows(pairs) == read_rows(reference_run / "rounds" / "round_1" / "pairs.jsonl")
    a, b = (load_file(str(d / "student" / "model.safetensors")) for d in (run, reference_run))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=adam_atol(config, 4 * 2 * 128, 6, 3e-3, b[k])) for k in b)
