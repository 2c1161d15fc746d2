"""Issue 18's budget experiment: which bit width and training budget the default demo should use.

One configuration per call: SmolLM2-135M-Instruct as the teacher; the student is the same model with every
linear weight except the (tied) embedding/head fake-quantized by torchao's QAT API (symmetric, group 32, fp16
scales, round-to-nearest start), trained by distillm's own pipeline (`pipeline.run`, with `load_models` replaced
so that it returns this student) on the demo preset with the given overrides. It writes, under --out:

  result.json   held-out figures of the round-to-nearest (RTN) start and of the distilled student (KL, TVD,
                teacher NLL of student samples, distinct-2 of student samples vs the teacher's), the cheap figures
                (KL, TVD) after every round, the time spent per stage (generation per token, training per step),
                and greedy answers of teacher / RTN / distilled on 3 held-out prompts.

Teacher responses (train and held-out) depend only on the teacher, the prompts and the generation settings, so
they are cached in --teacher-cache (keyed by those settings) and copied into each run directory: the runs of a
sweep share one teacher generation, and each run's "teacher generation" time is reported from the first run.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/qat_budget.py --bits 3 --lr 3e-5 --num-prompts 64 \
        --rounds 3 --max-new-tokens 48 --out runs/qat_budget/int3-lr3e-5
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from distillm import pipeline
from distillm.config import load_config
from distillm.evaluation.divergence import teacher_student_divergence
from distillm.evaluation.text import distinct_n
from distillm.io import read_jsonl
from distillm.models import load_model, real_vocab_size

logger = logging.getLogger("distillm")
TIMES: dict[str, float] = {}
COUNTS: dict[str, int] = {}


def add_time(key: str, seconds: float, tokens: int = 0) -> None:
    TIMES[key] = TIMES.get(key, 0.0) + seconds
    COUNTS[key] = COUNTS.get(key, 0) + tokens


def fake_quantize(model: torch.nn.Module, bits: int, group_size: int) -> torch.nn.Module:
    """torchao QAT prepare on every nn.Linear but the output head (tied to the embedding: both stay fp32)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    dtype = {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}[bits]
    weight = IntxFakeQuantizeConfig(dtype=dtype, group_size=group_size, is_symmetric=True,
                                    scale_precision=torch.float16)
    quantize_(model, QATConfig(weight_config=weight, step="prepare"),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"))
    return model


def cache_fake_quantized_weights_for_inference() -> None:
    """Without gradients (generation, evaluation) reuse each layer's fake-quantized weight until an optimizer
    steps: torchao re-quantizes the whole weight at every forward, which for token-by-token generation costs a
    full re-quantization of the model per token. Training forwards (grad enabled) are untouched, so the
    straight-through estimator is as torchao defines it.

    The cache is invalidated by a global optimizer step hook, NOT by the weight's version counter: the Trainer's
    default optimizer (adamw_torch_fused) updates parameters without bumping `_version`, so a version-keyed cache
    silently keeps the round-to-nearest weights (this script's first runs had that bug; see the results file)."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    steps = [0]
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *a, **k: steps.__setitem__(0, steps[0] + 1))
    original = FakeQuantizedLinear.forward

    def forward(self, x):
        if torch.is_grad_enabled() or self.activation_fake_quantizer is not None or self.weight_fake_quantizer is None:
            return original(self, x)
        key = (self.weight.data_ptr(), steps[0])
        cached = getattr(self, "_distillm_cached_weight", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.weight_fake_quantizer(self.weight).detach().clone())
            self._distillm_cached_weight = cached
        return torch.nn.functional.linear(x, cached[1], self.bias)

    FakeQuantizedLinear.forward = forward


@torch.inference_mode()
def greedy(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    out = []
    was_training = model.training
    model.eval()
    for p in prompts:
        ids = torch.tensor([p.input_ids])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--method", default="distillm2")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--scheduler", default="cosine")
    ap.add_argument("--num-eval-prompts", type=int, default=24)
    ap.add_argument("--greedy-prompts", type=int, default=3)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--teacher-cache", default="runs/qat_budget/teacher_cache")
    ap.add_argument("--no-inference-cache", action="store_true",
                    help="re-quantize the weights at every inference forward too (torchao as it is)")
    ap.add_argument("--before-from", default=None,
                    help="a run directory of the same bits and eval settings whose eval/before.json (the RTN start's "
                         "figures: the same student, the same sampling seed) is reused instead of recomputed")
    ap.add_argument("--figures-every", type=int, default=0,
                    help="also log KL/TVD on the first --figures-rows held-out teacher responses every N steps "
                         "(and at step 0): a cheap learning curve")
    ap.add_argument("--figures-rows", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    started = time.time()
    if not args.no_inference_cache:
        cache_fake_quantized_weights_for_inference()

    overrides = {
        "output_dir": args.out, "method": args.method, "learning_rate": args.lr, "num_prompts": args.num_prompts,
        "rounds": args.rounds, "max_new_tokens": args.max_new_tokens, "per_device_train_batch_size": args.batch,
        "warmup_ratio": args.warmup, "lr_scheduler_type": args.scheduler,
        "num_eval_prompts": args.num_eval_prompts, "save_steps": 10_000,
        "max_length": 128 + args.max_new_tokens + 16,
    }
    config = load_config(preset="demo", overrides=overrides)
    paths = pipeline.prepare_run_dir(config)
    cache = Path(args.teacher_cache) / f"n{args.num_prompts}-e{args.num_eval_prompts}-t{args.max_new_tokens}"
    for name in ("teacher_train.jsonl", "teacher_eval.jsonl"):
        if (cache / name).is_file() and not (paths.root / "data" / name).is_file():
            (paths.root / "data").mkdir(parents=True, exist_ok=True)
            shutil.copy(cache / name, paths.root / "data" / name)

    state: dict = {}

    def load_models(cfg):
        t0 = time.time()
        teacher, tokenizer = load_model(cfg.model.teacher, dtype=cfg.model.dtype)
        student = fake_quantize(copy.deepcopy(teacher).float(), args.bits, args.group_size)
        add_time("load_and_quantize", time.time() - t0)
        pair = pipeline.ModelPair(teacher, student, tokenizer, real_vocab_size(tokenizer),
                                  pipeline.loadable_path(cfg.model.teacher))
        state["pair"] = pair
        t0 = time.time()
        prompts = pipeline.load_prompt_set(cfg, tokenizer, "eval")[:args.greedy_prompts]
        state["greedy_prompts"] = prompts
        state["greedy"] = {"prompt": [tokenizer.decode(p.input_ids) for p in prompts],
                           "teacher": greedy(teacher, tokenizer, prompts, args.greedy_tokens),
                           "rtn": greedy(student, tokenizer, prompts, args.greedy_tokens)}
        add_time("greedy_samples", time.time() - t0)
        return pair

    original_generate = pipeline.generate_once

    def generate_once(backend, prompts, out_path, params, tokenizer, desc=""):
        fresh = not Path(out_path).is_file()
        t0 = time.time()
        rows = original_generate(backend, prompts, out_path, params, tokenizer, desc=desc)
        if fresh:
            key = ("generate_teacher" if "teacher" in desc else "generate_eval" if "samples" in desc
                   else "generate_student_rounds")
            add_time(key, time.time() - t0, sum(len(r["response_ids"]) for r in rows))
        return rows

    original_evaluate = pipeline.evaluate

    def evaluate(cfg, models, eval_prompts, teacher_eval_rows, run_paths, tag):
        if tag == "before" and args.before_from:  # wait for the other run's RTN figures (it may still be on them)
            source = Path(args.before_from) / "eval"
            while not (source / "before.json").is_file():
                time.sleep(10)
            run_paths.eval_samples("before").parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / "before_samples.jsonl", run_paths.eval_samples("before"))
            return json.loads((source / "before.json").read_text(encoding="utf-8"))
        t0 = time.time()
        result = original_evaluate(cfg, models, eval_prompts, teacher_eval_rows, run_paths, tag)
        add_time(f"evaluate_{tag}", time.time() - t0)
        return result

    from transformers import TrainerCallback

    class RoundFigures(TrainerCallback):
        """KL / TVD on the held-out teacher responses at the end of every round (cheap: forward passes only)."""

        def __init__(self):
            self.rows = []
            self.curve = []

        def figures(self, rows):
            pair = state["pair"]
            return teacher_student_divergence(pair.teacher, pair.student, rows, vocab_size=pair.vocab_size,
                                              pad_token_id=pair.tokenizer.pad_token_id,
                                              max_length=config.data.max_length)

        def subset_figures(self, step):
            t0 = time.time()
            figures = self.figures(read_jsonl(paths.teacher_eval)[:args.figures_rows])
            self.curve.append({"step": step, **{k: round(v, 4) for k, v in figures.items()}})
            logger.info("curve (first %d held-out rows) at step %d: %s", args.figures_rows, step, self.curve[-1])
            add_time("round_figures", time.time() - t0)

        def on_train_begin(self, a, s, c, **kw):
            if args.figures_every and s.global_step == 0:
                self.subset_figures(0)

        def on_step_end(self, a, s, c, **kw):
            if args.figures_every and s.global_step % args.figures_every == 0:
                self.subset_figures(s.global_step)

        def on_epoch_end(self, a, s, c, model=None, **kw):
            t0 = time.time()
            pair = state["pair"]
            teacher_rows = read_jsonl(paths.teacher_eval)
            figures = teacher_student_divergence(pair.teacher, pair.student, teacher_rows,
                                                 vocab_size=pair.vocab_size,
                                                 pad_token_id=pair.tokenizer.pad_token_id,
                                                 max_length=config.data.max_length)
            self.rows.append({"step": s.global_step, **{k: round(v, 4) for k, v in figures.items()}})
            logger.info("after step %d: %s", s.global_step, self.rows[-1])
            add_time("round_figures", time.time() - t0)

    round_figures = RoundFigures()
    base_trainer = pipeline.DistillTrainer

    class Trainer(base_trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(round_figures)

        def train(self, *a, **kw):
            t0 = time.time()
            out = super().train(*a, **kw)
            add_time("trainer_train_total", time.time() - t0)
            return out

    pipeline.load_models = load_models
    pipeline.generate_once = generate_once
    pipeline.evaluate = evaluate
    pipeline.DistillTrainer = Trainer
    torch.manual_seed(0)
    metrics = pipeline.run(config)

    cache.mkdir(parents=True, exist_ok=True)
    for name in ("teacher_train.jsonl", "teacher_eval.jsonl"):
        if not (cache / name).is_file():
            shutil.copy(paths.root / "data" / name, cache / name)

    pair = state["pair"]
    t0 = time.time()
    state["greedy"]["distilled"] = greedy(pair.student, pair.tokenizer, state["greedy_prompts"], args.greedy_tokens)
    add_time("greedy_samples", time.time() - t0)
    texts = lambda path: [r["response"] for r in read_jsonl(path)]  # noqa: E731
    distinct = {"teacher": distinct_n(texts(paths.teacher_eval)),
                "before": distinct_n(texts(paths.eval_samples("before"))),
                "after": distinct_n(texts(paths.eval_samples("after")))}
    steps = metrics["training"]["steps"]
    train_only = TIMES.get("trainer_train_total", 0) - TIMES.get("generate_student_rounds", 0) \
        - TIMES.get("round_figures", 0)
    timing = {k: round(v, 1) for k, v in TIMES.items()}
    timing["train_seconds_per_step"] = round(train_only / max(steps, 1), 2)
    for key in ("generate_teacher", "generate_student_rounds", "generate_eval"):
        if COUNTS.get(key):
            timing[f"{key}_ms_per_token"] = round(1000 * TIMES[key] / COUNTS[key], 1)
            timing[f"{key}_tokens"] = COUNTS[key]
    result = {"args": vars(args), "steps": steps, "rtn": metrics["before"], "distilled": metrics["after"],
              "distinct2": distinct, "rounds": round_figures.rows,
              "curve": round_figures.curve,
              "mean_loss_per_round": metrics["training"]["mean_loss_per_round"],
              "timing": timing, "wall_seconds": round(time.time() - started, 1),
              "pipeline_wall_seconds": metrics["wall_seconds"], "greedy": state["greedy"],
              "torch_threads": torch.get_num_threads()}
    (paths.root / "result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("steps", "rtn", "distilled", "distinct2", "rounds", "timing")},
                     indent=1))


if __name__ == "__main__":
    main()
