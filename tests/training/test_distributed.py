"""Multi-process runs: sharded generation, the teacher's placement per engine, the accelerate configs, and one
tiny DistiLLM-2 run with 1 process and with 2 (torchrun, gloo on CPU) that must agree."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tolerances import adam_atol, model_atol, tiny_student_config
from distillm.generation.base import SamplingParams
from distillm.generation.hf import HFBackend
from distillm.generation.runner import generate_responses, generate_sharded
from distillm.io import read_jsonl
from distillm.training import trainer as trainer_module
from distillm.training.trainer import prepare_teacher, teacher_placement

REPO = Path(__file__).resolve().parents[2]
SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7)


# ---------------------------------------------------------------------------------------------- sharded generation


def test_shards_partition_the_prompts_and_reproduce_the_one_process_rows(tmp_path, teacher, tokenizer,
                                                                          encoded_prompts):
    backend = HFBackend(teacher, tokenizer, max_batch_size=3)
    full = generate_responses(backend, encoded_prompts, tmp_path / "all.jsonl", SAMPLED, tokenizer)
    for world in (2, 3):
        shards = [generate_responses(backend, encoded_prompts, tmp_path / f"w{world}.r{rank}.jsonl", SAMPLED,
                                     tokenizer, shard=(rank, world)) for rank in range(world)]
        ids = [row["id"] for shard in shards for row in shard]
        assert sorted(ids) == sorted(p.id for p in encoded_prompts)  # every prompt once, none twice
        assert all(shards), "every rank got a share of the batches"
        by_id = {row["id"]: row for shard in shards for row in shard}
        # each batch keeps the seed it has in a one-process run: sampled responses do not depend on the world size
        assert [by_id[row["id"]] for row in full] == full


def test_generate_sharded_with_one_process_is_generate_responses(tmp_path, teacher, tokenizer, encoded_prompts):
    backend = HFBackend(teacher, tokenizer, max_batch_size=3)
    rows = generate_sharded(backend, encoded_prompts, tmp_path / "a.jsonl", SAMPLED, tokenizer)
    assert rows == generate_responses(backend, encoded_prompts, tmp_path / "b.jsonl", SAMPLED, tokenizer)


def test_shard_must_be_valid(tmp_path, teacher, tokenizer, encoded_prompts):
    from distillm.errors import DistillmError

    with pytest.raises(DistillmError, match="0 <= rank < world"):
        generate_responses(HFBackend(teacher, tokenizer), encoded_prompts, tmp_path / "x.jsonl", SAMPLED, tokenizer,
                           shard=(2, 2))


# ---------------------------------------------------------------------------------------------- teacher placement


def _accelerator(*, deepspeed=False, fsdp=False):
    return SimpleNamespace(is_deepspeed_enabled=deepspeed, is_fsdp2=False, is_fsdp_enabled=fsdp,
                           state=SimpleNamespace(fsdp_plugin=object() if fsdp else None), device=torch.device("cpu"))


@pytest.mark.parametrize("engine, expected", [("ddp", "device"), ("deepspeed", "deepspeed"), ("fsdp", "fsdp")])
def test_prepare_teacher_takes_the_engine_branch(monkeypatch, teacher, engine, expected):
    import trl.models.utils as trl_utils

    calls = []

    def fake(name):
        def prepare(model, accelerator):
            calls.append((name, model, accelerator))
            return model
        return prepare

    monkeypatch.setattr(trl_utils, "prepare_deepspeed", fake("deepspeed"))
    monkeypatch.setattr(trl_utils, "prepare_fsdp", fake("fsdp"))
    accelerator = _accelerator(deepspeed=engine == "deepspeed", fsdp=engine == "fsdp")
    assert teacher_placement(accelerator) == expected
    teacher.train()
    prepared = prepare_teacher(teacher, accelerator)
    assert prepared is teacher  # never wrapped in DDP
    assert [name for name, *_ in calls] == ([] if expected == "device" else [expected])
    assert not prepared.training and not any(p.requires_grad for p in prepared.parameters())


@pytest.mark.parametrize("env, sharded", [({}, False), ({"ACCELERATE_USE_FSDP": "true"}, True),
                                          ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False),
                                          ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True)])
def test_sharded_engine_is_read_from_accelerate_launch(monkeypatch, env, sharded):
    from distillm.pipeline import sharded_engine

    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert sharded_engine() is sharded


# ---------------------------------------------------------------------------------------------- accelerate configs


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED"),
                                        ("zero3", "DEEPSPEED")])
def test_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "configs" / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    assert config.num_processes >= 2 and config.mixed_precision == "bf16"
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the saved student is one model


# ---------------------------------------------------------------------------------------------- 1 vs 2 processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """The same tiny DistiLLM-2 run (2 on-policy rounds, sampled responses) with 1 process at batch 4 and with 2
    processes (torchrun, gloo) at batch 2 each: the same global batch, so the same data, losses and weights."""
    common = ["run", "--preset", "tiny", "--no-evaluate", "--num-prompts", "16", "--rounds", "2",
              "--generation-batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    one = subprocess.Popen([sys.executable, "-m", "distillm", "-q", *common, "--output-dir", str(tmp_path / "one"),
                            "--per-device-train-batch-size", "4"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "distillm", "-q", *common, "--output-dir", str(tmp_path / "two"),
                          "--per-device-train-batch-size", "2"], env=env, capture_output=True, text=True,
                         timeout=300)
    out_one, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out_one[-3000:]
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]

    runs = {name: tmp_path / name for name in ("one", "two")}
    for round_file in ("data/teacher_train.jsonl", "rounds/round_0/student.jsonl", "rounds/round_1/student.jsonl"):
        rows = {name: read_jsonl(run / round_file) for name, run in runs.items()}
        ids = [row["id"] for row in rows["two"]]
        assert len(ids) == len(set(ids)) == 16  # gathered: no prompt lost or duplicated
        assert rows["two"] == rows["one"], round_file  # and the very same responses
    assert not list(runs["two"].rglob("*.rank*-of-*")), "shard files are removed once merged"

    losses = {name: [entry["loss"] for entry in read_jsonl(run / "logs" / "train_log.jsonl")]
              for name, run in runs.items()}
    assert len(losses["one"]) == len(losses["two"]) == 8
    # a step's tokens: at most 4 pairs x 2 sequences x max_length 128 (the tiny preset); the gradients of 1 and 2
    # processes differ by the order of their sums only (tolerances.adam_atol, model_atol)
    config, n_tokens, lr = tiny_student_config(), 4 * 2 * 128, 3e-3
    assert losses["two"] == pytest.approx(losses["one"], rel=0, abs=model_atol(config, n_tokens, max(losses["one"])))
    metrics = json.loads((runs["two"] / "metrics.json").read_text())
    assert metrics["complete"] and metrics["training"]["steps"] == 8

    from safetensors.torch import load_file

    weights = {name: load_file(run / "student" / "model.safetensors") for name, run in runs.items()}
    assert weights["one"].keys() == weights["two"].keys()
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["two"][key], value, rtol=0, atol=adam_atol(config, n_tokens, 8, lr, value),
                                   msg=key)
    # the tolerance is far below what training moved: the untrained student differs by much more
    from distillm.models import prune_layers
    from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

    initial = prune_layers(build_tiny_model(build_tiny_tokenizer()), [0, 3]).state_dict()
    moved = max((weights["one"][key] - initial[key]).abs().max().item() for key in weights["one"])
    assert moved > 10 * max(adam_atol(config, n_tokens, 8, lr, value) for value in weights["one"].values())
