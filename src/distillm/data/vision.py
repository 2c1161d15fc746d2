"""Image + text prompts for vision-language distillation.

A prompt file for a vision-language model is the same as for a text model (JSONL, JSON, CSV, Parquet, a saved
dataset; `prompt` or `messages` fields, see `data.prompts`) with one more field, `image` (`--image-field`): the
path of an image file, relative to the folder of the prompt file (or absolute). Every row needs one.

`load_image_prompts` reads the rows and checks every image exists and can be decoded (PIL); `encode_image_prompts`
renders each prompt with the processor's chat template (the image as the first part of the last user turn) and
tokenizes it with the model's own processor, so the image placeholder is expanded into as many image tokens as the
model's vision tower produces features. Errors name the file, the line and the field.

`check_no_images` is the opposite guard: a text-only model given rows with an image field is an error, not a
silent run that ignores the images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DistillmError
from .prompts import (
    DataError, EncodedPrompt, LoadReport, PromptRecord, PromptFields, collect_records, open_source, type_name,
)


@dataclass
class ImagePromptRecord(PromptRecord):
    """A prompt with its image (an absolute path)."""

    image: str = ""


def open_image(path: str | os.PathLike, where: str = ""):
    """The image at `path` as an RGB PIL image; a missing or undecodable file raises DataError naming `where`."""
    prefix = f"{where}: " if where else ""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{prefix}image file not found: {path}. Image paths are relative to the prompt file's folder.")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{prefix}cannot read image {path} ({err}). Use a PNG, JPEG or another format PIL reads.") \
            from None


def _base_folder(path: str | os.PathLike | None) -> Path:
    """Image paths are relative to the prompt file's folder (a dataset directory: the directory itself)."""
    spec = os.fspath(path)
    file = Path(spec)
    if file.is_dir():
        return file
    base, _, split = spec.rpartition(":")
    if not file.exists() and base and Path(base).is_dir():
        return Path(base)
    return file.parent


def load_image_prompts(
    path: str | os.PathLike,
    *,
    image_field: str = "image",
    prompt_field: str = "prompt",
    messages_field: str = "messages",
    response_field: str = "response",
    id_field: str = "id",
    system_prompt: str | None = None,
    limit: int | None = None,
) -> tuple[list[ImagePromptRecord], LoadReport]:
    """Read (image, prompt) rows; each image is checked to exist and decode. See `data.prompts.load_prompts`."""
    if path is None or str(path).startswith("builtin"):
        raise DataError(f"the built-in prompts have no images: a vision-language model needs --prompts pointing at a "
                        f"file whose rows have an '{image_field}' field (an image path) and a prompt.")
    fields = PromptFields(prompt_field, messages_field, response_field, id_field)
    label, stem, rows, fields = open_source(path, fields)
    base = _base_folder(path)

    def with_image(record, raw, where) -> ImagePromptRecord:
        image = raw.get(image_field)
        if image is None or image == "":
            present = ", ".join(map(str, raw)) or "none"
            raise DataError(f"{where}: no image: field '{image_field}' is missing or empty (fields present: {present}). "
                            "Every row of a vision-language run needs an image path; set --image-field to the column "
                            "that holds it.")
        if not isinstance(image, str):
            raise DataError(f"{where}: field '{image_field}' must be an image path (a string), got {type_name(image)}.")
        resolved = (base / image).resolve() if not Path(image).is_absolute() else Path(image)
        open_image(resolved, f"{where}: field '{image_field}'")  # fail now, not in the middle of training
        return ImagePromptRecord(id=record.id, messages=record.messages, response=record.response,
                                 source=record.source, image=str(resolved))

    records, n_empty = collect_records(rows, stem, fields, system_prompt, limit, extend=with_image)
    if not records and limit != 0:
        raise DataError(f"{label}: no prompts found ({n_empty} empty prompts skipped). Check the file's contents.")
    return records, LoadReport(path=label, n_loaded=len(records), n_empty_skipped=n_empty)


def check_no_images(path: str | os.PathLike | None, image_field: str = "image", *, model: str = "") -> None:
    """Raise DataError if a row of the prompt file has an image: the model (a text-only one) would ignore it."""
    if path is None or str(path).startswith("builtin"):
        return
    _, _, rows, _ = open_source(path, PromptFields())
    for _, where, raw in rows:
        if isinstance(raw, dict) and raw.get(image_field) not in (None, ""):
            raise DataError(
                f"{where}: the row has an image (field '{image_field}') but the model {model or ''} is a text-only "
                "model, which cannot see images. Use a vision-language teacher and student (e.g. the LLaVA family, "
                "any model with a vision_config and an image processor), or drop the image field.")


def image_placeholder(processor: Any) -> str:
    """The text the processor expands into the image's tokens (e.g. '<image>')."""
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str) or not token:
        raise DataError(f"{type(processor).__name__} names no image token (processor.image_token): distillm supports "
                        "processors that expand one image placeholder in the text, as the LLaVA family's do.")
    return token


def _render(record: PromptRecord, processor: Any, use_chat_template: bool) -> str:
    """The prompt text with the image placeholder at the start of the last user turn."""
    placeholder = image_placeholder(processor)
    if not use_chat_template:
        return placeholder + "\n" + "\n".join(message["content"] for message in record.messages)
    messages = [dict(m) for m in record.messages]
    if getattr(processor, "chat_template", None):
        messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        messages[-1]["content"].insert(0, {"type": "image"})
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokenizer = processor.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("neither the processor nor its tokenizer has a chat template, so prompts cannot be formatted "
                        "as chat. Pass --no-chat-template to feed '<image>' + the plain text instead.")
    messages[-1]["content"] = placeholder + "\n" + messages[-1]["content"]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_image_prompts(records: list[ImagePromptRecord], processor: Any, *, max_prompt_length: int,
                         use_chat_template: bool = True) -> list[EncodedPrompt]:
    """Each record rendered and tokenized by the model's processor (image placeholder expanded into image tokens).

    A prompt longer than `max_prompt_length` tokens is an error rather than cut: cutting it would cut the image's
    tokens, which must match the image features one to one."""
    encoded = []
    for record in records:
        text = _render(record, processor, use_chat_template)
        image = open_image(record.image, record.source)
        ids = processor(text=[text], images=[image], add_special_tokens=False)["input_ids"][0]
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if len(ids) > max_prompt_length:
            raise DataError(
                f"{record.source}: the prompt is {len(ids)} tokens with its image's tokens, more than "
                f"--max-prompt-length {max_prompt_length}. Prompts with images are not truncated (the image tokens "
                "must stay whole): raise --max-prompt-length (and --max-length), or shorten the prompt.")
        encoded.append(EncodedPrompt(id=record.id, text=text, input_ids=ids, response=record.response,
                                     image=record.image))
    return encoded


class ImageInputs:
    """Image tensors for rows or image paths, made by the processor's image processor.

    A row's image is its `image` field (rows written by the generation runner carry it) or else the image of the
    prompt with the row's id in `images_by_id`."""

    def __init__(self, processor: Any, images_by_id: Mapping[str, str] | None = None):
        self.processor = processor
        self.images_by_id = dict(images_by_id or {})

    def from_paths(self, paths: Sequence[str]) -> dict[str, torch.Tensor]:
        images = [open_image(path) for path in paths]
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}

    def image_of(self, row: Mapping) -> str:
        path = row.get("image") or self.images_by_id.get(str(row.get("id")))
        if not path:
            raise DistillmError(f"Row {row.get('id')!r} has no image: a vision-language batch needs the image of every "
                                "prompt (rows from another prompt file?).")
        return path

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        return self.from_paths([self.image_of(row) for row in rows])

    @property
    def image_token_id(self) -> int:
        return self.processor.tokenizer.convert_tokens_to_ids(image_placeholder(self.processor))

    def generate_inputs(self, *, rows: Sequence[Mapping] | None = None,
                        paths: Sequence[str] | None = None) -> dict:
        """Arguments of `generate` for a batch: the image tensors, and the image token suppressed -- a sampled
        image token in a response would be one more image placeholder than there are images."""
        inputs = self.from_paths(paths) if paths is not None else self(rows)
        return {**inputs, "suppress_tokens": [self.image_token_id]}
