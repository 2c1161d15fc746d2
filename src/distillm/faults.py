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
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from typing import Callable

ENV = "DISTILLM_FAULT"
_passes: Counter = Counter()


def _targets() -> dict[str, int]:
    spec = os.environ.get(ENV, "").strip()
    targets = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, sep, count = item.rpartition("@")
        if not sep or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}={spec!r}: each fault is POINT@N with N >= 1 (e.g. gen:teacher_train@2).")
        targets[point] = int(count)
    return targets


def fault_point(name: str, before_kill: Callable[[], None] | None = None) -> None:
    """Pass the point `name`; SIGKILL this process if DISTILLM_FAULT asks for it on this pass."""
    if ENV not in os.environ:
        return
    wanted = _targets().get(name)
    if wanted is None:
        return
    _passes[name] += 1
    if _passes[name] == wanted:
        if before_kill is not None:
            before_kill()
        sys.stderr.write(f"distillm: fault injection: SIGKILL at {name}@{wanted}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
