"""Batches for vision-language distillation: the text collator's sequences plus each sequence's image, batched by
the model's own image processor.

The sequences (prompt with its image tokens already expanded by the processor, then the response) are built and
left-padded exactly as for text (`training.collate.DistillCollator`), so the labels -- the loss mask -- cover the
response tokens only, never the prompt or the image tokens. `VisionCollator` adds the processor's image tensors
(`pixel_values`, and e.g. `image_sizes` for models that need them), one image per sequence, in the batch's
sequence order (`data.vision.ImageInputs`); `collate.response_logits` hands them to the teacher's and the student's forward.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data.vision import ImageInputs
from .collate import DistillCollator, pair_sequences


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
