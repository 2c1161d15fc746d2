"""Cross-tokenizer distillation: a teacher and a student whose tokenizers differ (docs/cross-tokenizer.md).

- `vocab`: the bytes every token stands for, and the sparse teacher -> student map of tokens that stand for the
  same bytes (computed once per tokenizer pair and cached);
- `align`: the two tokenizations of one text aligned on byte offsets into groups of tokens that cover the same
  bytes (1:1 where the spans coincide, merged where one token faces several);
- `losses`: pure loss functions on the aligned positions (shared-vocabulary divergence, ULD, GOLD-style merge,
  span log-probabilities by the chain rule), chunked over positions so that a 262k vocabulary never
  materialises full logits;
- `data`: the run's rows on both sides, the collator, and the teacher scores the methods see.
"""
