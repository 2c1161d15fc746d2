"""The generation backend a run config asks for (`make_backend`: transformers, vLLM or the vision-language
backend), its sampling parameters, and generating once per prompt set across processes (`generate_once`)."""

from __future__ import annotations

import logging

from ..config import RunConfig
from ..distributed import process_state
from ..errors import DistillmError
from .base import SamplingParams
from .hf import HFBackend
from .runner import generate_sharded
from .vision import VisionHFBackend
from .vllm_backend import LazyVLLMBackend, choose_backend_name
from ..models import resolve_dtype

logger = logging.getLogger("distillm")


#: the seed offsets of the held-out sampling: the teacher's responses and the student's samples; set J of
#: --eval-samples adds J * EVAL_SAMPLE_STRIDE (the rounds' student responses use 1000 * round)
TEACHER_EVAL_SEED, STUDENT_EVAL_SEED, EVAL_SAMPLE_STRIDE = 99, 7_777, 100_000


def eval_seed_offset(base: int, sample: int) -> int:
    """The seed offset of held-out sample set `sample` (0, 1, ...) from `base` (TEACHER_EVAL_SEED or
    STUDENT_EVAL_SEED)."""
    return base + EVAL_SAMPLE_STRIDE * sample


def sampling_params(config: RunConfig, *, seed_offset: int = 0, max_new_tokens: int | None = None) -> SamplingParams:
    g = config.generation
    return SamplingParams(temperature=g.temperature, top_p=g.top_p,
                          max_new_tokens=g.max_new_tokens if max_new_tokens is None else max_new_tokens,
                          seed=g.generation_seed + seed_offset)


def generate_once(*args, **kwargs) -> list[dict]:
    """`generate_responses`; in a multi-process run each process answers its share of the batches and rank 0
    writes the merged file (`generation.runner.generate_sharded`: no prompt lost or answered twice)."""
    return generate_sharded(*args, **kwargs)


def make_backend(config: RunConfig, model, tokenizer, *, model_dir: str | None, processor=None):
    """The configured backend for `model`; vLLM needs the model saved in `model_dir`. A vision-language model
    (`processor` given) generates with transformers, from each prompt's image."""
    g = config.generation
    if processor is not None:
        return VisionHFBackend(model, processor, max_batch_size=g.generation_batch_size,
                               max_batch_tokens=g.max_batch_tokens)
    name = choose_backend_name(g.backend)
    if name == "vllm" and model_dir is not None:
        if process_state().num_processes > 1 and g.vllm_tensor_parallel_size > 1:
            raise DistillmError(
                "--vllm-tensor-parallel-size > 1 inside a multi-process run is not supported: each training process "
                "starts its own vLLM engine on its own GPU (colocated, tensor parallel size 1). Generate the teacher "
                "responses first in one process with `distillm generate --backend vllm --vllm-tensor-parallel-size "
                "N`, then pass them with --teacher-responses.")
        return LazyVLLMBackend(model_dir, dtype=str(resolve_dtype(config.model.dtype)).removeprefix("torch."),
                               tensor_parallel_size=g.vllm_tensor_parallel_size,
                               gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                               trust_remote_code=config.model.trust_remote_code)
    return HFBackend(model, tokenizer, max_batch_size=g.generation_batch_size, max_batch_tokens=g.max_batch_tokens)


def release(backend) -> None:
    """Free what a backend holds (a vLLM engine keeps GPU memory until closed)."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()
