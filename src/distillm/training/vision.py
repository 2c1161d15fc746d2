"""Batches for vision-language distillation: the text collator's sequences plus each sequence's image, batched by
the model's own image processor.

The sequences (prompt with its image tokens already expanded by the processor, then the response) are built and
left-padded exactly as for text (`training.collate.DistillCollator`), so the labels -- the loss mask -- cover the
response tokens only, never the prompt or the image tokens. `VisionCollator` adds the processor's image tensors
(`pixel_values`, and e.g. `image_sizes` for models that need them), one image per sequence, in the batch's
sequence order; `collate.response_logits` hands them to the teacher's and the student's forward.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ..data.vision import open_image
from ..errors import DistillmError
from .collate import DistillCollator, pair_sequences


class ImageInputs:
    """Image tensors for rows or image paths, made by the processor's image processor.

    A row's image is its `image` field (rows written by the generation runner carry it) or else the image of the
    prompt with the row's id in `images_by_id`."""

    def __init__(self, processor: Any, images_by_id: Mapping[str, str] | None = None):
        self.processor = processor
        self.images_by_id = dict(images_by_id or {})

    def from_paths(self, paths: Sequence[str]) -> dict[str, torch.Tensor]:
        images = [open_image(path) for path in paths]
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}

    def image_of(self, row: Mapping) -> str:
        path = row.get("image") or self.images_by_id.get(str(row.get("id")))
        if not path:
            raise DistillmError(f"Row {row.get('id')!r} has no image: a vision-language batch needs the image of every "
                                "prompt (rows from another prompt file?).")
        return path

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        return self.from_paths([self.image_of(row) for row in rows])

    @property
    def image_token_id(self) -> int:
        from ..data.vision import image_placeholder

        return self.processor.tokenizer.convert_tokens_to_ids(image_placeholder(self.processor))

    def generate_inputs(self, *, rows: Sequence[Mapping] | None = None,
                        paths: Sequence[str] | None = None) -> dict:
        """Arguments of `generate` for a batch: the image tensors, and the image token suppressed -- a sampled
        image token in a response would be one more image placeholder than there are images."""
        inputs = self.from_paths(paths) if paths is not None else self(rows)
        return {**inputs, "suppress_tokens": [self.image_token_id]}


class VisionCollator(DistillCollator):
    """`DistillCollator` plus the image tensors of every sequence (a row's sequences all show the row's image)."""

    def __init__(self, pad_token_id: int, max_length: int, image_inputs: ImageInputs,
                 sequences: Callable[[dict], list] = pair_sequences):
        super().__init__(pad_token_id, max_length, sequences)
        self.image_inputs = image_inputs

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        groups = batch["input_ids"].shape[0] // max(len(rows), 1)
        # sequences are ordered group by group: all rows' first sequences, then all rows' second ones
        batch.update(self.image_inputs(list(rows) * groups))
        return batch
