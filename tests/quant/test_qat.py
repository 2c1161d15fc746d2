"""Quantization-aware students (distillm.quant.qat): torchao's fake quantization on the export grid, its
straight-through gradient, extraction of QuantizedWeights bit for bit, the plain dequantized copy, QAT + LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

from distillm.config import ConfigError, load_config
from distillm.quant import QuantizedWeight
from distillm.quant.qat import (
    SCALE_EPS, QuantizationError, dequantized_copy, extract_quantized, fake_quantized_linears, plain_copy,
    prepare_qat, quantizable_linears,
)
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer


def reference_grid(w: torch.Tensor, bits: int, group: int):
    """Brute force, one group at a time in float64: the symmetric grid the export stores (fp16 scale = max|w| /
    ((2^b - 1) / 2), at least SCALE_EPS, rounded to fp16; codes clamped to [-2^(b-1), 2^(b-1) - 1])."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out, rows = w.shape
    scales = torch.empty(out, rows // group, dtype=torch.float16)
    ratio = torch.empty(out, rows, dtype=torch.float64)
    for r in range(out):
        for g in range(rows // group):
            chunk = w[r, g * group:(g + 1) * group].double()
            s = max(float(chunk.abs().max()) / ((hi - lo) / 2), SCALE_EPS)
            scales[r, g] = torch.tensor(s).to(torch.float16)
            ratio[r, g * group:(g + 1) * group] = chunk / float(scales[r, g])
    return scales, ratio, lo, hi


@pytest.fixture
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, num_layers=2, seed=0), tokenizer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantized_weight_is_the_reference_grid_and_extracts_exactly(bits, tiny):
    model, _ = tiny
    original = copy.deepcopy(model)
    prepare_qat(model, bits, 32)
    quantized = extract_quantized(model)
    assert set(quantized) == {f"{name}.weight" for name in fake_quantized_linears(model)}
    for name, module in fake_quantized_linears(model).items():
        w = original.get_submodule(name).weight.detach()
        scales, ratio, lo, hi = reference_grid(w, bits, 32)
        q = quantized[f"{name}.weight"]
        assert q.bits == bits and q.group_size == 32
        assert torch.equal(q.scales, scales), name
        # torchao multiplies by the fp16 reciprocal of the scale, whose relative error is <= 2^-11: a code may
        # differ from round-to-nearest only where w/s lies within |w/s| * 2^-11 of a rounding boundary
        slack = ratio.abs() * 2.0 ** -11 + 1e-9
        err = (q.codes.double() - ratio.clamp(lo, hi)).abs()
        assert bool((err <= 0.5 + slack).all()), name
        assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
        # the weight the forward uses is codes * scales, bit for bit
        with torch.no_grad():
            used = module.weight_fake_quantizer(module.weight)
        assert torch.equal(used, q.dequantize()), name


def test_only_linears_other_than_the_head_are_fake_quantized(tiny):
    model, _ = tiny
    names = set(quantizable_linears(model))
    prepare_qat(model, 4, 32)
    assert set(fake_quantized_linears(model)) == names
    assert "lm_head" not in names and all("embed" not in n for n in names)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert len(names) == 7 * model.config.num_hidden_layers  # q k v o gate up down


def test_degenerate_groups_stay_finite(tiny):
    model, _ = tiny
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight[0, :32] = 0.0  # an all-zero group: torchao's default eps would make its fp16 scale 0 (NaN)
        layer.weight[1, :32] = 1e-7  # far below fp16's range for 1/scale
    prepare_qat(model, 4, 32)
    q = extract_quantized(model)["model.layers.0.mlp.down_proj.weight"]
    assert float(q.scales[0, 0]) == SCALE_EPS and bool((q.codes[0, :32] == 0).all())
    assert bool(torch.isfinite(q.dequantize()).all())


def test_gradient_is_straight_through_except_where_clipped(tiny):
    model, _ = tiny
    prepare_qat(model, 3, 32)
    module = model.model.layers[1].self_attn.o_proj
    w = module.weight.detach().clone()
    scales, ratio, lo, hi = reference_grid(w, 3, 32)
    x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(5, module.out_features, generator=torch.Generator().manual_seed(1))
    (module(x) * upstream).sum().backward()
    # d/dW of sum(upstream * x W_q^T) is upstream^T x: the rounding passes the gradient unchanged (the scale is a
    # constant of the step), times (fp16(1/s) * s), within 2^-11 of 1: torchao multiplies by the scale's fp16
    # reciprocal and then by the scale. torchao clamps after rounding, so a code that clips gets none; with the symmetric
    # scale max|w| / ((2^b - 1) / 2) only the group's extreme can touch the clamp, so those are left out here.
    margin = 1e-3 + 2.0 ** -11 * (hi + 1)
    kept = (ratio > lo - 0.5 + margin) & (ratio < hi + 0.5 - margin)
    grad = module.weight.grad.double()
    factor = ((1.0 / scales).to(torch.float16).double() * scales.double()).repeat_interleave(32, dim=1)
    expected = (upstream.T @ x).double() * factor
    tol = 8 * 5 * 2.0 ** -24 * float((upstream.abs().T @ x.abs()).max())  # fp32 sums of 5 products
    assert kept.float().mean() > 0.9
    assert torch.allclose(grad[kept], expected[kept], atol=tol, rtol=0)


def test_dequantized_copy_is_a_plain_model_with_the_same_logits(tiny):
    model, _ = tiny
    prepare_qat(model, 4, 32)
    plain = dequantized_copy(model)
    assert not fake_quantized_linears(plain) and fake_quantized_linears(model)  # the model itself is unchanged
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the same fp32 weights through the same F.linear: identical logits
        assert torch.equal(model(ids).logits, plain(ids).logits)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.5),
    # the Trainer's default: its fused kernel updates parameters without bumping their version counters
    lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
], ids=["sgd", "fused-adamw"])
def test_no_grad_forwards_reuse_the_quantized_weight_until_it_changes(tiny, make_optimizer):
    model, _ = tiny
    prepare_qat(model, 4, 32)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    optimizer = make_optimizer(model.parameters())
    with torch.no_grad():
        first = model(ids).logits
        assert torch.equal(first, model(ids).logits)
    model(ids).logits.square().sum().backward()
    optimizer.step()  # in-place updates: the cached weights must not be reused
    with torch.no_grad():
        after = model(ids).logits
        assert torch.equal(after, dequantized_copy(model)(ids).logits)
    assert not torch.equal(first, after)


def test_layer_whose_inputs_do_not_fit_the_group_is_named(tiny):
    model, _ = tiny
    with pytest.raises(QuantizationError, match=r"layer model\.layers\.0\.self_attn\.q_proj has 64 inputs, not a multiple of 128"):
        prepare_qat(model, 4, 128)


@pytest.mark.parametrize("overrides, message", [
    ({"student_quant": "int5"}, "student_quant must be none or one of int8, int4, int3, int2"),
    # below the declared range: refused as the option is read, like every other option
    ({"student_quant": "int4", "student_quant_group_size": 16}, r"'student_quant_group_size' = 16 is out of range.*>= 32"),
    ({"student_quant": "int4", "student_quant_group_size": 48}, "student_quant_group_size must be a multiple of 32"),
    ({"student_quant": "int4", "load_in_4bit": True}, "student_quant and load_in_4bit"),
])
def test_bad_quant_options_are_refused_with_the_option_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_group_of_two_blocks_is_accepted():
    assert load_config(overrides={"student_quant": "int3", "student_quant_group_size": 64}).model.student_quant == "int3"


def test_qat_with_lora_trains_adapters_over_a_frozen_quantized_base_and_exports_the_merged_weights(tiny):
    from distillm.models import add_lora

    model, _ = tiny
    prepare_qat(model, 4, 32)
    lora = add_lora(model, r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = lora.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert base in fake_quantized_linears(lora).values()  # the adapters wrap the fake-quantized linear
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        lora(ids).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    # merged, then quantized: the exported weight of each adapted layer is the grid of (W + B A scaling)
    merged = copy.deepcopy(lora).merge_and_unload()
    quantized = extract_quantized(merged)
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    w_merged = (layer.base_layer.weight + layer.get_delta_weight("default")).detach()
    scales, _, _, _ = reference_grid(w_merged, 4, 32)
    assert torch.equal(quantized["model.layers.0.self_attn.q_proj.weight"].scales, scales)
    plain = plain_copy(lora)
    assert not fake_quantized_linears(plain)
    assert torch.equal(plain.model.layers[0].self_attn.q_proj.weight,
                       quantized["model.layers.0.self_attn.q_proj.weight"].dequantize())
    assert isinstance(quantized["model.layers.0.self_attn.q_proj.weight"], QuantizedWeight)


def test_a_frozen_base_quantized_under_inference_mode_still_trains_its_adapters(tiny):
    """Generation runs under torch.inference_mode and caches the frozen base's quantized weights; the next training
    forward must not hand those inference tensors to autograd."""
    from distillm.models import add_lora

    model, _ = tiny
    prepare_qat(model, 4, 32)
    lora = add_lora(model, r=4, alpha=8, dropout=0.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = lora(ids).logits
    logits = lora(ids).logits
    assert torch.equal(logits.detach(), expected)
    logits.square().mean().backward()
    assert any(p.grad is not None for n, p in lora.named_parameters() if "lora_B" in n)


def test_importing_distillm_prints_none_of_torchaos_cpu_noise():
    """transformers imports torchao when it is installed; on a CPU machine torchao then logs its CUDA libraries'
    load failures and torch a pytree deprecation note per Enum: distillm._quiet drops exactly those."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(); import distillm.models; "
                             "import distillm.quant.qat as q; q.import_torchao()"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Failed to load" not in result.stderr and "is an Enum subclass" not in result.stderr, result.stderr[-2000:]


def test_run_summary_shows_distinct_2_answers_and_export(tmp_path):
    from distillm.cli import format_answers, format_metrics
    from distillm.io import write_jsonl
    from distillm.quant.qat import format_export

    figures = {"teacher_nll_of_student_samples": 1.0, "kl": 1.0, "tvd": 0.5, "acceptance_rate": 0.5}
    table = format_metrics({"before": {**figures, "distinct_2": 0.2, "teacher_distinct_2": 0.9},
                            "after": {**figures, "distinct_2": 0.8, "teacher_distinct_2": 0.9}})
    assert "distinct-2 of samples (teacher: 0.9000)" in table and table.rstrip().endswith("(closer to the teacher's is better)")
    prompt = "<|im_start|>system\nBe kind<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    for path, text in (("data/teacher_eval.jsonl", "Blue."), ("eval/before_samples.jsonl", "Blue blue\nblue"),
                       ("eval/after_samples.jsonl", "Red.")):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / path, [{"id": "c1", "prompt": prompt, "response": text}])
    answers = format_answers(tmp_path, quantized=True)
    assert "- prompt c1: Name a colour." in answers
    assert "teacher                | Blue." in answers and "round-to-nearest start | Blue blue blue" in answers
    assert "distilled              | Red." in answers
    text = format_export({"quant": "int3", "gguf": "s/student.gguf", "gguf_bytes": 90_500_000,
                          "teacher_gguf": "t/SmolLM2-135M-Instruct.Q4_1.gguf", "teacher_gguf_bytes": 98_000_000})
    assert "s/student.gguf (90.5 MB)" in text and "(98.0 MB)" in text and "Q4_1" in text and "int3 saves no" in text


def test_embeddings_and_head_are_frozen_unless_asked(tiny):
    model, _ = tiny
    prepare_qat(model, 4, 32)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"model.embed_tokens.weight"}  # tied: the head is the same parameter
    assert all(p.requires_grad for n, p in model.named_parameters() if "proj" in n or "norm" in n)
    other = build_tiny_model(build_tiny_tokenizer(), num_layers=2, seed=0)
    prepare_qat(other, 4, 32, train_embeddings=True)
    assert all(p.requires_grad for p in other.parameters())
