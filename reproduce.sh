#!/usr/bin/env bash
# The blind spot and its fixes on the CPU demo (config/cpu.py), end to end, for SEEDS seeds:
# the paper's six official 44M conditions (terminal rmsnorm, terminal scale_visible, per-loop
# rmsnorm, per-loop scale_visible, per-loop final_only, terminal rmsnorm + norm penalty 0.01)
# and nanoloop's own: per-loop rmsnorm + norm penalty (not among the paper's 44M configs), all
# at the default lr 6e-3, and per-loop rmsnorm + loop norm, which diverges in scale at 6e-3 and
# so runs at lr 3e-3, beside rmsnorm and scale_visible runs at the same lr. Each run is trained and
# evaluated (eval.py --run=all: per-depth PPL, halting, depth map, logit lens, diagnostics) in
# out/repro/seed<n>/<run>, JOBS runs at a time with one thread each. Then, one run at a time on
# one thread of the otherwise idle machine, generation speed at full depth and under calibrated
# halting (eval.py --run=speed). Last: the figures and table of seed 1 (table.txt), and the
# claims and tables over all seeds (claims.txt, claims.json).
#   SEEDS=3 ITERS=500 JOBS=2 RUNS="rmsnorm penalty" bash reproduce.sh [out_folder] [train flags]
# Defaults: SEEDS=1, ITERS=500, JOBS=the number of cores, RUNS=all ten, PYTHON=python,
# SPEED_TOKENS=200 (tokens per timed generation), out_folder=out/repro. On 2 cores one seed
# takes about 35 minutes. A run replaces the one of the same name there. Two one-thread runs at
# once beat one two-thread run after the other on 2 cores (two 300-step runs, twice: 112 and
# 121 s against 136 and 153 s).
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then  # this header is the help
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
case ${1:-} in -*) echo "error: the first argument is the output folder, not ${1}; see --help" >&2
                   exit 2 ;;
esac
cd "$(dirname "$0")"
OUT=${1:-out/repro}; shift || true
EXTRA=("$@")
ITERS=${ITERS:-500}
SEEDS=${SEEDS:-1}
JOBS=${JOBS:-$(nproc)}
PY=${PYTHON:-python}
SPEED_TOKENS=${SPEED_TOKENS:-200}
for knob in SEEDS ITERS JOBS SPEED_TOKENS; do
  [[ ${!knob} =~ ^[1-9][0-9]*$ ]] \
    || { echo "error: $knob=${!knob} is invalid; accepted: an integer >= 1" >&2; exit 2; }
done
# each condition: its run name, then its train.py flags
CONDITIONS=(
  "terminal_rmsnorm --supervision=terminal --readout=rmsnorm"
  "terminal_scale_visible --supervision=terminal --readout=scale_visible"
  "terminal_penalty --supervision=terminal --norm_penalty=0.01"
  "rmsnorm --readout=rmsnorm"
  "scale_visible --readout=scale_visible"
  "final_only --readout=final_only"
  "penalty --norm_penalty=0.01"
  "loop_norm_lr3e-3 --loop_norm=True --learning_rate=3e-3"
  "rmsnorm_lr3e-3 --learning_rate=3e-3"
  "scale_visible_lr3e-3 --readout=scale_visible --learning_rate=3e-3"
)
if [ -n "${RUNS:-}" ]; then  # only the conditions named
  chosen=()
  for want in $RUNS; do
    match=""
    for c in "${CONDITIONS[@]}"; do
      [ "${c%% *}" = "$want" ] && match=$c
    done
    [ -n "$match" ] || { echo "error: RUNS names $want; the runs are: ${CONDITIONS[*]%% *}" >&2
                         exit 2; }
    chosen+=("$match")
  done
  CONDITIONS=("${chosen[@]}")
fi
case " ${EXTRA[*]-} " in
  *" --dataset="*) ;;  # the user's own dataset, prepared by them
  *) [ -f data/shakespeare_char/train.bin ] || "$PY" prepare.py ;;
esac
start=$(date +%s)

one() {  # one run: train, then evaluate; its output in <seed folder>/<name>.txt
  local dir=$1 name=$2; shift 2
  if ! { OMP_NUM_THREADS=1 "$PY" train.py config/cpu.py --overwrite=True --max_iters="$ITERS" \
           --eval_interval=50 --out_dir="$dir/$name" "$@" \
         && OMP_NUM_THREADS=1 "$PY" eval.py --run=all --out_dir="$dir/$name"; } \
       > "$dir/$name.txt" 2>&1; then
    echo "run $dir/$name failed; see $dir/$name.txt"
    tail -3 "$dir/$name.txt"
    return 1
  fi
  echo "done: $dir/$name ($(( $(date +%s) - start )) s)"
}

running=0
failed=0
for seed in $(seq 1 "$SEEDS"); do
  mkdir -p "$OUT/seed$seed"
  for c in "${CONDITIONS[@]}"; do
    read -r name flags <<< "$c"
    if (( running >= JOBS )); then
      wait -n || failed=1
      running=$(( running - 1 ))
    fi
    # shellcheck disable=SC2086  # $flags is a list of flags
    one "$OUT/seed$seed" "$name" --seed="$seed" $flags ${EXTRA[@]+"${EXTRA[@]}"} &
    running=$(( running + 1 ))
  done
done
while (( running > 0 )); do
  wait -n || failed=1
  running=$(( running - 1 ))
done
if (( failed )); then
  echo "some runs failed (above); nothing was tabulated"
  exit 1
fi

# generation speed, one run at a time on one thread: nothing else runs beside the clock
for seed in $(seq 1 "$SEEDS"); do
  for c in "${CONDITIONS[@]}"; do
    read -r name _ <<< "$c"
    OMP_NUM_THREADS=1 "$PY" eval.py --run=speed --new_tokens="$SPEED_TOKENS" \
      --out_dir="$OUT/seed$seed/$name" \
      >> "$OUT/seed$seed/$name.txt" 2>&1 \
      || { echo "speed of $OUT/seed$seed/$name failed; see $OUT/seed$seed/$name.txt"; exit 1; }
  done
done
echo "speed measured ($(( $(date +%s) - start )) s)"

names=()
fixes=()
for c in "${CONDITIONS[@]}"; do
  read -r name _ <<< "$c"
  names+=("$OUT/seed1/$name")
  case $name in rmsnorm|scale_visible|penalty) fixes+=("$OUT/seed1/$name") ;; esac
done
# the figures and table of seed 1 on one core, the claims over all seeds on the other
figures=""
if (( ${#fixes[@]} )); then
  "$PY" plot_norms.py "${fixes[@]}" --out="$OUT/fixes.png" --depth_map="$OUT/depth_map.png" \
    > /dev/null & figures=$!
fi
"$PY" plot_norms.py "${names[@]}" --out="$OUT/blind_spot.png" > "$OUT/table.txt"
"$PY" experiments.py --run=claims --out_dir="$OUT" | tee "$OUT/claims.txt"
[ -z "$figures" ] || wait "$figures"
echo "total wall time: $(( $(date +%s) - start )) s ($SEEDS seeds, $ITERS steps, $JOBS jobs)" \
  | tee -a "$OUT/claims.txt"
