"""`distillm run --student-quant` end to end on the tiny preset: every method, QAT + LoRA, the teacher cache, and a
run killed mid-training that resumes to the same final weights as an uninterrupted one."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillm.cli import main
from distillm.config import METHOD_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from reliability_helpers import TINY_RUN, run_distillm  # noqa: E402

pytestmark = pytest.mark.slow

SMALL = ["--rounds", "2", "--num-prompts", "8", "--num-eval-prompts", "2", "--max-new-tokens", "8",
         "--save-steps", "100"]


def assert_on_grid(student_dir: Path, bits: int, group: int = 32) -> None:
    """student/ holds the quantized weights as plain floats: each group of 32 inputs of every quantized linear takes
    at most 2^bits values (a float student would have 32 distinct values)."""
    weights = load_file(str(student_dir / "model.safetensors"))
    linears = [k for k in weights if k.endswith("proj.weight")]
    assert linears, sorted(weights)
    for key in linears:
        groups = weights[key].reshape(-1, group)
        for row in groups[:64]:
            assert len(row.unique()) <= 2 ** bits, key
    assert not any(".lora_" in k for k in weights)
    embeddings = [k for k in weights if "embed_tokens" in k]
    assert embeddings and len(weights[embeddings[0]][0].unique()) > 2 ** bits  # the embedding stays float


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_trains_a_quantized_student(name, tmp_path, capsys):
    out = tmp_path / name
    code = main(["-q", "run", "--preset", "tiny", "--method", name, "--output-dir", str(out), *SMALL,
                 "--student-quant", "int4"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["training"]["steps"] == 4
    assert metrics["student"] == "the teacher, int4 fake-quantized in groups of 32"  # not the layer-pruning default
    export = metrics["training"]["export"]
    assert export["quant"] == "int4" and export["quantized_linears"] == 7 * 4  # every layer of the 4-layer teacher
    assert_on_grid(out / "student", 4)
    for tag in ("before", "after"):
        assert all(v == v for v in metrics[tag].values())  # finite figures for the start and the result
    assert "Distilled student" in capsys.readouterr().out


def test_qat_with_lora_saves_the_adapter_and_the_merged_quantized_student(tmp_path):
    out = tmp_path / "lora"
    assert main(["-q", "run", "--preset", "tiny", "--method", "kd", "--output-dir", str(out), *SMALL,
                 "--student-quant", "int3", "--lora", "--lora-r", "4", "--learning-rate", "1e-2"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert_on_grid(out / "student", 3)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(bool(t.abs().sum() > 0) for k, t in adapter.items() if "lora_B" in k)  # the adapters trained


def test_qat_with_the_teacher_cache(tmp_path):
    out = tmp_path / "cache"
    assert main(["-q", "run", "--preset", "tiny", "--method", "distillm2", "--output-dir", str(out), *SMALL,
                 "--student-quant", "int4", "--teacher-cache", "exact"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["teacher_cache"]["cached_sequences"] > 0
    assert_on_grid(out / "student", 4)


def test_a_qat_run_killed_mid_training_resumes_to_the_same_final_weights(tmp_path):
    command = [*TINY_RUN, "--student-quant", "int3", "--no-evaluate"]
    whole = run_distillm([*command, "--output-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    killed = run_distillm([*command, "--output-dir", str(out)], fault="train_step@5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-4").is_dir() and not (out / "student").exists()
    resumed = run_distillm([*command, "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (load_file(str(d / "student" / "model.safetensors")) for d in (tmp_path / "whole", out))
    assert a.keys() == b.keys()
    for key in a:  # the same latent weights after the same steps, hence the same grid values
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    steps = [json.loads(line)["step"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_the_gguf_of_a_quantized_run_holds_its_student_exactly(tmp_path):
    gguf = pytest.importorskip("distillm.export.gguf")
    out = tmp_path / "gguf"
    assert main(["-q", "run", "--preset", "tiny", "--method", "kd", "--output-dir", str(out), *SMALL,
                 "--student-quant", "int3", "--no-evaluate"]) == 0
    export = json.loads((out / "metrics.json").read_text())["training"]["export"]
    assert export["gguf"] == str(out / "student" / "student.gguf") and export["gguf_bytes"] > 0
    weights = load_file(str(out / "student" / "model.safetensors"))
    read_back = gguf.read_gguf_weights(export["gguf"])
    linears = [k for k in weights if k.endswith("proj.weight")]
    assert len(linears) == 28
    for key in linears:  # the trained grid values, bit for bit
        assert torch.equal(read_back[key], weights[key]), key
    from distillm.models import load_model

    teacher = load_model("tiny-random", dtype="float32")[0]  # the tiny preset's teacher
    embedding = teacher.get_input_embeddings().weight.detach()
    assert torch.equal(weights["model.embed_tokens.weight"], embedding)  # frozen: still the teacher's
    assert torch.equal(read_back["model.embed_tokens.weight"], embedding)


def test_a_quantized_student_trains_alike_in_two_processes(tmp_path):
    """DDP (torchrun, gloo) with --student-quant: each process fake-quantizes its replica, the gradients are
    averaged as usual; the same global batch gives the same losses as one process, and the saved student is on
    the grid."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = ["-m", "distillm", "-q", "run", "--preset", "tiny", "--no-evaluate", "--num-prompts", "8",
              "--rounds", "1", "--generation-batch-size", "4", "--max-new-tokens", "8", "--student-quant", "int4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    one = subprocess.run([sys.executable, *common, "--output-dir", str(tmp_path / "one"),
                          "--per-device-train-batch-size", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), *common, "--output-dir", str(tmp_path / "two"),
                          "--per-device-train-batch-size", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "logs" / "train_log.jsonl")
                     .read_text().splitlines()] for name in ("one", "two")}
    assert len(losses["one"]) == 2 and losses["two"] == pytest.approx(losses["one"], rel=1e-4, abs=1e-5)
    assert_on_grid(tmp_path / "two" / "student", 4)
