"""Generation for vision-language models: `model.generate` with each prompt's image, through the HF backend.

The generation runner hands this backend the prompts' images (`takes_images`); the model's own image processor
turns them into `pixel_values` (and whatever else the model needs), passed to `generate` with the left-padded
prompt ids, whose image tokens the processor already expanded.
"""

from __future__ import annotations

from typing import Sequence

from ..data.vision import ImageInputs
from ..errors import DistillmError
from .base import Completion, SamplingParams
from .hf import HFBackend


class VisionHFBackend(HFBackend):
    name = "hf-vision"
    takes_images = True

    def __init__(self, model, processor, **kwargs):
        super().__init__(model, processor.tokenizer, **kwargs)
        self.image_inputs = ImageInputs(processor)

    def generate_batch(self, prompts: Sequence[list[int]], params: SamplingParams, *, seed: int,
                       images: Sequence[str | None] | None = None, **model_inputs) -> list[Completion]:
        if images is None or any(not image for image in images) or len(images) != len(prompts):
            raise DistillmError("A vision-language model generates from prompts with images: every prompt of the "
                                "batch needs its image (prompts loaded with data.vision.load_image_prompts).")
        return super().generate_batch(prompts, params, seed=seed, **self.image_inputs.generate_inputs(paths=images),
                                      **model_inputs)
