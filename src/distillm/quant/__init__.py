"""Quantized students: the integer grid shared by training (fake quantization) and export (GGUF).

`QuantizedWeight` is the contract between the two: training produces one per quantized linear layer such that
`dequantize()` equals, bit for bit, the weight the fake-quantized student used in its forward; export packs its
codes and scales into a llama.cpp block layout without re-deriving them, so the file holds exactly the trained
student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight on a symmetric integer grid with one fp16 scale per group of `group_size` inputs.

    codes: int8 [out_features, in_features], each in [-2**(bits-1), 2**(bits-1) - 1]
    scales: float16 [out_features, in_features // group_size]
    The weight is codes * scales (each scale repeated over its group), computed in fp32; this product is exact
    (a small integer times an fp16 value fits fp32's 24-bit mantissa), which is what makes export exact.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int

    def __post_init__(self):
        out_features, in_features = self.codes.shape
        if self.codes.dtype != torch.int8 or self.scales.dtype != torch.float16:
            raise ValueError(f"codes must be int8 and scales float16, got {self.codes.dtype} and {self.scales.dtype}")
        if in_features % self.group_size or self.scales.shape != (out_features, in_features // self.group_size):
            raise ValueError(f"scales of shape {tuple(self.scales.shape)} do not fit codes {tuple(self.codes.shape)} "
                             f"in groups of {self.group_size}")
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        if self.codes.numel() and (int(self.codes.min()) < lo or int(self.codes.max()) > hi):
            raise ValueError(f"codes outside the {self.bits}-bit range [{lo}, {hi}]")

    def dequantize(self) -> torch.Tensor:
        scales = self.scales.float().repeat_interleave(self.group_size, dim=1)
        return self.codes.float() * scales
