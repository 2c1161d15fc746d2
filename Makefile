# The two commands of the README.
#   make demo  - set up, then recover an int4-quantized SmolLM2-135M-Instruct by distillation and export it as GGUF
#   make test  - set up with the test dependencies, then run the test suite
VENV ?= .venv

.PHONY: setup demo test
setup:
	EXTRAS=dev VENV=$(VENV) scripts/setup.sh

demo:
	VENV=$(VENV) scripts/setup.sh
	$(VENV)/bin/distillm run

test: setup
	$(VENV)/bin/python -m pytest -q
