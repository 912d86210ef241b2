#!/usr/bin/env bash
# The GPU path in one go (well under 10 minutes on one modern GPU): install, benchmark the paper's
# 44M model with bf16 + torch.compile, then a 50-iteration training run of it with the same flags.
#   bash gpu_check.sh [peak_tflops]      (default: looked up from the GPU's name)
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for GPUs'"
pip install -q -r requirements.txt
[ -f data/shakespeare_gpt2/train.bin ] || python prepare.py --tokenizer=gpt2
python bench.py --preset=44m --compile=True --dtype=bfloat16 --steps=20 --warmup=5 \
  --peak_tflops="${1:-0}" --json=out/gpu_bench.json
python train.py config/paper_44m.py --max_iters=50 --eval_interval=25 --eval_iters=10 --out_dir=out/gpu_44m
