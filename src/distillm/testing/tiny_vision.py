"""Tiny, randomly initialised LLaVA-style vision-language models, their processor and a few generated images.

For tests and smoke runs of vision-language distillation, with no download: a teacher and a student
(`LlavaForConditionalGeneration`: a 1-layer CLIP vision tower at 16x16 pixels, a 2-layer projector and a tiny
Llama; the student has fewer text layers, the same vocabulary and the same image token), the processor both use
(the byte-level tokenizer of `distillm.testing.tiny` plus an `<image>` token, a CLIP image processor, 16 image tokens per
image) and a prompt file of (image, prompt) rows over solid-colour and two-colour PNG images.

`write_tiny_vlm_setup(folder)` writes all of it, so everything loads through the normal paths
(`--teacher DIR/teacher --student DIR/student --prompts DIR/prompts.jsonl`); the same from the shell::

    python -m distillm.testing.tiny_vision /tmp/tiny-vlm
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .tiny import build_tiny_tokenizer, tiny_llama_config

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 16  # pixels (square)
PATCH_SIZE = 4  # -> 4 x 4 = 16 image tokens per image (the CLS feature is dropped)

#: A chat template for typed content ({"type": "image"} / {"type": "text", "text": ...}) or plain strings.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
           "black": (10, 10, 10), "white": (250, 250, 250)}

QUESTIONS = ["What colour is this image?", "Describe the picture.", "What do you see?",
             "Is there more than one colour here?", "Name the main colour in one word."]


def build_tiny_processor() -> LlavaProcessor:
    """The processor of the tiny VLMs: tokenizer with `<image>`, CLIP image processor at 16x16, 16 image tokens."""
    tokenizer = build_tiny_tokenizer(chat_template=VLM_CHAT_TEMPLATE)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=VLM_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def build_tiny_vlm(processor: LlavaProcessor, num_text_layers: int = 4, hidden_size: int = 64,
                   seed: int = 0) -> LlavaForConditionalGeneration:
    """A random LLaVA: CLIP vision tower (1 layer, 16x16 pixels, patch 4) + projector + a tiny Llama."""
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
    text = tiny_llama_config(len(tokenizer), num_layers=num_text_layers, hidden_size=hidden_size,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def make_images(folder: str | Path, count: int = 6) -> list[Path]:
    """`count` PNG images: solid colours, then left/right halves of two colours (written as folder/img_K.png)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    paths = []
    for k in range(count):
        first, second = COLOURS[names[k % len(names)]], COLOURS[names[(k * 2 + 1) % len(names)]]
        image = Image.new("RGB", (24 + 4 * k, 20), first)
        if k >= len(names) // 2:
            image.paste(Image.new("RGB", (image.width // 2, image.height), second), (image.width // 2, 0))
        path = folder / f"img_{k}.png"
        image.save(path)
        paths.append(path)
    return paths


def write_tiny_vlm_setup(folder: str | Path, *, num_prompts: int = 16, num_eval_prompts: int = 4,
                         teacher_layers: int = 4, student_layers: int = 2) -> dict[str, Path]:
    """Write teacher/, student/ (models + processor), images/, prompts.jsonl and eval_prompts.jsonl into
    `folder` (image paths in the prompt files are relative to it) and return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_processor()
    out = {"teacher": folder / "teacher", "student": folder / "student"}
    for name, layers, seed in (("teacher", teacher_layers, 0), ("student", student_layers, 1)):
        model = build_tiny_vlm(processor, num_text_layers=layers, seed=seed)
        model.save_pretrained(out[name])
        processor.save_pretrained(out[name])
    images = make_images(folder / "images")
    for key, count, offset in (("prompts", num_prompts, 0), ("eval_prompts", num_eval_prompts, num_prompts)):
        path = folder / f"{key}.jsonl"
        with path.open("w") as handle:
            for i in range(count):
                k = i + offset
                row = {"id": f"{key}-{i}", "image": f"images/{images[k % len(images)].name}",
                       "prompt": QUESTIONS[k % len(QUESTIONS)]}
                handle.write(json.dumps(row) + "\n")
        out[key] = path
    out["images"] = folder / "images"
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m distillm.testing.tiny_vision OUTPUT_DIR", file=sys.stderr)
        return 2
    for name, path in write_tiny_vlm_setup(argv[0]).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
