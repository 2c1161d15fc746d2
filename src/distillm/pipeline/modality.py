"""What differs between text, vision-language and cross-tokenizer runs, as one variant object per modality that
every stage calls.

The driver picks the variant once (`modality_for`) and hands it to the stages; none of them asks again whether the
run has a processor or two tokenizers. A modality answers, for its kind of run:

    check(config)                  what it refuses, before anything is loaded
    open(config)                   the tokenizer, as early and cheaply as the modality allows (text: the tokenizer
                                   alone, the chat template checked; vision: the models, whose processor the
                                   prompts need; cross: both tokenizers and their shared vocabulary)
    load_prompt_set(...)           the train / eval prompts, encoded
    input_digests()                what else the run directory records of its inputs
    load_models(config, tokenizer) the run's ModelPair (after the cheap checks, for text)
    check_remote_teacher()         whether --teacher-url can serve this run
    teacher_tokenizer / teacher_vocab_size / teacher_service
                                   what the served teacher is checked against (its tokenizer), the size of its
                                   vocabulary, and the trainer's view of its scores
    teacher_backend / data_context / teacher_eval
                                   the teacher's generation, the methods' DataContext, the held-out responses
    describe()                     what metrics.json says of the modality
    evaluate(...)                  the before/after evaluation
    backend(...)                   the generation backend for a model
    saves_weights_for_generation   whether generation reads the student from a saved directory (vLLM)
    load_student(path)             the finished student, reloaded by a resumed run
    image_inputs(prompts)          the batches' image tensors (None for text)
    collator(...)                  the training batches
    check_teacher_cache()          whether --teacher-cache can serve this run
    teacher_cache_sequences(...)   the fixed sequences as the teacher reads them, and its pad id (the cache's build)
    trainer(models)                the Trainer class and its extra keywords
    processing_class(tokenizer)    what the Trainer saves beside the student

Text, vision-language (`distillm.vision`) and cross-tokenizer runs (`pipeline.cross`, the teacher with a tokenizer
of its own) are the three variants.
"""

from __future__ import annotations

from .. import rundir
from ..config import RunConfig
from ..crosstok.trainer import CrossDistillTrainer, CrossRemoteScores
from ..crosstok.vocab import CrossTokenizerError
from ..data.prompts import DataError, check_chat_template
from ..data.vision import ImageInputs
from ..errors import DistillmError
from ..generation.factory import (TEACHER_EVAL_SEED, eval_seed_offset, generate_once, make_backend,
                                  sampling_params)
from ..generation.vllm_backend import choose_backend_name
from ..models import ModelPair, load_model, load_tokenizer, real_vocab_size
from ..training.collate import DistillCollator
from ..training.trainer import DistillTrainer
from ..training.vision import VisionCollator
from ..vision import load_image_prompt_set, load_vision_model, load_vision_models, uses_images
from .cross import (build_setup, check_cross_run, cross_data_context, cross_evaluate,
                    cross_teacher_eval, cross_tokenizers, load_cross_models, paired_prompts)
from .data import DataContext
from .evaluate import evaluate
from .setup import load_prompt_set, load_text_models


class TextModality:
    """A text run: one tokenizer shared by teacher and student."""

    name = "text"

    def check(self, config: RunConfig) -> None:
        pass

    def open(self, config: RunConfig):
        # the tokenizer alone (seconds) settles the prompt format and the step count before the weights are read
        tokenizer = load_tokenizer(config.model.teacher, trust_remote_code=config.model.trust_remote_code)
        check_chat_template(tokenizer, config.data.chat_template, model=config.model.teacher)
        return tokenizer

    def load_models(self, config: RunConfig, tokenizer=None) -> ModelPair:
        return load_text_models(config, tokenizer)

    def load_prompt_set(self, config: RunConfig, tokenizer, which: str):
        return load_prompt_set(config, tokenizer, which)

    def input_digests(self) -> dict:
        return {}

    def check_remote_teacher(self) -> None:
        pass

    def teacher_tokenizer(self, tokenizer):
        """The tokenizer the --teacher-url server must share (the teacher's: the rows' here)."""
        return tokenizer

    def teacher_vocab_size(self, models: ModelPair) -> int:
        """The teacher's vocabulary (the ids a served teacher may send)."""
        return models.vocab_size

    def teacher_service(self, service, models: ModelPair):
        """The served teacher's scores as the trainer takes them (`teacher.remote.RemoteScores`)."""
        return service

    def teacher_backend(self, config: RunConfig, models: ModelPair):
        return self.backend(config, models.teacher, models.tokenizer, model_dir=models.teacher_path)

    def data_context(self, config: RunConfig, models: ModelPair, prompts, paths, backend) -> DataContext:
        return DataContext(config, models.tokenizer, prompts, paths, backend)

    def teacher_eval(self, config: RunConfig, models: ModelPair, backend, eval_prompts, paths, *,
                     sample: int = 0) -> list[dict]:
        """The teacher's responses to the held-out prompts; `sample` > 0: --eval-samples' further sets."""
        return generate_once(backend, eval_prompts, paths.teacher_eval_sample(sample),
                             sampling_params(config, seed_offset=eval_seed_offset(TEACHER_EVAL_SEED, sample)),
                             models.tokenizer,
                             desc="teacher responses (held-out)" + (f", set {sample}" if sample else ""))

    def describe(self) -> dict:
        return {}

    def evaluate(self, config: RunConfig, models: ModelPair, eval_prompts, teacher_eval_rows, paths, tag: str, *,
                 teacher_client=None, teacher_samples=None):
        # teacher_client: --teacher-url's client (the teacher's figures from the server), or None;
        # teacher_samples: the teacher's --eval-samples sets (the first is teacher_eval_rows), or None
        return evaluate(config, models, eval_prompts, teacher_eval_rows, paths, tag, modality=self,
                        teacher_client=teacher_client, teacher_samples=teacher_samples)

    def backend(self, config: RunConfig, model, tokenizer, *, model_dir: str | None):
        return make_backend(config, model, tokenizer, model_dir=model_dir)

    def saves_weights_for_generation(self, config: RunConfig) -> bool:
        return choose_backend_name(config.generation.backend) == "vllm"

    def load_student(self, path):
        return load_model(str(path), dtype="float32")[0]

    def image_inputs(self, prompts=None):
        return None

    def collator(self, config: RunConfig, models: ModelPair, method, image_inputs):
        return DistillCollator(models.tokenizer.pad_token_id, config.data.max_length, method.sequences)

    def check_teacher_cache(self) -> None:
        pass

    def teacher_cache_sequences(self, models: ModelPair, sequences: list) -> tuple[list, int]:
        # one tokenizer: the teacher reads the rows' own ids
        return sequences, models.tokenizer.pad_token_id

    def trainer(self, models: ModelPair):
        return DistillTrainer, {}

    def processing_class(self, tokenizer):
        return tokenizer


class VisionModality(TextModality):
    """A vision-language run (`distillm.vision`): (image, prompt) rows tokenized by the teacher's processor, images
    in generation and in every batch."""

    name = "vision"

    def __init__(self, processor=None):
        self.processor = processor
        self._models: ModelPair | None = None

    def open(self, config: RunConfig):
        # the prompts need the vision-language model's processor: the models are loaded first
        self._models = load_vision_models(config)
        self.processor = self._models.processor
        return self._models.tokenizer

    def load_models(self, config: RunConfig, tokenizer=None) -> ModelPair:
        if self._models is None:
            self.open(config)
        return self._models

    def load_prompt_set(self, config: RunConfig, tokenizer, which: str):
        # (image, prompt) rows, tokenized by the vision-language model's processor
        return load_image_prompt_set(config, self.processor, which)

    def check_remote_teacher(self) -> None:
        raise DistillmError("--teacher-url does not take images: vision-language runs need the local teacher.")

    def backend(self, config: RunConfig, model, tokenizer, *, model_dir: str | None):
        return make_backend(config, model, tokenizer, model_dir=model_dir, processor=self.processor)

    def saves_weights_for_generation(self, config: RunConfig) -> bool:
        return False  # generation runs on the live student (transformers)

    def load_student(self, path):
        return load_vision_model(str(path), dtype="float32")[0]

    def image_inputs(self, prompts=None):
        # each row's image (its own `image` field, or its prompt's), batched by the processor
        return ImageInputs(self.processor, None if prompts is None else {p.id: p.image for p in prompts})

    def collator(self, config: RunConfig, models: ModelPair, method, image_inputs):
        return VisionCollator(models.tokenizer.pad_token_id, config.data.max_length, image_inputs, method.sequences)

    def check_teacher_cache(self) -> None:
        # the teacher's scores depend on the image, which the cache keys leave out
        raise DistillmError("--teacher-cache is not supported for vision-language runs yet; run without it.")

    def processing_class(self, tokenizer):
        return self.processor


class CrossModality(TextModality):
    """A teacher and a student with different tokenizers (`pipeline.cross`): prompts rendered per side, the
    teacher's responses generated in its own tokens and carried over to the student's, the models' `cross` setup
    makes the batches (both sides' ids + the byte alignment), its Trainer scores the teacher in its own tokens, and
    the evaluation is in the aligned space (`cross_evaluate`)."""

    name = "cross"

    def __init__(self, teacher_tok, student_tok):
        self.teacher_tok, self.student_tok = teacher_tok, student_tok
        self.setup = None
        self.teacher_prompts: dict[str, dict] = {}  # train / eval: the teacher's rendering of each prompt, by id

    def check(self, config: RunConfig) -> None:
        check_cross_run(config)

    def open(self, config: RunConfig):
        self.setup = build_setup(config, self.teacher_tok, self.student_tok)
        return self.student_tok  # the rows' tokens are the student's

    def load_prompt_set(self, config: RunConfig, tokenizer, which: str):
        prompts, self.teacher_prompts[which] = paired_prompts(config, self.setup, which)
        if which == "train" and not prompts:
            raise DataError(f"No training prompt could be rendered for both models from {config.data.prompts}.")
        return prompts

    def input_digests(self) -> dict:
        return {"teacher_train_encoded": rundir.encoded_digest(list(self.teacher_prompts["train"].values()))}

    def load_models(self, config: RunConfig, tokenizer=None) -> ModelPair:
        if self.setup is None:
            self.open(config)
        return load_cross_models(config, self.setup)

    def check_remote_teacher(self) -> None:
        pass  # check() refuses what a served teacher cannot do across tokenizers

    def teacher_tokenizer(self, tokenizer):
        return self.teacher_tok  # the server serves the teacher: its ids are the teacher's

    def teacher_vocab_size(self, models: ModelPair) -> int:
        return real_vocab_size(self.teacher_tok)

    def teacher_service(self, service, models: ModelPair):
        return CrossRemoteScores(service, models.cross)  # the teacher's side of each batch, in its own ids

    def teacher_backend(self, config: RunConfig, models: ModelPair):
        return make_backend(config, models.teacher, self.teacher_tok, model_dir=None)

    def data_context(self, config: RunConfig, models: ModelPair, prompts, paths, backend) -> DataContext:
        return cross_data_context(config, self.setup, prompts, self.teacher_prompts["train"], paths, backend)

    def teacher_eval(self, config: RunConfig, models: ModelPair, backend, eval_prompts, paths, *,
                     sample: int = 0) -> list[dict]:
        return cross_teacher_eval(config, self.setup, backend, eval_prompts, self.teacher_prompts["eval"], paths,
                                  sample=sample)

    def describe(self) -> dict:
        vmap = self.setup.vmap
        return {"cross_tokenizer": {"teacher_vocab": vmap.teacher_size, "student_vocab": vmap.student_size,
                                    "shared_vocab": int(vmap.teacher_ids.numel())}}

    def evaluate(self, config: RunConfig, models: ModelPair, eval_prompts, teacher_eval_rows, paths, tag: str, *,
                 teacher_client=None, teacher_samples=None):
        return cross_evaluate(config, models, eval_prompts, teacher_eval_rows, paths, tag,
                              teacher_client=teacher_client, teacher_samples=teacher_samples)

    def collator(self, config: RunConfig, models: ModelPair, method, image_inputs):
        return models.cross.collator(config.data.max_length, method.sequences)

    def teacher_cache_sequences(self, models: ModelPair, sequences: list) -> tuple[list, int]:
        # the teacher's own ids (its prompt rendering, its sampled response ids), keyed as its side of a batch is
        return [models.cross.teacher_sequence(p, r) for p, r in sequences], self.teacher_tok.pad_token_id

    def trainer(self, models: ModelPair):
        return CrossDistillTrainer, {"cross": models.cross}


def modality_for(config: RunConfig) -> TextModality:
    """The run's modality, from its models: cross-tokenizer when the --student's vocabulary differs from the
    teacher's (`cross.cross_tokenizers`, under --cross-tokenizer auto); vision-language when the teacher is one
    (`vision.uses_images`, which also refuses a text teacher given a vision-language student or image rows); else
    text."""
    pair = cross_tokenizers(config)  # (teacher, student) tokenizers when their vocabularies differ, else None
    if pair is not None:
        return CrossModality(*pair)
    return VisionModality() if uses_images(config) else TextModality()


def load_models(config: RunConfig, tokenizer=None) -> ModelPair:
    """The run's models (text or vision-language, `modality_for`); `tokenizer`: the teacher's, for a text run
    whose tokenizer `load_tokenizer` has loaded already."""
    return modality_for(config).load_models(config, tokenizer)
