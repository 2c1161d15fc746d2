"""Drive a backend over a prompt set: length-sorted batches, a progress bar, resumable crash-safe JSONL output.

Batches are fixed by the prompt set alone (sorted by length, longest first, then cut by count and token
budget) and each batch has its own seed, so a rerun after a crash regenerates the missing batches exactly as an
uninterrupted run would have, and skips the prompts already written.

In a multi-process run (`accelerate launch`, `torchrun`) `generate_sharded` splits the planned batches over the
processes (batch k goes to rank k mod world size, with the seed it would have in a one-process run, so the
responses do not depend on the number of processes), gathers every rank's rows, checks that each prompt was
answered exactly once, and has rank 0 write the one output file atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.prompts import EncodedPrompt
from ..errors import DistillmError
from ..testing.faults import fault_point
from ..io import JsonlAppender, read_jsonl, write_jsonl
from .base import GenerationBackend, SamplingParams
from ..distributed import process_state

logger = logging.getLogger("distillm")


def plan_batches(
    lengths: Sequence[int], *, max_batch_size: int, max_batch_tokens: int | None, max_new_tokens: int
) -> list[list[int]]:
    """Indices grouped into batches: longest prompts first (an out-of-memory shows up at once, not at the end),
    each batch at most `max_batch_size` prompts and `max_batch_tokens` padded tokens including new ones."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        if batches:
            batch = batches[-1]
            width = lengths[batch[0]] + max_new_tokens  # the first prompt of a batch is its longest
            fits_tokens = max_batch_tokens is None or (len(batch) + 1) * width <= max_batch_tokens
            if len(batch) < max_batch_size and fits_tokens:
                batch.append(index)
                continue
        batches.append([index])
    return batches


def generate_responses(
    backend: GenerationBackend,
    prompts: Sequence[EncodedPrompt],
    out_path: str | Path,
    params: SamplingParams,
    tokenizer: PreTrainedTokenizerBase,
    *,
    desc: str = "generating",
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> list[dict]:
    """Generate one response per prompt into `out_path` (JSONL) and return the rows in prompt order.

    Row fields: id, prompt (text after the chat template), response (decoded, special tokens removed),
    prompt_ids, response_ids (exactly the sampled tokens, end-of-sequence included), finish_reason.
    An existing complete file is reused as is; a partial one is continued.

    `shard=(rank, world)` answers only the planned batches k with k % world == rank (into `out_path`, which then
    holds that shard's rows); `generate_sharded` runs this on every process and merges the shards.
    """
    all_ids = [p.id for p in prompts]
    if len(set(all_ids)) != len(all_ids):
        raise DistillmError(f"Prompt ids must be unique to resume generation into {out_path}.")
    rank, world = shard
    if not 0 <= rank < world:
        raise DistillmError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}.")
    batches = plan_batches(
        [len(p.input_ids) for p in prompts],
        max_batch_size=backend.max_batch_size,
        max_batch_tokens=backend.max_batch_tokens,
        max_new_tokens=params.max_new_tokens,
    )
    mine = {index for k, batch in enumerate(batches) if k % world == rank for index in batch}
    ids = [p.id for i, p in enumerate(prompts) if i in mine]
    writer = JsonlAppender(out_path)
    done = {}
    where = writer.path if writer.path.is_file() else writer.partial
    for number, row in enumerate(writer.existing_rows(), start=1):
        missing = [key for key in ("id", "response_ids") if key not in row]
        if missing:
            raise DistillmError(f"{where}: row {number} has no {', '.join(missing)}: it was not written by distillm "
                                "generation. Delete the file to regenerate it.")
        done[row["id"]] = row  # a duplicated row (same id) is kept once
    unknown = set(done) - set(ids)
    if writer.path.is_file() and not unknown and len(done) == len(ids):
        return [done[i] for i in ids]
    if unknown:
        raise DistillmError(
            f"{writer.path if writer.path.is_file() else writer.partial} holds responses for prompts that are not in "
            f"this prompt set (e.g. id {sorted(unknown)[0]!r}): it belongs to another run. Use another output "
            "directory, or --overwrite."
        )
    for prompt in prompts:
        previous = done.get(prompt.id, {}).get("prompt_ids")
        if previous is not None and list(previous) != list(prompt.input_ids):
            raise DistillmError(
                f"{where}: the response to prompt {prompt.id!r} was generated from other prompt tokens (another "
                "prompt file, chat template or --max-prompt-length): it belongs to another run. Use another output "
                "directory, or --overwrite.")
    with tqdm(total=len(ids), initial=len(done), desc=desc, unit="prompt", dynamic_ncols=True,
              disable=not progress) as bar:
        for batch_index, batch in enumerate(batches):
            if batch_index % world != rank:
                continue
            todo = [i for i in batch if prompts[i].id not in done]
            if not todo:
                continue
            # Always generate the whole planned batch with its own seed: identical to an uninterrupted run.
            # a vision-language backend (generation.vision) takes each prompt's image too
            images = {"images": [prompts[i].image for i in batch]} if getattr(backend, "takes_images", False) else {}
            completions = backend.generate_batch(
                [prompts[i].input_ids for i in batch], params, seed=params.seed * 1_000_003 + batch_index, **images
            )
            rows = []
            for i, completion in zip(batch, completions):
                if prompts[i].id in done:
                    continue
                row = {
                    "id": prompts[i].id,
                    "prompt": prompts[i].text,
                    "response": tokenizer.decode(completion.token_ids, skip_special_tokens=True),
                    "prompt_ids": list(prompts[i].input_ids),
                    "response_ids": completion.token_ids,
                    "finish_reason": completion.finish_reason,
                }
                if prompts[i].image:
                    row["image"] = prompts[i].image
                done[row["id"]] = row
                rows.append(row)
            writer.append(rows)
            bar.update(len(rows))
            fault_point(f"gen:{writer.path.stem}")
    ordered = [done[i] for i in ids]
    writer.finish(ordered)
    return ordered


def generate_sharded(
    backend: GenerationBackend,
    prompts: Sequence[EncodedPrompt],
    out_path: str | Path,
    params: SamplingParams,
    tokenizer: PreTrainedTokenizerBase,
    *,
    desc: str = "generating",
) -> list[dict]:
    """`generate_responses` split over the processes of a distributed run; every process gets all rows back.

    Each rank answers its share of the batches into `NAME.rankR-of-W.jsonl` (resumable like any output file),
    the rows are gathered (`accelerate.utils.gather_object`), checked (every prompt id exactly once), and rank 0
    writes `out_path` atomically; the shard files are then removed. With one process this is
    `generate_responses`. The backend of each rank must hold the same model (DDP replicas, or an engine loaded
    from the same directory).
    """
    state = process_state()
    world, rank = state.num_processes, state.process_index
    if world == 1:
        return generate_responses(backend, prompts, out_path, params, tokenizer, desc=desc)
    out_path = Path(out_path)
    ids = [p.id for p in prompts]
    done = broadcast_object_list([out_path.is_file()])[0]  # rank 0 decides, so every rank takes the same branch
    if done:
        by_id = {row["id"]: row for row in read_jsonl(out_path)}
        if set(by_id) != set(ids) or len(by_id) != len(ids):
            raise DistillmError(f"{out_path} holds responses for another prompt set: it belongs to another run. Use "
                                "another output directory, or --overwrite.")
        return [by_id[i] for i in ids]
    shard_path = out_path.with_name(f"{out_path.stem}.rank{rank}-of-{world}{out_path.suffix}")
    mine = generate_responses(backend, prompts, shard_path, params, tokenizer, desc=f"{desc} [rank {rank}/{world}]",
                              shard=(rank, world), progress=state.is_local_main_process)
    gathered = gather_object(mine)
    by_id: dict[str, dict] = {}
    for row in gathered:
        if row["id"] in by_id:
            raise DistillmError(f"{out_path}: prompt {row['id']!r} was answered by two processes (a shard file left "
                                "over from another run?). Delete the *.rank*-of-*.jsonl files next to it and rerun.")
        by_id[row["id"]] = row
    missing = [i for i in ids if i not in by_id]
    if missing or len(by_id) != len(ids):
        raise DistillmError(f"{out_path}: {len(missing)} of {len(ids)} prompts were answered by no process "
                            f"(e.g. {missing[:1]}); delete the *.rank*-of-*.jsonl files next to it and rerun.")
    rows = [by_id[i] for i in ids]
    if state.is_main_process:
        write_jsonl(out_path, rows)
    state.wait_for_everyone()
    shard_path.unlink(missing_ok=True)
    return rows
