"""Generation with transformers' `generate`: left-padded batches, KV cache, sampling or greedy."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models import eval_mode
from .base import Completion, SamplingParams, left_pad_prompts


class HFBackend:
    """Batched `model.generate`. Holds a reference to the live model, so a student trained in place is
    sampled with its current weights every round; the model's train/eval mode is restored afterwards."""

    name = "hf"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int | None = None,
    ):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}

    def generate_batch(self, prompts: Sequence[list[int]], params: SamplingParams, *, seed: int,
                       **model_inputs) -> list[Completion]:
        """`model_inputs`: further arguments of `generate` for the whole batch, e.g. a vision-language model's
        pixel_values and suppress_tokens (see training.vision.ImageInputs)."""
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad_prompts(prompts, self.pad_id)
        width = input_ids.shape[1]
        sampling = params.temperature > 0
        kwargs = dict(do_sample=True, temperature=float(params.temperature), top_p=float(params.top_p), top_k=0) if sampling \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        # a private RNG: sampling must not disturb the training loop's random state (dropout, data order)
        rng_devices = [device] if device.type == "cuda" else []
        with eval_mode(self.model), torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=params.max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
                use_cache=True,
                **{key: value.to(device) if torch.is_tensor(value) else value for key, value in model_inputs.items()},
                **kwargs,
            )
        completions = []
        for row in output[:, width:].tolist():
            stop = next((i for i, tok in enumerate(row) if tok in self.eos_ids), None)
            if stop is None:
                completions.append(Completion(row, "length"))
            else:
                completions.append(Completion(row[: stop + 1], "stop"))
        return completions
