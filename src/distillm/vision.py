"""Vision-language distillation: teacher and student image-text-to-text models (the LLaVA family and others that
transformers loads with `AutoModelForImageTextToText` and `AutoProcessor`).

Only the data, the collation and the forward differ from text distillation; the methods' losses and the trainer
are the same:

- a model is a vision-language model when its config has a `vision_config` or its model type is in transformers'
  image-text-to-text mapping (`is_vision_model`); it loads with its processor (`load_vision_model`);
- prompts are (image, prompt) rows (`data.vision`), tokenized by the processor, which expands the image
  placeholder into the image's tokens;
- generation passes each prompt's image to `model.generate` (`generation.vision.VisionHFBackend`);
- batches carry `pixel_values` (`training.vision.VisionCollator`), which `training.collate.response_logits`
  passes to both the teacher's and the student's forward; the labels cover the response tokens only.

Teacher and student must tokenize an image and a prompt identically (same tokenizer, same number of image
tokens), since both score the same token sequences; the student sees the teacher processor's pixel values.
"""

from __future__ import annotations

import logging
import os

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from .errors import DistillmError
from .methods import METHODS
from .data.vision import check_no_images, encode_image_prompts, image_placeholder, load_image_prompts
from .distributed import process_state
from .models import (ModelLoadError, ModelPair, check_same_tokenizer, copy_with_layers, count_parameters,
                     is_vision_model, parse_layer_spec, real_vocab_size, resolve_dtype, resolve_model_source)

logger = logging.getLogger("distillm")

#: Methods that run on vision-language models. The others need what is not wired for images here: speculative KD
#: decodes with its own loop, step-by-step re-renders its prompts as text. (Each method's `vision` attribute.)
VISION_METHODS = tuple(name for name, cls in METHODS.items() if cls.vision)


def load_vision_model(spec: str | os.PathLike, *, dtype: str = "auto", trust_remote_code: bool = False):
    """(model, processor) of a vision-language model: `AutoModelForImageTextToText` + `AutoProcessor`."""
    source = resolve_model_source(spec)
    kwargs = dict(trust_remote_code=trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(source.path, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(source.path, dtype=resolve_dtype(dtype),
                                                            use_safetensors=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load vision-language model '{source.spec}' from {source.path}: {err}") from err
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"'{source.spec}': its processor ({type(processor).__name__}) has no tokenizer and image "
                             "processor; a vision-language model needs both (save them with processor.save_pretrained).")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, processor


def check_same_image_layout(teacher_processor, student_processor) -> None:
    """Both processors must turn an image + text into the same tokens and the same pixel values: both models
    score the same sequences, and the student is given the teacher processor's images."""
    check_same_tokenizer(teacher_processor.tokenizer, student_processor.tokenizer)
    image = Image.new("RGB", (37, 29), (200, 40, 90))
    outputs = []
    for processor in (teacher_processor, student_processor):
        text = image_placeholder(processor) + "\nprobe"
        outputs.append(processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt"))
    t, s = outputs
    n_t, n_s = t["input_ids"].shape[-1], s["input_ids"].shape[-1]
    if n_t != n_s or not torch.equal(t["input_ids"], s["input_ids"]):
        raise ModelLoadError(
            f"The teacher's and the student's processors tokenize an image differently ({n_t} vs {n_s} tokens for "
            "one image and a word): both models must score the same sequences, so they need the same image token "
            "layout (same vision resolution and patch size). Use a student from the teacher's family.")
    if t["pixel_values"].shape != s["pixel_values"].shape or not torch.allclose(t["pixel_values"], s["pixel_values"]):
        raise ModelLoadError(
            "The teacher's and the student's image processors give different pixel values (another resolution or "
            "normalisation): the student would be trained on images prepared for the teacher. Use the same image "
            "processor for both.")


def _language_layers_prefix(model) -> str:
    """The state-dict prefix of the language model's decoder layer list, e.g. 'model.language_model.layers'."""
    n = model.config.text_config.num_hidden_layers
    candidates = [name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.ModuleList) and len(module) == n and "vision" not in name]
    if len(candidates) != 1:
        raise ModelLoadError(f"Cannot find the language model's decoder layers of {type(model).__name__} to prune: "
                             "pass a student model with --student instead of --student-layers.")
    return candidates[0]


def prune_vision_layers(model, keep) -> torch.nn.Module:
    """A new vision-language model keeping the language model's decoder layers `keep` (vision tower, projector,
    embeddings and output head copied unchanged)."""
    return copy_with_layers(model, lambda config: config.text_config, _language_layers_prefix(model), keep)


def load_vision_models(config):
    """The `models.ModelPair` of a vision-language run: the teacher in the configured dtype, the student in fp32
    (`--student`, or the teacher with --student-layers of its language model kept), and the teacher's processor."""
    m = config.model
    if config.method.method not in VISION_METHODS:
        raise DistillmError(f"--method {config.method.method} does not run on vision-language models; use one of "
                            f"{', '.join(VISION_METHODS)}.")
    if m.lora or m.load_in_4bit:
        raise DistillmError("--lora / --load-in-4bit students are not supported for vision-language models yet: "
                            "distil the whole student (drop those options).")
    teacher, processor = load_vision_model(m.teacher, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    if m.student:
        if not is_vision_model(m.student, trust_remote_code=m.trust_remote_code):
            raise ModelLoadError(f"The teacher {m.teacher} is a vision-language model but the student {m.student} is "
                                 "text-only: both must see the images.")
        student, student_processor = load_vision_model(m.student, dtype="float32",
                                                       trust_remote_code=m.trust_remote_code)
        check_same_image_layout(processor, student_processor)
    else:
        keep = parse_layer_spec(m.student_layers, teacher.config.text_config.num_hidden_layers)
        student = prune_vision_layers(teacher, keep).float()
        logger.info("Student: teacher language-model layers %s (%d of %d)", keep, len(keep),
                    teacher.config.text_config.num_hidden_layers)
    if config.generation.backend == "vllm":
        logger.warning("Vision-language runs generate with transformers (the hf backend); --backend vllm is ignored.")
    device = process_state().device
    teacher, student = teacher.to(device), student.to(device)
    logger.info("Vision-language teacher %s: %.2fM parameters; student: %.2fM", m.teacher,
                count_parameters(teacher) / 1e6, count_parameters(student) / 1e6)
    tokenizer = processor.tokenizer
    return ModelPair(teacher, student, tokenizer, real_vocab_size(tokenizer), None, processor=processor)


def load_image_prompt_set(config, processor, which: str):
    """The train or eval prompts of a vision-language run, as `pipeline.load_prompt_set` for text."""
    d = config.data
    path, limit = (d.prompts, d.num_prompts) if which == "train" else (d.eval_prompts, d.num_eval_prompts)
    records, report = load_image_prompts(
        path, image_field=d.image_field, prompt_field=d.prompt_field, messages_field=d.messages_field,
        response_field=d.response_field, id_field=d.id_field, system_prompt=d.system_prompt, limit=limit)
    encoded = encode_image_prompts(records, processor, max_prompt_length=d.max_prompt_length,
                                   use_chat_template=d.chat_template)
    logger.info("%s prompts: %d with images from %s (%d empty skipped)", which, len(encoded), report.path,
                report.n_empty_skipped)
    return encoded


def uses_images(config) -> bool:
    """Whether a run is vision-language (its teacher is a vision-language model). A text-only pair given a
    vision-language student, or prompt rows with images, is an error rather than a run that ignores the images."""
    m, d = config.model, config.data
    if is_vision_model(m.teacher, trust_remote_code=m.trust_remote_code):
        return True
    if m.student and is_vision_model(m.student, trust_remote_code=m.trust_remote_code):
        raise ModelLoadError(f"The student {m.student} is a vision-language model but the teacher {m.teacher} is "
                             "text-only: use a vision-language teacher too (both must see the images).")
    for path in (d.prompts, d.eval_prompts if config.evaluation.evaluate else None):
        check_no_images(path, d.image_field, model=m.teacher)
    return False
