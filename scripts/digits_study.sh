#!/usr/bin/env bash
# Small-scale reproduction on digits (docs/results.md): every run of the study, exact commands.
# About 2 hours on a 2-core CPU. Runs whose wall-clock is reported (the main job and the
# equal wall-clock comparison) run alone; equal-step runs share the machine, one thread each.
set -euo pipefail
out=${1:-runs/study}
common="train.max_minutes=null train.num_threads=1 --no-progress"
run() { local name=$1; shift; tread train "$@" train.run_dir="$out/$name" $common > "$out/$name.log" 2>&1; }
mkdir -p "$out"

# 1. Equal steps (1000): skip ratio {0, 0.25, 0.75} and route placement at ratio 0.5, route
#    r(2->4) of 8 blocks unless stated (ratio 0.5 with r(2->4) is the main job, step 2).
run ratio_0.00 digits_dit & run ratio_0.25 digits_tread model.routes.0.ratio=0.25 &
run place_1-6 digits_tread model.routes.0.start=1 model.routes.0.end=-2 & wait
run ratio_0.75 digits_tread model.routes.0.ratio=0.75 & run place_0-4 digits_tread model.routes.0.start=0 &
run place_2-7 digits_tread model.routes.0.end=-1 & wait
# Route length at a fixed end block (4): r(3->4) and r(1->4) beside the main job's r(2->4).
run place_3-4 digits_tread model.routes.0.start=3 & run place_1-4 digits_tread model.routes.0.start=1 & wait

# 2. The main job itself (`tread train`, defaults, both threads, alone): r(2->4), ratio 0.5.
tread train train.run_dir="$out/ratio_0.50" --no-progress > "$out/ratio_0.50.log" 2>&1

# 3. Dense vs TREAD at equal training wall-clock (both threads, alone): `tread compare` as it
#    comes (5 min per arm; evaluation interval chosen from the budget) and 8 min per arm with an
#    evaluation every 150 steps.
tread compare --out "$out/compare5" > "$out/compare5.log" 2>&1
tread compare --minutes 8 --eval-every 150 --out "$out/compare8" > "$out/compare8.log" 2>&1

# `tread compare` scores each arm's final checkpoint with three sample seeds itself (the noise
# band in its report and compare.json), so no separate `tread eval` runs are needed.

python scripts/summarize_study.py "$out"
