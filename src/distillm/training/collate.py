"""Batches for the distillation trainer: left-padded (prompt + response) sequences with response-only labels.

Left padding makes every sequence end in the last column, so the response tokens of the whole batch lie in the
last R columns (R = the longest response): the models only need to produce logits there (`logits_to_keep`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..losses.divergences import IGNORE_INDEX as IGNORE


class RowDataset(Dataset):
    """The training rows of a method (prompt ids plus the response ids it trains on; see methods.base).

    Items carry their index, so the trainer can hand a micro-batch's rows to the method (which may swap in fresh
    responses). `replace_rows` swaps in a new round's rows (same prompts, fresh student responses) between
    epochs; the Trainer's data loader reads rows lazily, so the next epoch sees the new ones."""

    def __init__(self, rows: Sequence[dict]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {**self.rows[index], "_index": index}

    def replace_rows(self, rows: Sequence[dict]) -> None:
        if len(rows) != len(self.rows):
            raise ValueError(f"a new round must keep the prompt count ({len(self.rows)}), got {len(rows)} rows")
        self.rows = list(rows)


def build_sequences(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], int]:
    """prompt + response, the response cut at the end to fit max_length; returns (ids, response length)."""
    room = max(max_length - len(prompt_ids), 0)
    response = list(response_ids)[:room]
    return list(prompt_ids) + response, len(response)


def pair_sequences(row: dict) -> list[tuple[list[int], list[int]]]:
    """A DPO-style pair row: prompt + chosen (teacher) response, then prompt + rejected (student) response."""
    return [(row["prompt_ids"], row["chosen_ids"]), (row["prompt_ids"], row["rejected_ids"])]


class DistillCollator:
    """Turns B rows into the sequences the models score: each row gives one sequence (group 1) or two (groups 1
    and 2) through `sequences(row)` (a method's `sequences`); the batch holds all first-group sequences, then all
    second-group ones. Adds `n_first` (the first group's size) and `row_index` (each row's dataset index, -1 for
    rows that are not from the dataset)."""

    def __init__(self, pad_token_id: int, max_length: int, sequences: Callable[[dict], list] = pair_sequences):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.sequences = sequences

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        per_row = [self.sequences(r) for r in rows]
        groups = {len(seqs) for seqs in per_row}
        if len(groups) != 1:
            raise ValueError("every row of a batch must give the same number of sequences")
        sequences = [build_sequences(*seqs[g], self.max_length) for g in range(groups.pop()) for seqs in per_row]
        batch = pad_left(sequences, self.pad_token_id)
        batch["n_first"] = torch.tensor(len(rows))
        batch["row_index"] = torch.tensor([r.get("_index", -1) for r in rows], dtype=torch.long)
        return batch


def pad_left(sequences: Sequence[tuple[list[int], int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad (ids, response length) pairs into input_ids, attention_mask, position_ids and labels."""
    width = max(len(ids) for ids, _ in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for row, (ids, response_len) in enumerate(sequences):
        start = width - len(ids)
        input_ids[row, start:] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, start:] = 1
        if response_len:
            labels[row, width - response_len:] = input_ids[row, width - response_len:]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels}


#: Image inputs a processor may add to a batch (training.vision.VisionCollator); passed on to the models' forward.
IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask", "aspect_ratio_ids",
                "aspect_ratio_mask", "image_attention_mask")


def response_logits(model, batch: dict[str, torch.Tensor], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each response token, and those tokens: ([N, R, V], [N, R]) with R the longest
    response and -100 where a row's response is shorter. Only the last R + 1 columns get logits (left padding
    puts every response there); the vocabulary is cut to the tokenizer's `vocab_size` real tokens."""
    labels = batch["labels"]
    width = max(int((labels != IGNORE).sum(-1).max().item()), 1)
    extra = {key: batch[key] for key in IMAGE_INPUTS if key in batch}  # a vision-language batch's images
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=width + 1, use_cache=False, **extra)
    return out.logits[:, :-1, :vocab_size], labels[:, -width:]
