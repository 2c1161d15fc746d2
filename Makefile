# The two commands of the README.
#   make demo  - set up, then distil SmolLM2-135M-Instruct into a 10-layer student (about 10 min on 2 CPU cores)
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
