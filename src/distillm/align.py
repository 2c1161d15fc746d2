"""`distillm align`: preference alignment (DPO) of a distilled student with TRL's DPOTrainer.

The distilled student is both the policy's initialisation and the frozen reference model, as in the paper's
"preference alignment on a distilled base" application. Preference rows (prompt or messages, chosen, rejected)
are read with the same readers, chat-template rendering and left truncation as the distillation prompts
(`distillm.data.prompts`) and tokenized as distillm's pipeline does: the prompt ids exactly as the model sees
them when it generates, the response tokenized on its own plus EOS (TRL's own tokenization of prompt + response
as one string can merge tokens across the boundary and cut the prompt's last token). TRL's DPOTrainer does
the rest (collation, the DPO loss, reference log-probs, metrics). The run directory has the same
layout as `distillm run`'s: config.yaml, checkpoints/ (resumed from the last complete one), logs/train_log.jsonl,
student/ (the aligned model, loadable with from_pretrained) and metrics.json.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import AlignConfig, ConfigError
from .data.prompts import DataError, encode_prompts, load_prompts
from .errors import DistillmError
from .io import atomic_write_json, write_jsonl
from .models import load_model
from . import rundir
from .pipeline.paths import RunPaths, prepare_run_dir
from .pipeline.training import training_kwargs
from .training.callbacks import use_step_lines
from .training.trainer import METHOD_STATE_FILE, last_complete_checkpoint

logger = logging.getLogger("distillm")


def resolve_policy(spec: str | None) -> str:
    """The model to align: a `distillm run` directory stands for its distilled student."""
    if not spec:
        raise ConfigError("distillm align needs --policy: the distilled student to align, e.g. "
                          "--policy runs/demo/distillm2 (a run directory) or --policy runs/demo/distillm2/student.")
    root = Path(spec)
    if (root / "config.yaml").is_file() and not (root / "config.json").is_file():
        student = root / "student"
        if not (student / "config.json").is_file():
            raise ConfigError(f"--policy {spec}: this run directory holds no distilled student yet ({student}); finish "
                              "the run first (rerun its `distillm run` command).")
        return str(student)
    return spec


def load_preferences(config: AlignConfig, tokenizer) -> list[dict]:
    """Preference rows as TRL wants them: `prompt` (the chat-templated, left-truncated prompt text), `chosen`,
    `rejected` (plain response text), plus the row's `id`. Errors name the file, the line and the field."""
    d = config.data
    if not d.preferences:
        raise ConfigError("distillm align needs --preferences: a JSONL file with prompt (or messages), chosen and "
                          "rejected fields per line.")
    common = dict(prompt_field=d.prompt_field, messages_field=d.messages_field, id_field=d.id_field,
                  system_prompt=d.system_prompt, limit=d.num_preferences)
    chosen, report = load_prompts(d.preferences, response_field=d.chosen_field, **common)
    rejected, _ = load_prompts(d.preferences, response_field=d.rejected_field, **common)
    for record_c, record_r in zip(chosen, rejected):
        for field, value in ((d.chosen_field, record_c.response), (d.rejected_field, record_r.response)):
            if value is None:
                raise DataError(f"{record_c.source}: no '{field}' response (or it is empty). Every preference row needs "
                                f"a non-empty '{d.chosen_field}' and '{d.rejected_field}' string; set "
                                "--chosen-field/--rejected-field if your columns are named differently.")
        if record_c.response == record_r.response:
            logger.warning("%s: chosen and rejected are identical; the pair carries no preference.", record_c.source)
    encoded, n_truncated = encode_prompts(chosen, tokenizer, max_prompt_length=d.max_prompt_length,
                                          use_chat_template=d.chat_template)
    logger.info("preference pairs: %d from %s (%d prompts truncated, %d empty prompts skipped)", len(encoded),
                report.path, n_truncated, report.n_empty_skipped)
    return [{"id": e.id, "prompt": e.text, "chosen": c.response, "rejected": r.response, "prompt_ids": e.input_ids}
            for e, c, r in zip(encoded, chosen, rejected)]


def tokenize_pairs(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """DPOTrainer's tokenized columns: prompt_ids (as encoded at generation time), chosen_ids and rejected_ids
    (each response tokenized alone, plus EOS). Pairs whose prompt alone fills max_length are dropped."""
    out = []
    for row in rows:
        if len(row["prompt_ids"]) >= max_length:
            continue
        ids = {key: tokenizer(row[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for key in ("chosen", "rejected")}
        out.append({"id": row["id"], "prompt_ids": row["prompt_ids"], "chosen_ids": ids["chosen"],
                    "rejected_ids": ids["rejected"]})
    if len(out) < len(rows):
        logger.warning("%d preference pairs dropped: their prompt alone fills max_length=%d tokens.",
                       len(rows) - len(out), max_length)
    if not out:
        raise DataError(f"No preference pair fits max_length={max_length}: raise --max-length.")
    return out


def _dpo_trainer_class():
    from trl import DPOTrainer  # optional: TRL, heavy, only `distillm align` needs it

    class AlignTrainer(DPOTrainer):
        """TRL's DPOTrainer whose checkpoints end with a completion marker, like DistillTrainer's, so that a
        checkpoint cut off mid-write is passed over on resume (`last_complete_checkpoint`)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # the rows come tokenized (tokenize_pairs); TRL's text tokenization is skipped
            if "chosen_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
                if os.path.isdir(folder):
                    atomic_write_json(os.path.join(folder, METHOD_STATE_FILE), {"method": "dpo"})

    return AlignTrainer


def build_trainer(config: AlignConfig, paths: RunPaths):
    """The DPO trainer: policy and a separately loaded, frozen copy of it as the reference model."""
    from datasets import Dataset  # optional: datasets (pyarrow, pandas) is heavy, only `distillm align` needs it
    from trl import DPOConfig  # optional: TRL, heavy, only `distillm align` needs it

    # TRL 1.16 reads transformers' deprecated gradient-checkpointing names; the warnings are not the user's to fix
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)

    policy_spec = resolve_policy(config.model.policy)
    kwargs = dict(dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code)
    policy, tokenizer = load_model(policy_spec, **kwargs)
    reference, _ = load_model(policy_spec, **kwargs)
    reference.requires_grad_(False).eval()
    rows = load_preferences(config, tokenizer)
    pairs = tokenize_pairs(rows, tokenizer, config.data.max_length)
    args = DPOConfig(**training_kwargs(config, paths, num_rows=len(pairs)), beta=config.dpo.dpo_beta,
                     loss_type=config.dpo.dpo_loss_type, max_length=config.data.max_length)
    set_seed(config.training.seed)
    dataset = Dataset.from_list(pairs)
    trainer = _dpo_trainer_class()(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                                   processing_class=tokenizer)
    use_step_lines(trainer)  # one console line per logging step, not the log dicts inside tqdm bars
    return trainer, rows


def align(config: AlignConfig, *, overwrite: bool = False) -> dict:
    """Run DPO on the preference pairs; resumes from the last complete checkpoint. Returns the metrics."""
    start = time.time()
    resolve_policy(config.model.policy)  # fail before anything is written
    paths = prepare_run_dir(config, overwrite=overwrite, kind="align")
    try:
        return _align(config, paths, start)
    finally:
        rundir.unlock(paths.root)


def _align(config: AlignConfig, paths: RunPaths, start: float) -> dict:
    # the preference file's bytes: checkpoints made from other pairs are not continued on these
    inputs = {"preferences": rundir.digest_path(config.data.preferences)}
    rundir.check_inputs(paths.root, config, inputs, keys=("preferences",))
    rundir.record_inputs(paths.root, inputs)
    trainer, rows = build_trainer(config, paths)
    last = last_complete_checkpoint(paths.checkpoints)
    if last:
        logger.info("Resuming DPO from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    loss = [entry for entry in trainer.state.log_history if "loss" in entry]
    if not loss or not all(torch.isfinite(torch.tensor(entry["loss"])) for entry in loss):
        raise DistillmError(f"DPO produced no finite loss (see {paths.checkpoints}); lower --learning-rate or check "
                            f"{config.data.preferences}.")
    trainer.save_model(str(paths.student))
    write_jsonl(paths.train_log, loss)
    keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
    metrics = {
        "policy": resolve_policy(config.model.policy),
        "pairs": len(rows),
        "steps": trainer.state.global_step,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "first": {k: loss[0].get(k) for k in keys},
        "last": {k: loss[-1].get(k) for k in keys},
        "log": str(paths.train_log.relative_to(paths.root)),
        "wall_seconds": round(time.time() - start, 1),
    }
    atomic_write_json(paths.metrics, metrics)
    return metrics
