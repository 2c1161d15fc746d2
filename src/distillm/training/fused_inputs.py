"""The fused losses' model glue: the hidden states and output head of a transformers causal LM at the
positions that predict the response tokens (`fused_inputs`), instead of its full logits."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ..losses.divergences import IGNORE_INDEX
from ..losses.fused import HeadInputs


class FusedBatch(NamedTuple):
    """`fused_inputs`' result: the head inputs of the response positions ([B, R, H]), the target ids there
    ([B, R], -100 where a row's response is shorter) and the mask of real response tokens ([B, R])."""

    head: HeadInputs
    labels: Tensor
    mask: Tensor


def fused_inputs(model, batch: dict[str, Tensor], *, ignore_index: int = IGNORE_INDEX,
                 extra_inputs: tuple[str, ...] = ()) -> FusedBatch:
    """Hidden states and head of a transformers causal LM at the positions that predict the response tokens.

    The fused counterpart of `training.collate.response_logits`: the batch is left-padded (input_ids,
    attention_mask, position_ids, labels with -100 off the responses), so every response lies in the last R
    columns (R = the longest response) and is predicted by the hidden states of columns -(R + 1) .. -2. The
    model runs its own forward (so wrappers -- PEFT, DDP -- see the call) with `logits_to_keep=R + 1`; a
    forward pre-hook on the output head (`model.get_output_embeddings()`, tied or not) keeps the hidden
    states it receives (the final normed states of those R + 1 columns, [B, R + 1, H]) and hands the head an
    empty slice instead, so no [B, R + 1, V] logits are built. Pass `vocab_size` (the tokenizer's real
    vocabulary) to the losses when the head is padded. Gradients flow as usual: run the teacher's call under
    torch.no_grad() or torch.inference_mode().

    Models that change their logits after the head (Gemma-2's final soft-capping, a logit scale) are
    refused: the fused losses assume logits = W h + b. `extra_inputs`: further batch keys passed on to the
    forward when present (e.g. a vision-language batch's pixel_values).
    """
    core = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    config = getattr(core, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(core).__name__} has {attr}={value}: its logits are not W h + b, "
                             "fused losses do not support it")
    head = core.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(core).__name__} has no output embedding layer with a weight")
    labels = batch["labels"]
    width = max(int((labels != ignore_index).sum(-1).max().item()), 1)
    kept: list[Tensor] = []

    def keep_hidden(module, args, kwargs):
        if args:
            kept.append(args[0])
            return (args[0][..., :0, :],) + tuple(args[1:]), kwargs  # the head sees no positions: [B, 0, V]
        name = next(iter(kwargs))  # called with its input as a keyword
        kept.append(kwargs[name])
        return args, {**kwargs, name: kwargs[name][..., :0, :]}

    handle = head.register_forward_pre_hook(keep_hidden, with_kwargs=True)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch.get("position_ids"), logits_to_keep=width + 1, use_cache=False,
              **{key: batch[key] for key in extra_inputs if key in batch})
    finally:
        handle.remove()
    if len(kept) != 1 or kept[0].shape[-2] != width + 1:
        raise ValueError(f"{type(core).__name__} did not call its output head once on the last {width + 1} "
                         "positions: fused losses need a causal LM that supports logits_to_keep")
    hidden = kept[0][:, :-1]
    labels = labels[:, -width:]
    return FusedBatch(HeadInputs(hidden, head.weight, getattr(head, "bias", None)), labels, labels != ignore_index)
