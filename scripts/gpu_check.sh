#!/usr/bin/env bash
# GPU readiness: one short run of every GPU path, on a machine with a CUDA GPU.
#   TORCH_SPEC=torch bash scripts/setup.sh gpu     (a CUDA torch, then the package with the official vllm)
#   bash scripts/gpu_check.sh [OUT_DIR]
# Trains 1 epoch with train.use_gpu (NCCL process group, bf16 autocast, device placement), encodes
# the texts on the GPU in bf16, and generates with the vLLM backend on the GPU; prints what it saw.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/mcl-gpu-check}}"
BIN="${BIN:-.venv/bin}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$BIN/python" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
import torch.distributed as dist
print("nccl available:", dist.is_nccl_available())
try:
    import vllm
    print("vllm", vllm.__version__)
except ImportError as e:
    print("vllm missing:", e)
PY
"$BIN/mcl-ray" run experiments/ml1m_swr_quick.yaml --no-serve-demo \
  --set run_dir="$OUT" --set train.epochs=1 --set train.use_gpu=true --set train.precision=bf16 \
  --set encode.use_gpu=true --set encode.bf16=true \
  --set augment.enabled=true --set augment.backend=vllm --set augment.use_gpu=true --set augment.num_users=64 \
  --set augment.batch_size=64
"$BIN/python" - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
h = json.loads((out / "train/seed_2024/history.json").read_text())
print("train epoch 1:", {k: h[0][k] for k in ("val_auc", "samples_per_s", "world_size")})
print("augment:", {k: v for k, v in json.loads((out / "prepare/augment/stats.json").read_text()).items()
                   if k in ("requested", "valid", "invalid", "rows_written", "prompts_per_s", "generator")})
print("encode:", [json.loads(p.read_text())["texts_per_s"] for p in (out / "prepare/embeddings").glob("*.json")])
PY
