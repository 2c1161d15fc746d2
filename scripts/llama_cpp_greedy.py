"""Greedy answers of a run's exported GGUF in llama.cpp, beside the torch student it was written from.

    python scripts/llama_cpp_greedy.py runs/demo/distillm2 [--prompt TEXT ...] [--max-new-tokens 48]

Needs llama-cpp-python (`pip install 'distillm[llama]'`, builds llama.cpp from source in about 4 minutes on 2
cores). Both runtimes decode greedily from the student's chat template; the script prints, per prompt, how many
greedy tokens agree before the first difference and both texts. llama.cpp quantizes activations to Q8_0 inside
its Q4_0 matrix products, so its logits are not torch's even though the weights are identical, and the texts part
at near-ties (docs/export-gguf.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROMPTS = [
    "Explain why bread dough rises in simple words.",
    "Give a simple definition of 'gravity'.",
    "List three things you should pack for a day at the beach.",
    "What is the capital of France?",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a run's --output-dir (holding student/ and student/student.gguf)")
    ap.add_argument("--prompt", action="append", help="a user message (repeatable; default: four built-in ones)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    student, gguf = args.run_dir / "student", args.run_dir / "student" / "student.gguf"
    for path in (student / "config.json", gguf):
        if not path.is_file():
            sys.exit(f"{path} not found: pass the --output-dir of a finished run with --student-quant")
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install 'distillm[llama]' (builds from source)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillm.export.llama_cpp import chat_ids, first_divergence, greedy

    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, torch_dtype=torch.float32).eval()
    llm = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=max(1, torch.get_num_threads()), logits_all=True,
                          verbose=False)
    eos, n = tok.eos_token_id, args.max_new_tokens
    for prompt in args.prompt or PROMPTS:
        ids = chat_ids(tok, prompt)
        with torch.no_grad():
            ours = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos)[0, len(ids):].tolist()
        theirs = greedy(llm, ids, n, eos)
        same = first_divergence(ours, theirs)
        if same is None:
            same = min(len(ours), len(theirs))
        print(f"### {prompt}\n  same greedy tokens: {same} of {max(len(ours), len(theirs))}")
        print(f"  torch    : {tok.decode(ours, skip_special_tokens=True)!r}")
        print(f"  llama.cpp: {tok.decode(theirs, skip_special_tokens=True)!r}", flush=True)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
