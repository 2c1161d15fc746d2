"""Distillation methods, one module each: the data a method consumes and the loss it applies.

`build_method(config)` makes the configured one; `METHODS` maps each `--method` name to its class.
"""

from __future__ import annotations

from .base import LossInputs, Method
from .distillm2 import DistiLLM2
from .distillm_v1 import DistiLLMv1
from .dpkd import DPKD
from .gkd import GKD
from .imitkd import ImitKD
from .kd import KD
from .minillm import MiniLLM
from .seqkd import SeqKD
from .speculative_kd import SpeculativeKD
from .step_by_step import StepByStep

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    DistiLLM2, DistiLLMv1, KD, SeqKD, ImitKD, GKD, MiniLLM, DPKD, SpeculativeKD, StepByStep)}


def build_method(config) -> Method:
    return METHODS[config.method.method](config)


__all__ = ["METHODS", "LossInputs", "Method", "build_method"]
