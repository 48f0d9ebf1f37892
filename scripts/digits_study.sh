#!/usr/bin/env bash
# Small-scale reproduction on digits (docs/results.md): every run of the study, exact commands.
# About 75 minutes on a 2-core CPU.
set -euo pipefail
out=${1:-runs/study}
common="train.max_minutes=null train.num_threads=1 --no-progress"
run() { local name=$1; shift; tread train "$@" train.run_dir="$out/$name" $common > "$out/$name.log" 2>&1; }
mkdir -p "$out"

# 1. Dense vs TREAD at equal training wall-clock (5 minutes each, both threads).
tread compare digits_tread --minutes 5 --out "$out/compare" > "$out/compare.log" 2>&1

# 2. Equal steps (1000), two runs at a time with one thread each:
#    skip ratio {0, 0.25, 0.75} (0.5 is step 3) and route placement at ratio 0.5.
run ratio_0.00 digits_dit & run ratio_0.25 digits_tread model.routes.0.ratio=0.25 & wait
run ratio_0.75 digits_tread model.routes.0.ratio=0.75 & run place_0-4 digits_tread model.routes.0.start=0 & wait
run place_2-7 digits_tread model.routes.0.end=-1 & run place_3-4 digits_tread model.routes.0.start=3 & wait
run place_1-6 digits_tread model.routes.0.start=1 model.routes.0.end=-2

# 3. The main job itself (`tread train`, defaults, both threads) is the r(2->4), ratio 0.5 run.
tread train train.run_dir="$out/ratio_0.50" --no-progress > "$out/ratio_0.50.log" 2>&1

python scripts/summarize_study.py "$out"
