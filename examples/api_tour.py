"""A tour of the Python API: run the pipeline, load and prune models, call a loss.

    python examples/api_tour.py
"""

import torch

from distillm import load_config, load_model, prune_layers, run
from distillm.losses import forward_kl, reduce_tokens, skew_forward_kl

# 1. The whole pipeline, as `distillm run --preset tiny --rounds 2` does (tiny random models: seconds).
config = load_config(preset="tiny", overrides={"output_dir": "/tmp/api-run", "rounds": 2})
metrics = run(config)
print("KL before/after:", round(metrics["before"]["kl"], 4), round(metrics["after"]["kl"], 4))
print("mean loss per round:", metrics["training"]["mean_loss_per_round"])

# 2. Models: the built-in SmolLM2 alias (no network) and a layer-pruned student.
teacher, tokenizer = load_model("smollm2-135m-instruct")
student = prune_layers(teacher, "even:10")
print(type(teacher).__name__, teacher.config.num_hidden_layers, "->", student.config.num_hidden_layers, "layers;",
      len(tokenizer), "tokens")

# 3. Losses are pure functions of logits: [batch, tokens, vocab] in, [batch, tokens] out, then reduced.
student_logits, teacher_logits = torch.randn(2, 5, 49152), torch.randn(2, 5, 49152)
mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
print("FKL", reduce_tokens(forward_kl(student_logits, teacher_logits), mask).item(),
      "SKL_0.1", reduce_tokens(skew_forward_kl(student_logits, teacher_logits, 0.1), mask).item())
