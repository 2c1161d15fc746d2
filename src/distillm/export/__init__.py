"""Exporting students to other runtimes: `distillm.export.gguf` writes llama.cpp / ollama GGUF files."""
