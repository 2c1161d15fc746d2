"""The teacher as a service: a teacher behind an OpenAI-compatible server with vLLM's extensions (`vllm serve`),
on other machines (`--teacher-url`).

- `protocol`: the requests (/v1/completions with token-id prompts; `prompt_logprobs=K` for scores; /tokenize for
  the vocabulary check) and the validation of the replies;
- `client`: HTTP with timeouts, bounded exponential back-off on connection errors, timeouts, 429 and 5xx, a
  concurrency limit, round-robin over a list of URLs, the API key from an environment variable;
- `remote`: what the pipeline plugs in: the teacher's responses (a generation backend) and its scores on a
  micro-batch (a `TopKTeacher`, prefetched for the step's next micro-batches while the current one trains).

See docs/cluster-teacher.md.
"""
