#!/usr/bin/env bash
# Create bench/.venv-llmc: an isolated environment for the llm-compressor peer.
# llm-compressor pins transformers<=5.17 and compressed-tensors==0.19.0, which
# conflict with quantkit's own environment, so the peer lives in its own venv.
#
# Idempotent: a marker file records the installed versions; a second run is a no-op.
# Usage: bash bench/peers/setup_llmcompressor.sh [--force]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(dirname "$HERE")"
VENV="${LLMC_VENV:-$BENCH/.venv-llmc}"
MARKER="$VENV/.quantkit-llmc-ready"
PYTHON="${PYTHON:-python3}"
# torch is pinned to the CPU wheel that pip's find-links serves from local disk;
# an unpinned torch would let the resolver pull a multi-GB CUDA build.
TORCH_PIN="torch==2.13.0"
LLMC_PIN="${LLMC_PIN:-llmcompressor==0.14.0.1}"

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$VENV"
fi
if [[ -f "$MARKER" ]]; then
    echo "llm-compressor venv ready: $VENV ($(tr '\n' ' ' < "$MARKER"))"
    exit 0
fi

start=$(date +%s)
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first, alone, so the CPU wheel is what gets installed ...
"$VENV/bin/python" -m pip install --quiet "$TORCH_PIN"
# ... and pinned again next to llmcompressor so the resolver keeps it.
"$VENV/bin/python" -m pip install --quiet "$TORCH_PIN" "$LLMC_PIN" datasets

# Refuse a CUDA torch: it means the pin was lost and gigabytes were downloaded.
"$VENV/bin/python" - <<'PY'
import sys, torch
if torch.version.cuda is not None:
    sys.exit(f"expected a CPU torch, got {torch.__version__} (cuda {torch.version.cuda})")
PY

"$VENV/bin/python" - > "$MARKER" <<'PY'
from importlib.metadata import version
for pkg in ("llmcompressor", "compressed-tensors", "transformers", "torch"):
    print(f"{pkg}=={version(pkg)}")
PY
end=$(date +%s)
echo "llm-compressor venv created in $((end - start)) s: $VENV"
cat "$MARKER"
