"""Vision-language distillation on tiny random LLaVA-style models: (image, prompt) rows, images batched by the
processor, a response-only loss mask, pixel values in both models' forwards, training that lowers the loss, an
end-to-end `distillm run`, and clear errors for bad inputs."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

from tolerances import forward_atol, model_atol
from distillm.cli import main
from distillm.config import load_config
from distillm.data.prompts import DataError
from distillm.data.vision import encode_image_prompts, load_image_prompts
from distillm.generation.base import SamplingParams
from distillm.generation.vision import VisionHFBackend
from distillm.methods import build_method
from distillm.models import ModelLoadError
from distillm.testing.tiny_vision import IMAGE_TOKEN, build_tiny_processor, write_tiny_vlm_setup
from distillm.training.collate import IGNORE, RowDataset
from distillm.training.trainer import DistillTrainer
from distillm.data.vision import ImageInputs
from distillm.training.vision import VisionCollator
from distillm.vision import (
    check_same_image_layout, is_vision_model, load_vision_model, prune_vision_layers, uses_images,
)

N_IMAGE_TOKENS = 16  # tiny_vision: 16x16 pixels, patch 4, CLS dropped


def _whole_depth(config):
    """A vision-language model's chain for tolerances.forward_atol: the vision tower's layers, the projector and
    the language model's layers, with the widest of their projections."""
    from types import SimpleNamespace

    text, vision = config.text_config, config.vision_config
    return SimpleNamespace(num_hidden_layers=text.num_hidden_layers + vision.num_hidden_layers + 1,
                           hidden_size=max(text.hidden_size, vision.hidden_size),
                           intermediate_size=max(text.intermediate_size, vision.intermediate_size))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_vlm_setup(tmp_path_factory.mktemp("tiny-vlm"), num_prompts=8, num_eval_prompts=2)


@pytest.fixture(scope="module")
def models(setup):
    teacher, processor = load_vision_model(setup["teacher"], dtype="float32")
    student, _ = load_vision_model(setup["student"], dtype="float32")
    return teacher, student, processor


@pytest.fixture(scope="module")
def prompts(setup, models):
    records, _ = load_image_prompts(setup["prompts"])
    return encode_image_prompts(records, models[2], max_prompt_length=96)


@pytest.fixture(scope="module")
def pair_rows(models, prompts):
    """(teacher response, student response) rows as DistiLLM-2 trains on, sampled with the images."""
    teacher, student, processor = models
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
    ids, images = [p.input_ids for p in prompts], [p.image for p in prompts]
    chosen = VisionHFBackend(teacher, processor).generate_batch(ids, params, seed=1, images=images)
    rejected = VisionHFBackend(student, processor).generate_batch(ids, params, seed=2, images=images)
    return [{"id": p.id, "prompt_ids": p.input_ids, "chosen_ids": c.token_ids, "rejected_ids": r.token_ids,
             "response_ids": c.token_ids, "image": p.image} for p, c, r in zip(prompts, chosen, rejected)]


def config_for(method, **overrides):
    return load_config(overrides={"method": method, "max_prompt_length": 96, "max_length": 128, **overrides})


def make_trainer(tmp_path, models, rows, method, *, steps, lr=3e-3, batch=4):
    teacher, student, processor = models
    args = TrainingArguments(
        output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", seed=0, report_to=[], save_strategy="no",
        logging_steps=1, remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
    )
    collator = VisionCollator(processor.tokenizer.pad_token_id, 128, ImageInputs(processor), method.sequences)
    return DistillTrainer(model=student, teacher=teacher, method=method, vocab_size=len(processor.tokenizer),
                          args=args, train_dataset=RowDataset(rows), data_collator=collator)


# ------------------------------------------------------------------------------------------------ data


def test_prompts_expand_one_image_into_its_tokens(models, prompts, setup):
    processor = models[2]
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    first = json.loads(setup["prompts"].read_text().splitlines()[0])
    assert prompts[0].image == str((setup["prompts"].parent / first["image"]).resolve())
    for prompt in prompts:
        assert prompt.input_ids.count(image_id) == N_IMAGE_TOKENS
        assert prompt.text.endswith("<|im_start|>assistant\n")  # the processor's chat template, generation prompt on


def test_loss_mask_covers_response_tokens_only(models, pair_rows):
    processor = models[2]
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = pair_rows[:3]
    batch = VisionCollator(processor.tokenizer.pad_token_id, 128, ImageInputs(processor),
                           build_method(config_for("distillm2")).sequences)(rows)
    sequences = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    width = batch["input_ids"].shape[1]
    assert batch["pixel_values"].shape == (6, 3, 16, 16)  # one image per sequence: the chosen ones, then rejected
    for i, (prompt, response) in enumerate(sequences):
        expected = [False] * width
        for position in range(width - len(response), width):  # left padding: the response is the last columns
            expected[position] = True
        labelled = (batch["labels"][i] != IGNORE).tolist()
        assert labelled == expected
        assert batch["labels"][i][batch["labels"][i] != IGNORE].tolist() == response
        assert image_id not in batch["labels"][i].tolist()
        image_positions = (batch["input_ids"][i] == image_id).nonzero().flatten().tolist()
        assert len(image_positions) == N_IMAGE_TOKENS and not any(expected[p] for p in image_positions)
    # the same images as the processor gives for each row's image, in the sequences' order
    direct = processor.image_processor(images=[_open(r["image"]) for r in rows + rows], return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], direct["pixel_values"], rtol=0, atol=0)  # the same processing


def _open(path):
    from distillm.data.vision import open_image

    return open_image(path)


def test_the_loss_sees_response_tokens_only(tmp_path, models, pair_rows):
    """The targets the method's loss gets are exactly each sequence's response tokens."""
    method = build_method(config_for("kd"))
    trainer = make_trainer(tmp_path, models, pair_rows, method, steps=1)
    batch = trainer.data_collator(pair_rows[:4])
    inputs = trainer.method_inputs(trainer.model, batch, trainer._get_num_items_in_batch([batch], "cpu"))
    for i, row in enumerate(pair_rows[:4]):
        targets = inputs.targets[i]
        assert targets[targets != IGNORE].tolist() == row["response_ids"]
        assert inputs.mask[i].sum().item() == len(row["response_ids"])


def test_pixel_values_reach_teacher_and_student(tmp_path, models, pair_rows):
    teacher, student, _ = models
    method = build_method(config_for("distillm2"))
    trainer = make_trainer(tmp_path, models, pair_rows, method, steps=1)
    seen = {}

    def recorder(name):
        def hook(module, args, kwargs):
            seen[name] = args[0] if args else kwargs["pixel_values"]
        return hook

    hooks = [model.model.vision_tower.register_forward_pre_hook(recorder(name), with_kwargs=True)
             for name, model in (("teacher", teacher), ("student", student))]
    try:
        batch = trainer.data_collator(pair_rows[:2])
        loss = trainer.compute_loss(trainer.model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.isfinite(loss)
    for name in ("teacher", "student"):
        torch.testing.assert_close(seen[name].float(), batch["pixel_values"], rtol=0, atol=0)  # passed on as they are


@pytest.mark.parametrize("method_name", ["distillm2", "kd"])
def test_training_lowers_the_loss(tmp_path, models, pair_rows, method_name):
    """A few optimizer steps on the same batch: the method's (fixed: no curriculum, no b ramp) loss goes down."""
    teacher, student, processor = models
    student = prune_vision_layers(student, [0, 1])  # a fresh copy: the module's student stays untouched
    method = build_method(config_for(method_name, curriculum=False, b_ramp=False))
    trainer = make_trainer(tmp_path, (teacher, student, processor), pair_rows[:4], method, steps=6, lr=1e-2)
    batch = trainer.data_collator(pair_rows[:4])

    def loss_now():
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    before = loss_now()
    trainer.train()
    after = loss_now()
    assert after < 0.9 * before, (before, after)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 6 and logged[-1] < logged[0]


# ------------------------------------------------------------------------------------------------ generation


def test_generation_passes_images_and_never_samples_the_image_token(models, prompts):
    teacher, _, processor = models
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    seen = []
    hooks = [teacher.model.vision_tower.register_forward_pre_hook(lambda module, args: seen.append(args[0])),
             # make the image token the model's favourite: generation must still never sample it
             teacher.lm_head.register_forward_hook(lambda module, args, out: out.index_add(
                 -1, torch.tensor([image_id]), torch.full((*out.shape[:-1], 1), 100.0)))]
    try:
        completions = VisionHFBackend(teacher, processor).generate_batch(
            [p.input_ids for p in prompts[:3]], SamplingParams(temperature=0, max_new_tokens=5), seed=0,
            images=[p.image for p in prompts[:3]])
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and seen[0].shape == (3, 3, 16, 16)
    assert all(len(c.token_ids) == 5 and image_id not in c.token_ids for c in completions)


def test_different_images_give_different_responses(models, prompts):
    """The image matters: the same text with two different images gives different teacher logits."""
    teacher, _, processor = models
    by_text = {}
    for p in prompts:
        by_text.setdefault(p.input_ids and tuple(p.input_ids), []).append(p)
    same_text = next(group for group in by_text.values() if len({p.image for p in group}) > 1)
    ids = torch.tensor([same_text[0].input_ids, same_text[1].input_ids])
    pixels = ImageInputs(processor).from_paths([same_text[0].image, same_text[1].image])
    with torch.no_grad():
        logits = teacher(input_ids=ids, **pixels).logits[:, -1]
    # far beyond what fp32 rounding alone could make of the same input
    assert (logits[0] - logits[1]).abs().max() > 10 * forward_atol(_whole_depth(teacher.config), logits)


# ------------------------------------------------------------------------------------------------ end to end


def test_distillm_run_on_tiny_vlms_saves_a_student_that_loads(tmp_path, setup):
    out = tmp_path / "run"
    code = main(["-q", "run", "--preset", "tiny", "--teacher", str(setup["teacher"]), "--student",
                 str(setup["student"]), "--prompts", str(setup["prompts"]), "--eval-prompts",
                 str(setup["eval_prompts"]), "--rounds", "2", "--max-new-tokens", "6", "--output-dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["training"]["steps"] == 4
    assert metrics["after"]["kl"] < metrics["before"]["kl"]
    teacher_rows = [json.loads(line) for line in (out / "data" / "teacher_train.jsonl").read_text().splitlines()]
    assert all(row["image"].endswith(".png") for row in teacher_rows)
    assert (out / "rounds" / "round_1" / "pairs.jsonl").is_file()  # the student's responses were regenerated
    model = AutoModelForImageTextToText.from_pretrained(out / "student")
    processor = AutoProcessor.from_pretrained(out / "student")
    inputs = processor(text=[IMAGE_TOKEN + "\nWhat colour?"], images=[_open(teacher_rows[0]["image"])],
                       return_tensors="pt")
    assert model.config.text_config.num_hidden_layers == 2
    assert torch.isfinite(model(**inputs).logits).all()
    # cut off after training: the rerun resumes from the last checkpoint, reusing the generated rows (and images)
    import shutil

    shutil.rmtree(out / "student")
    (out / "metrics.json").unlink()
    assert main(["-q", "run", "--preset", "tiny", "--teacher", str(setup["teacher"]), "--student",
                 str(setup["student"]), "--prompts", str(setup["prompts"]), "--eval-prompts",
                 str(setup["eval_prompts"]), "--rounds", "2", "--max-new-tokens", "6", "--output-dir", str(out)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["training"]["steps"] == 4 and resumed["before"] == metrics["before"]
    # the same student (training resumed to the same weights), its KL over the held-out prompts' tokens (2 x 6)
    student_config = _whole_depth(AutoModelForImageTextToText.from_pretrained(out / "student").config)
    assert resumed["after"]["kl"] == pytest.approx(metrics["after"]["kl"], rel=0,
                                                   abs=model_atol(student_config, 2 * 6, metrics["after"]["kl"]))


def test_student_derived_from_a_vlm_teacher_keeps_the_vision_tower(models, prompts):
    teacher, _, processor = models
    same = prune_vision_layers(teacher, "0-3")  # all layers: the same model
    half = prune_vision_layers(teacher, [0, 3])
    assert half.config.text_config.num_hidden_layers == 2
    ids = torch.tensor([prompts[0].input_ids])
    pixels = ImageInputs(processor).from_paths([prompts[0].image])
    with torch.no_grad():
        expected = teacher(input_ids=ids, **pixels).logits
        torch.testing.assert_close(same(input_ids=ids, **pixels).logits, expected, rtol=0,
                                   atol=forward_atol(_whole_depth(teacher.config), expected))
    for name, tensor in teacher.model.vision_tower.state_dict().items():
        torch.testing.assert_close(half.model.vision_tower.state_dict()[name], tensor, rtol=0, atol=0)  # copied


# ------------------------------------------------------------------------------------------------ bad inputs


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_missing_image_file_names_file_and_line(tmp_path, setup):
    prompts = write_rows(tmp_path / "p.jsonl", [{"image": str(setup["images"] / "img_0.png"), "prompt": "a"},
                                                {"image": "nowhere/missing.png", "prompt": "b"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'image': image file not found: .*missing\.png"):
        load_image_prompts(prompts)


def test_unreadable_image_names_file_and_line(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    prompts = write_rows(tmp_path / "p.jsonl", [{"image": "broken.png", "prompt": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'image': cannot read image .*broken\.png"):
        load_image_prompts(prompts)


def test_row_without_image_is_named(tmp_path, setup, capsys):
    prompts = write_rows(tmp_path / "p.jsonl", [{"image": str(setup["images"] / "img_0.png"), "prompt": "a"},
                                                {"prompt": "b", "picture": "img_1.png"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: no image: field 'image' is missing .*fields present: prompt, "
                                        r"picture.*--image-field"):
        load_image_prompts(prompts)
    # the right field name fixes it; the path is relative to the prompt file's folder
    (tmp_path / "img.png").write_bytes((setup["images"] / "img_1.png").read_bytes())
    rows, _ = load_image_prompts(write_rows(tmp_path / "q.jsonl", [{"prompt": "b", "picture": "img.png"}]),
                                 image_field="picture")
    assert rows[0].image == str((tmp_path / "img.png").resolve())


def test_text_only_model_given_image_rows_is_a_clear_error(tmp_path, setup, capsys):
    code = main(["run", "--preset", "tiny", "--prompts", str(setup["prompts"]), "--output-dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl:1: the row has an image (field 'image')" in err and "text-only" in err
    config = load_config(preset="tiny", overrides={"prompts": "builtin:train"})
    assert uses_images(config) is False  # text rows, text model: fine


def test_vlm_teacher_with_text_student_or_mismatched_images_is_refused(tmp_path, setup):
    config = load_config(preset="tiny", overrides={"teacher": str(setup["teacher"]), "student": "tiny-random",
                                                   "prompts": str(setup["prompts"])})
    assert is_vision_model(setup["teacher"]) and not is_vision_model("tiny-random")
    from distillm.vision import load_vision_models

    with pytest.raises(ModelLoadError, match="text-only"):
        load_vision_models(config)
    processor = build_tiny_processor()
    other = build_tiny_processor()
    other.patch_size = 8  # 4 image tokens per image instead of 16
    check_same_image_layout(processor, build_tiny_processor())
    with pytest.raises(ModelLoadError, match="tokenize an image differently"):
        check_same_image_layout(processor, other)


def test_builtin_prompts_have_no_images(models):
    with pytest.raises(DataError, match="built-in prompts have no images"):
        load_image_prompts("builtin:train")


def test_generate_then_train_a_vlm_from_teacher_responses(tmp_path, setup):
    """`distillm generate` samples a VLM with the images; `distillm train` reuses those responses (kd)."""
    responses = tmp_path / "teacher.jsonl"
    assert main(["-q", "generate", "--model", str(setup["teacher"]), "--prompts", str(setup["prompts"]),
                 "--output", str(responses), "--max-new-tokens", "5", "--num-prompts", "4"]) == 0
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(rows) == 4 and all(row["image"].endswith(".png") and row["response_ids"] for row in rows)
    out = tmp_path / "train"
    assert main(["-q", "train", "--preset", "tiny", "--method", "kd", "--teacher", str(setup["teacher"]),
                 "--student", str(setup["student"]), "--prompts", str(setup["prompts"]), "--num-prompts", "4",
                 "--teacher-responses", str(responses), "--rounds", "1", "--output-dir", str(out)]) == 0
    imported = [json.loads(line) for line in (out / "data" / "teacher_train.jsonl").read_text().splitlines()]
    assert [row["response_ids"] for row in imported] == [row["response_ids"] for row in rows]
    assert (out / "student" / "model.safetensors").is_file()


def test_a_vlm_teacher_gets_the_vision_modality(setup):
    from distillm.pipeline import VisionModality, modality_for

    config = load_config(preset="tiny", overrides={"teacher": str(setup["teacher"]), "prompts": str(setup["prompts"]),
                                                   "eval_prompts": str(setup["eval_prompts"])})
    modality = modality_for(config)
    assert isinstance(modality, VisionModality)
    tokenizer = modality.open(config)  # the models first: the prompts need the processor
    assert modality.processor is not None and tokenizer is modality.processor.tokenizer
    assert modality.load_models(config, tokenizer).processor is modality.processor  # loaded once
    assert modality.processing_class(tokenizer) is modality.processor


def test_vlm_student_derived_with_student_layers(setup):
    from distillm.vision import load_vision_models

    config = load_config(preset="tiny", overrides={"teacher": str(setup["teacher"]), "student_layers": "0,3",
                                                   "prompts": str(setup["prompts"])})
    pair = load_vision_models(config)
    assert pair.processor is not None and pair.student.config.text_config.num_hidden_layers == 2
    assert pair.vocab_size == len(pair.processor.tokenizer)
    with pytest.raises(Exception, match="does not run on vision-language models"):
        load_vision_models(load_config(preset="tiny", overrides={"teacher": str(setup["teacher"]),
                                                                 "method": "speculative-kd"}))


def test_on_policy_sampling_from_the_live_student_uses_the_images(models, prompts):
    """gkd / imitkd / minillm draw fresh student responses inside the trainer: with the rows' images."""
    from distillm.training.sources import OnlineSampler

    teacher, student, processor = models
    rows = [{"id": p.id, "prompt_ids": p.input_ids, "response_ids": []} for p in prompts[:3]]
    seen = []
    hook = student.model.vision_tower.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        sampler = OnlineSampler(student, teacher, processor.tokenizer, SamplingParams(max_new_tokens=4),
                                len(processor.tokenizer),
                                image_inputs=ImageInputs(processor, {p.id: p.image for p in prompts}))
        drawn = sampler.bound(student, 5).student(rows)
    finally:
        hook.remove()
    assert seen and seen[0].shape[0] == 3
    assert len(drawn) == 3 and all(row["response_ids"] for row in drawn)


def test_text_only_commands_name_a_vlm_as_such(setup):
    from distillm.models import load_model

    with pytest.raises(ModelLoadError, match="is a vision-language model: `distillm run`, `train` and `generate`"):
        load_model(setup["teacher"])
