"""Generation with vLLM, used automatically when vLLM is installed and a GPU is present.

vLLM loads weights from a directory, so an on-policy round saves the current student
(`save_pretrained`) and this backend is rebuilt on that directory: simple, and exact with respect to the weights.
Sampling parameters map one to one (temperature, top_p, max_new_tokens -> max_tokens); each prompt gets its own
seed (batch seed + index), so outputs do not depend on how vLLM schedules its batches.
"""

from __future__ import annotations

import gc
import importlib.util
from typing import Sequence

import torch

from ..errors import DistillmError
from .base import Completion, SamplingParams


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    name = "vllm"
    max_batch_tokens = None

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.4,
        max_batch_size: int = 4096,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        **engine_kwargs,
    ):
        from vllm import LLM  # optional: vLLM (the vllm extra)

        self.max_batch_size = max_batch_size
        options = dict(model=model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
                       enable_prefix_caching=True, **engine_kwargs)
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        try:
            self.llm = LLM(**options)
        except Exception as err:  # vLLM raises many types; name the directory and the settings
            raise DistillmError(
                f"vLLM could not start on {model_path} (tensor_parallel_size={tensor_parallel_size}, "
                f"gpu_memory_utilization={gpu_memory_utilization}, dtype={dtype}): {type(err).__name__}: {err}. "
                "Lower --vllm-gpu-memory-utilization if another model holds GPU memory, or use --backend hf."
            ) from err

    def generate_batch(self, prompts: Sequence[list[int]], params: SamplingParams, *, seed: int) -> list[Completion]:
        from vllm import SamplingParams as VLLMSampling  # optional: vLLM (the vllm extra)

        requests = [{"prompt_token_ids": list(ids)} for ids in prompts]
        sampling = [
            VLLMSampling(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p if params.temperature > 0 else 1.0,
                max_tokens=params.max_new_tokens,
                seed=seed + i,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        completions = []
        for out in outputs:
            choice = out.outputs[0]
            ids = list(choice.token_ids)
            completions.append(Completion(ids, "stop" if choice.finish_reason == "stop" else "length"))
        return completions

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:  # vLLM's V1 engine runs in its own process: stop it now, not at exit
            shutdown()
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class LazyVLLMBackend:
    """Starts the vLLM engine on the first batch, so a generation step whose output file is already complete
    (a resumed run) never pays for an engine."""

    name = "vllm"
    max_batch_tokens = None

    def __init__(self, model_path: str, **kwargs):
        self.model_path, self.kwargs = model_path, kwargs
        self.max_batch_size = kwargs.get("max_batch_size", 4096)
        self._engine: VLLMBackend | None = None

    def generate_batch(self, prompts: Sequence[list[int]], params: SamplingParams, *, seed: int) -> list[Completion]:
        if self._engine is None:
            self._engine = VLLMBackend(self.model_path, **self.kwargs)
        return self._engine.generate_batch(prompts, params, seed=seed)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def choose_backend_name(requested: str) -> str:
    """'auto' picks vLLM when it is installed and a GPU is present, else transformers' generate."""
    if requested not in ("auto", "hf", "vllm"):
        raise DistillmError(f"Unknown generation backend '{requested}': use auto, hf or vllm.")
    if requested == "auto":
        return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if requested == "vllm" and not vllm_available():
        raise DistillmError("generation backend 'vllm' requested but vLLM is not installed: pip install 'distillm[vllm]'")
    return requested
