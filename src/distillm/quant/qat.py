"""Quantization-aware students: fake-quantized linear weights (torchao's QAT API) whose grid is the export grid.

`prepare_qat` swaps every linear layer of the student except the output head for torchao's `FakeQuantizedLinear`
with an `IntxFakeQuantizeConfig`: symmetric, `bits` wide, one scale per group of `group_size` inputs, scales in
fp16. The forward then uses, for each group, ``w_q = clamp(round(w * (1/s)), -2**(b-1), 2**(b-1)-1) * s`` with
``s = fp16(max|w| / ((2**b - 1) / 2))`` and the gradient passes the rounding unchanged (straight-through estimator).
The float weights stay the trained (latent) parameters.

Why this grid is exactly the export grid (checked, torchao 0.18, `_quantize_affine_no_dtype_cast` and
`_dequantize_affine_no_dtype_check`): the scale is cast to fp16 *before* it is used; the weight is rebuilt as
``float32(code) * float32(fp16 scale)``, an exact product (3-8 bit code times an 11-bit mantissa fits fp32's 24
bits), i.e. exactly `QuantizedWeight(codes, scales).dequantize()` and exactly what llama.cpp's Q4_0 / Q8_0 blocks
(fp16 d, integer codes) hold. The only gap is torchao's lower clamp of the scale (`eps`, default fp32's smallest
normal), which becomes 0 in fp16 and turns an all-zero group into NaN (and a scale under 2**-16 makes the fp16
reciprocal infinite): `SCALE_EPS` = 2**-15 (exact in fp16, reciprocal 32768) is passed instead. No quantizer of our
own was needed.

`extract_quantized` reads the codes and scales back from each fake-quantized linear and checks, bit for bit, that
they rebuild the weight its forward used; `dequantized_copy` is the plain transformers model holding those weights
(what student/ and the GGUF file hold).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import textwrap

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import DistillmError
from ..export.gguf import write_gguf
from ..models import is_peft_model, merged_copy, resolve_model_source
from . import QuantizedWeight

logger = logging.getLogger("distillm")

#: --student-quant names -> bits. Codes of 2-4 bits are stored in llama.cpp's Q4_0 blocks, 8 bits in Q8_0.
QUANT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
#: Lower clamp of a group's scale: representable in fp16 with a finite fp16 reciprocal (see the module docstring).
SCALE_EPS = 2.0 ** -15


class QuantizationError(DistillmError):
    """A student that cannot be fake-quantized or exported as asked; the message says which layer and what to do."""


def quant_bits(name: str) -> int | None:
    """Bits of a --student-quant value ('none' -> None)."""
    if name == "none":
        return None
    if name not in QUANT_BITS:
        raise QuantizationError(f"--student-quant {name!r}: choose none or one of {', '.join(QUANT_BITS)}.")
    return QUANT_BITS[name]


def _torch_int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits == 8 else getattr(torch, f"int{bits}")


def import_torchao():
    """Import torchao's QAT API, or say how to install it."""
    if importlib.util.find_spec("torchao") is None:
        raise QuantizationError("--student-quant needs the torchao package (a dependency of distillm): "
                                "pip install 'torchao>=0.18'")
    import torchao.quantization.qat  # noqa: F401  optional: torchao (heavy); its noise: distillm._quiet


def fake_quantize_config(bits: int, group_size: int):
    import_torchao()
    from torchao.quantization.qat import IntxFakeQuantizeConfig  # optional: torchao (heavy), --student-quant

    return IntxFakeQuantizeConfig(_torch_int_dtype(bits), group_size=group_size, is_symmetric=True,
                                  scale_precision=torch.float16, eps=SCALE_EPS)


def quantizable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers a quantized student fake-quantizes: all of them except the output head (which stays full
    precision, as do the embeddings, norms and biases)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}


def check_quantizable(model: torch.nn.Module, group_size: int) -> None:
    """Every quantized linear's input size must be a multiple of the group size: say which one is not."""
    linears = quantizable_linears(model)
    if not linears:
        raise QuantizationError(f"--student-quant: {type(model).__name__} has no linear layers to quantize.")
    for name, module in linears.items():
        if module.in_features % group_size:
            raise QuantizationError(
                f"--student-quant-group-size {group_size}: the student's layer {name} has {module.in_features} "
                f"inputs, not a multiple of {group_size}. Choose a group size that divides every linear layer's "
                "input size (32 fits llama-family models; GGUF export needs a multiple of 32).")


def prepare_qat(model: torch.nn.Module, bits: int, group_size: int, *,
                train_embeddings: bool = False) -> torch.nn.Module:
    """Fake-quantize the student's linear weights in place (torchao QATConfig, step "prepare"); returns the model.
    Its forward is then the round-to-nearest quantized model: the starting point that "before" evaluates.

    The input embedding and the output head (tied in SmolLM2) are frozen unless `train_embeddings`: they stay the
    teacher's, so the GGUF export can copy the teacher file's own bytes for them (small and exact) instead of
    writing a trained fp32 matrix (a fifth of SmolLM2's weights, 113 MB in F32)."""
    from torchao.quantization import quantize_  # optional: torchao (heavy), --student-quant
    from torchao.quantization.qat import QATConfig  # optional: torchao (heavy), --student-quant

    check_quantizable(model, group_size)
    names = set(quantizable_linears(model))
    quantize_(model, QATConfig(weight_config=fake_quantize_config(bits, group_size), step="prepare"),
              filter_fn=lambda module, fqn: fqn in names)
    for module in fake_quantized_linears(model).values():
        module.weight_fake_quantizer.__class__ = _cached_quantizer_class()
    if not train_embeddings:
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None:
                for param in layer.parameters():
                    param.requires_grad_(False)
    logger.info("Quantized student: %d linear layers fake-quantized to int%d, groups of %d (fp16 scales); "
                "embeddings and output head in full precision%s", len(names), bits, group_size,
                "" if train_embeddings else " and frozen")
    return model


def fake_quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import_torchao()
    from torchao.quantization.qat.linear import FakeQuantizedLinear  # optional: torchao (heavy), --student-quant

    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}


def is_qat_model(model: torch.nn.Module) -> bool:
    return bool(fake_quantized_linears(model))


_CACHED_CLASS = None
#: optimizer steps taken in this process (any optimizer): part of the fake-quantized weights' cache key
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


def _cached_quantizer_class():
    """torchao's IntxFakeQuantizer, remembering its output while the weight cannot change under it.

    Generation calls the student once per new token with the same weights, and re-quantizing 100M weights per
    token would make sampling several times slower. When no gradient flows to the weight (no_grad, or a frozen
    base under LoRA) the result is reused as long as the weight is the same tensor at the same version and no
    optimizer has stepped since: torch's fused AdamW (the Trainer's default) updates parameters in place without
    bumping their version counter, so the version alone would keep stale weights; every optimizer step is counted
    by a global step hook instead. A forward that trains the weight is always computed afresh, through torchao."""
    global _CACHED_CLASS
    if _CACHED_CLASS is None:
        import_torchao()
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer  # optional: torchao (heavy)

        register_optimizer_step_post_hook(_count_optimizer_step)

        class CachedIntxFakeQuantizer(IntxFakeQuantizer):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if torch.is_grad_enabled() and x.requires_grad:
                    self._fq_cache = None
                    return super().forward(x)
                # a result made under inference_mode cannot enter autograd (a frozen LoRA base in training)
                key = (x.data_ptr(), x._version, _OPTIMIZER_STEPS[0], x.dtype, x.device,
                       torch.is_inference_mode_enabled())
                cache = getattr(self, "_fq_cache", None)
                if cache is None or cache[0] != key:
                    with torch.no_grad():
                        cache = (key, super().forward(x))
                    self._fq_cache = cache
                return cache[1]

            def __deepcopy__(self, memo):  # a copy (e.g. to merge LoRA into) starts without the cache
                clone = IntxFakeQuantizer(copy.deepcopy(self.config, memo))
                clone.__class__ = type(self)
                clone.enabled = self.enabled
                return clone

        _CACHED_CLASS = CachedIntxFakeQuantizer
    return _CACHED_CLASS


def _fake_quantize(module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight the module's forward uses, freshly computed by torchao, and the fp16 scales it used."""
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer  # optional: torchao (heavy), --student-quant

    quantizer = module.weight_fake_quantizer
    with torch.no_grad():
        weight = IntxFakeQuantizer.forward(quantizer, module.weight)
    return weight, quantizer.scale


def extract_quantized(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """HF parameter name ('model.layers.0.self_attn.q_proj.weight') -> QuantizedWeight for each fake-quantized
    linear of a plain (un-wrapped, LoRA merged) model. Raises QuantizationError unless the codes and scales rebuild,
    bit for bit, the weight the fake-quantized forward uses."""
    out = {}
    for name, module in fake_quantized_linears(model).items():
        config = module.weight_fake_quantizer.config
        bits = {_torch_int_dtype(b): b for b in QUANT_BITS.values()}[config.dtype]
        group = config.group_size
        weight, scale = _fake_quantize(module)
        weight = weight.detach().float().cpu()
        scale = scale.detach().reshape(weight.shape[0], -1).cpu()
        if scale.dtype != torch.float16:
            raise QuantizationError(f"{name}: its fake quantizer keeps {scale.dtype} scales, not float16.")
        codes = torch.round(weight / scale.float().repeat_interleave(group, dim=1))
        if not torch.isfinite(codes).all():
            raise QuantizationError(f"{name}: the fake-quantized weight is not finite (NaN/inf in the trained "
                                    "weights?); it cannot be exported.")
        quantized = QuantizedWeight(codes.to(torch.int8), scale.contiguous(), bits, group)
        if not torch.equal(quantized.dequantize(), weight):
            raise QuantizationError(f"{name}: the extracted codes and scales do not rebuild the fake-quantized "
                                    "weight bit for bit; the export would not be exact.")
        out[f"{name}.weight"] = quantized
    return out


def dequantized_copy(model: torch.nn.Module, quantized: dict[str, QuantizedWeight] | None = None) -> torch.nn.Module:
    """A plain transformers model (nn.Linear layers) whose quantized weights are the dequantized grid values: the
    fake-quantized student as a model any tool loads. `model` itself is left as it is."""
    quantized = extract_quantized(model) if quantized is None else quantized
    plain = copy.deepcopy(model)
    for name, module in fake_quantized_linears(plain).items():
        linear = torch.nn.Linear(module.in_features, module.out_features, module.bias is not None,
                                 device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(quantized[f"{name}.weight"].dequantize().to(linear.weight))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name) if parent_name else plain, child, linear)
    return plain


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model computing what `model` computes at export: a LoRA adapter merged in, then the
    fake-quantized weights replaced by their grid values. `model` itself is left as it is."""
    merged = merged_copy(model)
    if not is_qat_model(merged):
        return merged
    return dequantized_copy(merged)


def teacher_gguf(config) -> str | None:
    """The teacher's GGUF file (copied for metadata: tokenizer, chat template), if the teacher is one."""
    source = resolve_model_source(config.model.teacher)
    return source.path if source.kind == "gguf" else None


def write_student_gguf(path, plain: torch.nn.Module, quantized: dict[str, QuantizedWeight], config,
                       tokenizer) -> str | None:
    """student.gguf through distillm.export.gguf; None (with a warning naming why) when it cannot be written --
    the Hugging Face directory beside it holds the same weights."""
    try:
        write_gguf(str(path), plain, quantized, reference_gguf=teacher_gguf(config), tokenizer=tokenizer)
    except DistillmError as err:
        logger.warning("No GGUF written: %s student/ holds the quantized weights as a Hugging Face model.", err)
        return None
    return str(path)


def save_quantized_student(trainer, config, models, paths) -> dict:
    """The quantized student after training: student/ holds the plain model whose linear weights are the grid
    values (LoRA merged first, then quantized), student/student.gguf the same weights in llama.cpp blocks. The
    run's student becomes that plain model, so the "after" evaluation measures exactly what was exported.
    Written to student.tmp and renamed; every process builds the model, the main one writes."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        trainer.save_model(str(paths.root / "adapter"))  # the adapter itself, as for any LoRA run
        model = merged_copy(model)
    quantized = extract_quantized(model)
    plain = dequantized_copy(model, quantized)
    info = {"quant": config.model.student_quant, "group_size": config.model.student_quant_group_size,
            "quantized_linears": len(quantized), "student_dir": str(paths.student)}
    if trainer.args.should_save:
        tmp = paths.root / "student.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        models.tokenizer.save_pretrained(tmp)
        gguf = write_student_gguf(tmp / "student.gguf", plain, quantized, config, models.tokenizer)
        shutil.rmtree(paths.student, ignore_errors=True)
        tmp.rename(paths.student)
        if gguf:
            info["gguf"] = str(paths.student / "student.gguf")
            info["gguf_bytes"] = (paths.student / "student.gguf").stat().st_size
        reference = teacher_gguf(config)
        if reference:
            info["teacher_gguf"] = reference
            info["teacher_gguf_bytes"] = os.path.getsize(reference)
        logger.info("Quantized student: %s%s", paths.student, f" (GGUF: {info['gguf']})" if gguf else "")
    trainer.accelerator.wait_for_everyone()
    models.student = plain.to(next(model.parameters()).device)
    return info


def format_export(info: dict) -> str:
    """The end of a quantized run's console output: where the GGUF is, its size beside the teacher's, and what the
    sizes mean (the demo's teacher itself ships as Q4_1)."""
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    bits = QUANT_BITS.get(info.get("quant"), 0)
    lines = [""]
    if not info.get("gguf"):
        lines.append(f"Quantized student ({info.get('quant')}): {info.get('student_dir')} (no GGUF written; see the "
                     "warning above)")
        return "\n".join(lines)
    layout = "Q8_0" if bits == 8 else "Q4_0"
    lines.append(f"Quantized student ({info['quant']}, {layout} blocks): {info['gguf']} ({mb(info['gguf_bytes'])})")
    if info.get("teacher_gguf_bytes"):
        lines.append(f"Teacher GGUF: {info['teacher_gguf']} ({mb(info['teacher_gguf_bytes'])})")
    if bits and bits <= 4:
        note = (f"Sizes: Q4_0 stores 32 weights in 18 bytes (4.5 bits per weight), which holds the {info['quant']} "
                "codes exactly. ")
        if "q4_1" in str(info.get("teacher_gguf", "")).lower():
            note += ("The teacher's file is itself Q4_1 (5 bits per weight), so this file is hardly smaller than "
                     "the one the teacher came from. ")
        if bits == 3:
            note += ("int3 saves no file space over int4: llama.cpp's 3-bit layouts use 256-weight super-blocks with "
                     "another grid (groups of 16, 6-bit scales; SmolLM2's 576-wide rows do not even divide into "
                     "them), so the int3 codes are written in Q4_0 blocks. ")
        note += ("The embedding (and tied head) is not quantized and, unless --student-quant-train-embeddings, "
                 "not trained: the file keeps the teacher's own encoding of it (docs/quantization.md).")
        lines.extend(textwrap.wrap(note, 110))
    return "\n".join(lines)
