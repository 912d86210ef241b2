#!/usr/bin/env bash
# The blind spot and its fixes on the CPU demo (config/cpu.py), end to end: per-loop runs of rmsnorm,
# scale_visible, final_only, rmsnorm + norm penalty (all at the default lr 6e-3), and rmsnorm +
# loop norm, which diverges in scale at 6e-3 and so runs at lr 3e-3 beside an rmsnorm baseline
# at the same lr. eval.py --run=all on each (per-depth PPL, halting, depth map, logit lens,
# diagnostics), then the figure, the depth map, the table and the claims table. Two runs at a
# time, one thread each: about 11 minutes on 2 cores.
#   bash reproduce.sh [out_folder] [extra train.py flags...]     (default folder: out/repro;
#   each run replaces the one of the same name there)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-out/repro}; shift || true
ITERS=${ITERS:-500}
mkdir -p "$OUT"
[ -f data/shakespeare_char/train.bin ] || python prepare.py
start=$(date +%s)

one() {  # one condition: train, then evaluate; output in $OUT/<name>.txt
  local name=$1; shift
  if ! { OMP_NUM_THREADS=1 python train.py config/cpu.py --overwrite=True --max_iters="$ITERS" \
           --eval_interval=50 \
           --out_dir="$OUT/$name" "$@" \
         && OMP_NUM_THREADS=1 python eval.py --run=all --out_dir="$OUT/$name"; } \
       > "$OUT/$name.txt" 2>&1; then
    echo "run $name failed; see $OUT/$name.txt"
    tail -3 "$OUT/$name.txt"
    return 1
  fi
  echo "done: $name ($(( $(date +%s) - start )) s)"
}
# two runs at a time, one core each
one rmsnorm --readout=rmsnorm "$@" & a=$!
one scale_visible --readout=scale_visible "$@" & b=$!
wait $a && wait $b
one final_only --readout=final_only "$@" & a=$!
one penalty --norm_penalty=0.01 "$@" & b=$!
wait $a && wait $b
one loop_norm_lr3e-3 --loop_norm=True --learning_rate=3e-3 "$@" & a=$!
one rmsnorm_lr3e-3 --learning_rate=3e-3 "$@" & b=$!
wait $a && wait $b
runs=(rmsnorm scale_visible final_only penalty loop_norm_lr3e-3 rmsnorm_lr3e-3)
# the fixes figure and depth map on one core, the table, main figure and claims on the other
python plot_norms.py "$OUT/rmsnorm" "$OUT/scale_visible" "$OUT/penalty" --out="$OUT/fixes.png" \
  --depth_map="$OUT/depth_map.png" > /dev/null & figures=$!
python plot_norms.py "${runs[@]/#/$OUT/}" --out="$OUT/blind_spot.png" | tee "$OUT/table.txt"
python experiments.py --run=claims --out_dir="$OUT" | tee "$OUT/claims.txt"
wait $figures
echo "total wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/table.txt"
