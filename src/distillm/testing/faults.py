"""Fault injection, for the reliability tests: crash a real run at a named point with a real SIGKILL.

`DISTILLM_FAULT="POINT@N"` (several separated by commas) makes the process send SIGKILL to itself the N-th time
it passes POINT -- no cleanup, no `finally`, no flush: exactly what a pre-emption or the out-of-memory killer
does. Unset (the normal case) it costs one dictionary lookup. Points:

    gen:STEM        after a batch of responses was appended to the JSONL named STEM (teacher_train, teacher_eval,
                    student = a round's student responses, before_samples, after_samples, ...)
    torn:STEM       in the middle of appending a batch to STEM: half of its text is on disk (a torn last line)
    train_step      after an optimizer step, before the Trainer saves a checkpoint for it
    checkpoint      while a checkpoint is being saved: weights and optimizer written, method state not yet
    eval:TAG        during the evaluation TAG (before, after), after its samples, before its divergences

Two more faults do not kill but poison a training step's loss (N may be a range, e.g. `nan_loss@3-5`):

    nan_loss        the loss of optimizer step N (counted from 1) is multiplied by NaN
    inf_loss        the loss of optimizer step N is multiplied by +inf
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from typing import Callable

ENV = "DISTILLM_FAULT"
_passes: Counter = Counter()


def _targets() -> dict[str, set[int]]:
    spec = os.environ.get(ENV, "").strip()
    targets: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, sep, count = item.rpartition("@")
        first, _, last = count.partition("-")
        if not sep or not first.isdigit() or not (last or first).isdigit() or int(first) < 1:
            raise ValueError(f"{ENV}={spec!r}: each fault is POINT@N or POINT@N-M with N >= 1 "
                             "(e.g. gen:teacher_train@2, nan_loss@3-5).")
        targets.setdefault(point, set()).update(range(int(first), int(last or first) + 1))
    return targets


def fault_active(name: str, n: int) -> bool:
    """Whether DISTILLM_FAULT asks for the non-killing fault `name` at `n` (e.g. nan_loss at step n)."""
    return ENV in os.environ and n in _targets().get(name, ())


def poison_loss(loss, step: int):
    """The training loss of optimizer step `step` (counted from 1), multiplied by NaN or +inf where
    DISTILLM_FAULT asks for nan_loss / inf_loss at that step; the loss itself, untouched, when it is unset."""
    if ENV not in os.environ:
        return loss
    for name, factor in (("nan_loss", float("nan")), ("inf_loss", float("inf"))):
        if fault_active(name, step):
            loss = loss * factor
    return loss


def fault_point(name: str, before_kill: Callable[[], None] | None = None) -> None:
    """Pass the point `name`; SIGKILL this process if DISTILLM_FAULT asks for it on this pass."""
    if ENV not in os.environ:
        return
    wanted = _targets().get(name)
    if not wanted:
        return
    _passes[name] += 1
    if _passes[name] == min(wanted):
        wanted = _passes[name]
        if before_kill is not None:
            before_kill()
        sys.stderr.write(f"distillm: fault injection: SIGKILL at {name}@{wanted}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
