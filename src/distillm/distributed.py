"""The process state of a run, from accelerate: one process, or several started by `accelerate launch` or
`torchrun` (one per GPU; on a machine without a GPU, CPU processes that talk over gloo)."""

from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """accelerate's shared `PartialState`. The first call sets it up: without a GPU it asks for CPU processes, so
    that `torchrun --nproc_per_node N` on a CPU machine gives N ranks over gloo (a plain `process_state()` would see
    one process there). Later calls return the same state."""
    return PartialState(cpu=not torch.cuda.is_available())
