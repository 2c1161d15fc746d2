"""Plain reference for the first KD step: forward KL KL(p_teacher || q_student) per response token from full
logits, reduced per sequence then over sequences (seq_mean, the default) and per token (token_mean), with the
gradient norm of the pruned student at its initial weights, split into the (tied) embedding/head and the rest."""
import json, sys, time, torch
from distillm.models import load_model, parse_layer_spec, prune_layers
spec, layers, rows_file = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
teacher, tok = load_model(spec, dtype="float32")
keep = parse_layer_spec(layers, teacher.config.num_hidden_layers)
student = prune_layers(teacher, keep).float().train()
teacher.eval()
rows = [json.loads(l) for l in open(rows_file)]
V = len(tok)
out = {"model": spec, "layers": keep, "vocab": V, "embedding_rows": teacher.get_input_embeddings().weight.shape[0]}
seq_losses, tok_vals, hid_norms_s, hid_norms_t = [], [], [], []
def logits_of(model, ids, n_resp, hidden_norms):
    o = model(input_ids=ids, output_hidden_states=True)
    hidden_norms.append(o.hidden_states[-1][0, -n_resp - 1:-1].norm(dim=-1).detach())
    return o.logits[0, -n_resp - 1:-1, :V].float()
total_tokens = sum(len(r["response_ids"]) for r in rows)
loss_seq = 0.0
for r in rows:
    ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
    n = len(r["response_ids"])
    with torch.no_grad():
        lt = logits_of(teacher, ids, n, hid_norms_t)
    ls = logits_of(student, ids, n, hid_norms_s)
    p_log = torch.log_softmax(lt, -1); q_log = torch.log_softmax(ls, -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)  # [n]: one value per response token
    tok_vals.append(kl.detach())
    seq = kl.mean() / len(rows)  # seq_mean: mean over the sequence's tokens, then over sequences
    seq.backward()
    loss_seq += seq.item()
emb = student.get_input_embeddings().weight
g_emb = emb.grad.norm().item()
g_all = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in student.parameters() if p.grad is not None)).item()
vals = torch.cat(tok_vals)
out.update(rows=len(rows), tokens=total_tokens, seq_mean_fkl=loss_seq, token_mean_fkl=vals.mean().item(),
           max_token_fkl=vals.max().item(), grad_norm=g_all, grad_norm_embedding_head=g_emb,
           grad_norm_rest=(g_all ** 2 - g_emb ** 2) ** 0.5,
           final_hidden_norm_student=torch.cat(hid_norms_s).mean().item(),
           final_hidden_norm_teacher=torch.cat(hid_norms_t).mean().item(),
           head_row_norm_mean=emb.norm(dim=-1).mean().item())
print(json.dumps(out, indent=1))
