import pytest
import torch

from distillm.quant import QuantizedWeight


def test_dequantize_is_codes_times_the_group_scale():
    codes = torch.tensor([[-8, 7, 0, 1], [3, -2, -8, 5]], dtype=torch.int8)
    scales = torch.tensor([[0.5, 2.0], [0.25, 1.5]], dtype=torch.float16)
    w = QuantizedWeight(codes, scales, bits=4, group_size=2).dequantize()
    expected = [[-4.0, 3.5, 0.0, 2.0], [0.75, -0.5, -12.0, 7.5]]
    assert w.dtype == torch.float32 and w.tolist() == expected


@pytest.mark.parametrize("bad", [
    dict(codes=torch.zeros(2, 4, dtype=torch.int32)),                 # not int8
    dict(scales=torch.ones(2, 3, dtype=torch.float16)),               # wrong group count
    dict(codes=torch.full((2, 4), 4, dtype=torch.int8), bits=3),      # 4 is outside int3's [-4, 3]
])
def test_inconsistent_weights_are_refused(bad):
    args = dict(codes=torch.zeros(2, 4, dtype=torch.int8), scales=torch.ones(2, 2, dtype=torch.float16),
                bits=4, group_size=2)
    with pytest.raises(ValueError):
        QuantizedWeight(**{**args, **bad})
