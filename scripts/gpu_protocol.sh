#!/usr/bin/env bash
# GPU protocol (issue 13; docs/scaling.md, "GPU protocol"): one command that measures tread on a
# CUDA machine in at most 25 minutes and writes its figures under docs/data/.
#
#   bash scripts/gpu_protocol.sh              # everything, on a GPU machine, from any directory
#   bash scripts/gpu_protocol.sh --dry-run    # the plan, its time budgets and tool checks (any
#                                             # machine, writes nothing)
#   bash scripts/gpu_protocol.sh --steps bench --minutes 9  # a part (step 1 always runs)
#
# Steps, in order. A failing step is recorded in the manifest and the next one runs:
#   1 env        manifest: GPU (nvidia-smi), torch, CUDA, commit
#   2 bench      tread bench DiT-B/2, DiT-XL/2, bf16, eager and compiled, largest batch that fits
#   3 diffusers  tread bench --diffusers dit-b dit-xl flux-b, batch 64 (32 if 64 does not fit)
#   4 actmem     benchmarks/activation_memory.py DiT-XL/2, batch 32: dense / routed / + ckpt
#   5 smoke      imagenet256_dit_xl2_tread on random latents: 2 min in one process, then 1 min
#                under torchrun (all GPUs); it/s and peak memory
#   6 compare    tread compare fashion_tread (dense vs TREAD, 256 tokens) for the time left
#   7 mamba      pytest -m gpu tests/test_mamba.py, only when mamba-ssm is installed
#
# Every command runs under `timeout`; the whole protocol stops at its deadline (25 min at most).
# Writes into --out (default docs/data): gpu_manifest.json (device, torch, CUDA, commit, each
# step's status, seconds and log tail), bench_gpu.json, bench_diffusers_gpu.json,
# activation_memory_gpu.json, smoke_imagenet256_dit_xl2_tread_gpu.json, compare_fashion_gpu/.
# Scratch (random latents, run directories, logs) goes to --work (default: a new temp dir).
# Exit status: 0 all selected steps passed, 1 some failed (see the manifest), 2 bad usage or
# missing tools.
set -euo pipefail

readonly STEP_NAMES=(env bench diffusers actmem smoke compare mamba)
# Seconds per step; compare gets what the others leave (see plan_budgets).
declare -A BUDGET=([env]=30 [bench]=420 [diffusers]=150 [actmem]=90 [smoke]=330 [mamba]=120)
readonly MAX_MINUTES=25
readonly MARGIN=20               # seconds kept back for the manifest and timeout's kill grace
readonly COMPARE_OVERHEAD=150    # start-up, evaluations and final seed scoring of both arms
readonly BENCH_BATCHES=(256 128 64 32 16)
readonly SMOKE_PRESET=imagenet256_dit_xl2_tread

die() {
  echo "gpu_protocol.sh: error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options:
  --dry-run        print every command with its time budget and check the tools; run nothing
  --out DIR        where the figures go (default: docs/data)
  --work DIR       scratch directory (default: a new directory under $TMPDIR or /tmp)
  --steps LIST     comma-separated step numbers or names to run (default: all)
  --minutes M      overall budget in minutes, 1..25 (default: 25)
  --fashion DIR    Fashion-MNIST IDX directory (default: /usr/share/datasets/fashion-mnist)
  -h, --help       this help
EOF
}

# ---------------------------------------------------------------------------- arguments
DRY_RUN=0
OUT=docs/data
WORK=""
STEPS_ARG=all
MINUTES=$MAX_MINUTES
FASHION=/usr/share/datasets/fashion-mnist
PY=${PYTHON:-python3}

need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --work) need_value "$@"; WORK=$2; shift 2 ;;
    --steps) need_value "$@"; STEPS_ARG=$2; shift 2 ;;
    --minutes) need_value "$@"; MINUTES=$2; shift 2 ;;
    --fashion) need_value "$@"; FASHION=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ $MINUTES =~ ^[0-9]+$ ]] && ((MINUTES >= 1 && MINUTES <= MAX_MINUTES)) ||
  die "--minutes $MINUTES: expected a whole number of minutes in 1..$MAX_MINUTES"
TOTAL=$((MINUTES * 60))

declare -A SELECTED=()
IFS=, read -r -a wanted <<<"$STEPS_ARG"
for item in "${wanted[@]}"; do
  if [[ $item == all ]]; then
    for name in "${STEP_NAMES[@]}"; do SELECTED[$name]=1; done
  elif [[ $item =~ ^[1-7]$ ]]; then
    SELECTED[${STEP_NAMES[item - 1]}]=1
  elif [[ " ${STEP_NAMES[*]} " == *" $item "* ]]; then
    SELECTED[$item]=1
  else
    die "--steps: unknown step '$item'; steps: 1..7 or ${STEP_NAMES[*]}"
  fi
done
SELECTED[env]=1  # always: every run records its machine, torch and commit

# Paths are taken from the caller's directory; the steps then run from the repository root.
OUT=$(realpath -m -- "$OUT")
FASHION=$(realpath -m -- "$FASHION")
if [[ -n $WORK ]]; then
  WORK=$(realpath -m -- "$WORK")
elif ((DRY_RUN)); then
  WORK="${TMPDIR:-/tmp}/tread_gpu_protocol.XXXXXX"  # what a real run would create
fi
cd "$(dirname -- "$(realpath -- "${BASH_SOURCE[0]}")")/.."
TREAD=("$PY" -m tread.cli)

# ---------------------------------------------------------------------------- tool checks
check_tools() {
  local versions names
  versions=$("$PY" -c 'import tread, torch; print(tread.__version__, torch.__version__)' 2>&1) ||
    die "tread is not importable with $PY (pip install -e . in the repository): $versions"
  echo "ok: tread ${versions% *} importable with $PY (torch ${versions#* })"
  for tool in timeout torchrun; do
    command -v "$tool" >/dev/null || die "$tool not found on PATH"
  done
  echo "ok: timeout and torchrun found"
  GPUS=0
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    GPUS=$(nvidia-smi -L | grep -c '^GPU')
    names=$(nvidia-smi --query-gpu=name --format=csv,noheader | sort -u | paste -sd,)
    echo "ok: $GPUS GPU(s): $names"
  elif ((DRY_RUN)); then
    echo "no GPU: dry-run only (nvidia-smi missing or finds no GPU)"
  else
    die "no GPU: nvidia-smi is missing or finds no GPU; on this machine only --dry-run runs"
  fi
  [[ -f benchmarks/activation_memory.py ]] ||
    echo "warning: benchmarks/activation_memory.py is missing: step 4 (actmem) would fail"
  [[ -d $FASHION ]] || echo "warning: no Fashion-MNIST at $FASHION: step 6 (compare) would" \
    "fail (apt-get install dataset-fashion-mnist, or --fashion DIR)"
  MAMBA=0
  if "$PY" -c 'import mamba_ssm' >/dev/null 2>&1; then MAMBA=1; fi
  ((MAMBA)) || echo "note: mamba-ssm not installed: step 7 (mamba) is skipped"
}

# ---------------------------------------------------------------------------- budgets
# Planned seconds per selected step: fixed budgets, and compare = what is left after the others
# (the real run gives compare the time actually left, at least its planned share).
plan_budgets() {
  ((MAMBA)) || BUDGET[mamba]=0
  local used=$MARGIN name
  for name in "${STEP_NAMES[@]}"; do
    [[ $name == compare || -z ${SELECTED[$name]:-} ]] && continue
    used=$((used + BUDGET[$name]))
  done
  BUDGET[compare]=$((TOTAL - used))
  if ((BUDGET[compare] < 0)); then
    die "the selected steps need $used s, more than --minutes $MINUTES; select fewer (--steps)"
  fi
  [[ -n ${SELECTED[compare]:-} ]] || BUDGET[compare]=0
}

# Minutes per arm of `tread compare` for a budget of $1 seconds ("" when too little).
compare_minutes() {
  local seconds=$(($1 - COMPARE_OVERHEAD))
  ((seconds >= 60)) || return 0
  awk -v s="$seconds" 'BEGIN { printf "%.1f", s / 120 }'
}

# ---------------------------------------------------------------------------- running
STEP=""        # the running step's name
STEP_END=0     # its deadline (epoch seconds)
STEP_NOTES=()  # what it found, for the manifest
STEP_FAILED=0
STEP_SKIPPED=0
LAST_LOG=""

now() { date +%s; }

# One command of the current step: printed in a dry run, else run under `timeout` with what is
# left of the step's and the protocol's time, output in $WORK/logs/$1.log. Returns its status.
run_cmd() {
  local log_name=$1
  shift
  if ((DRY_RUN)); then
    plan_line "$*"
    return 0
  fi
  local end=$STEP_END limit
  ((end <= DEADLINE - MARGIN)) || end=$((DEADLINE - MARGIN))
  limit=$((end - $(now)))
  LAST_LOG="$WORK/logs/$log_name.log"
  if ((limit < 5)); then
    echo "out of time: skipped $*" | tee "$LAST_LOG"
    return 124
  fi
  echo "+ $* (limit ${limit}s)"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" >"$LAST_LOG" 2>&1 || rc=$?
  ((rc == 0)) || echo "  exit $rc; log: $LAST_LOG ($(tail -n 1 "$LAST_LOG" | cut -c1-160))"
  return "$rc"
}

out_of_memory() { grep -qiE 'out of memory|OutOfMemoryError' "$LAST_LOG"; }

# One line of the dry run's plan for the current step: "[n/7 name budget] text".
plan_line() {
  local index
  for index in "${!STEP_NAMES[@]}"; do [[ ${STEP_NAMES[index]} == "$STEP" ]] && break; done
  printf '[%d/7 %s %ds] %s\n' $((index + 1)) "$STEP" "${BUDGET[$STEP]}" "$*"
}

note() { STEP_NOTES+=("$*"); }
# A failure of the current step: recorded (status "failed"); in a dry run, a plan line.
fail() {
  STEP_FAILED=1
  note "FAILED: $*"
  ((!DRY_RUN)) || plan_line "would fail: $*"
}
# A step that cannot run here (status "skipped"); in a dry run, a plan line.
skip() {
  STEP_SKIPPED=1
  note "skipped: $*"
  ((!DRY_RUN)) || plan_line "skipped: $*"
}

# Append one step's record to $WORK/steps.tsv: name, status, seconds, budget, log, end, notes.
record_step() {
  local status=$1 seconds=$2 notes
  notes=$(printf '%s; ' "${STEP_NOTES[@]}")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$STEP" "$status" "$seconds" "${BUDGET[$STEP]}" \
    "$LAST_LOG" "$(date +%Y-%m-%dT%H:%M:%S%z)" "${notes%; }" >>"$WORK/steps.tsv"
}

# ---------------------------------------------------------------------------- the steps
step_env() {
  run_cmd env_nvidia_smi nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || fail "nvidia-smi"
  ((DRY_RUN)) && run_cmd env_python "$PY" '(torch, CUDA, commit)' ">" "$OUT/gpu_manifest.json"
  ((DRY_RUN)) && return 0
  cp "$LAST_LOG" "$WORK/gpu.txt"
  "$PY" - "$WORK/gpu.txt" "$WORK/env.json" <<'EOF' || fail "python environment probe"
import json, platform, socket, subprocess, sys, time
import torch, tread

def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None

gpus = [line.strip() for line in open(sys.argv[1]) if line.strip()]
commit = git("rev-parse", "HEAD")
env = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "host": socket.gethostname(),
    "gpus_nvidia_smi": gpus,  # name, memory.total, driver_version
    "device_name": gpus[0].split(",")[0] if gpus else None,
    "gpu_count": len(gpus),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "python": platform.python_version(),
    "tread": tread.__version__,
    "commit": commit.strip() if commit else None,
    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
}
json.dump(env, open(sys.argv[2], "w"), indent=2)
EOF
  note "$(head -n 1 "$WORK/gpu.txt")"
  return 0
}

# tread bench per model: eager from the largest batch down until one fits (CUDA OOM -> halve);
# compiled from the eager batch down (compiling is slow, and rarely needs more memory).
step_bench() {
  local model slug mode start found batch json
  local -a flags jsons=()
  for model in DiT-B/2 DiT-XL/2; do
    slug=$(tr 'A-Z' 'a-z' <<<"$model" | tr -d '/' | tr '-' '_')  # DiT-XL/2 -> dit_xl2
    start=${BENCH_BATCHES[0]}
    for mode in eager compile; do
      flags=()
      [[ $mode == compile ]] && flags=(--compile)
      found=""
      for batch in "${BENCH_BATCHES[@]}"; do
        ((batch <= start)) || continue
        json="$WORK/bench/${slug}_${mode}_b$batch.json"
        if run_cmd "bench_${slug}_${mode}_b$batch" "${TREAD[@]}" bench --models "$model" \
          --precision bf16 "${flags[@]}" --batch "$batch" --repeats 3 --json "$json"; then
          found=$batch
          break
        fi
        out_of_memory || break  # another failure: a smaller batch will not fix it
        note "$model $mode: batch $batch does not fit"
      done
      if ((DRY_RUN)); then
        echo "    (on CUDA out of memory: the next of ${BENCH_BATCHES[*]}; compiled from the" \
          "eager batch down)"
        continue
      fi
      if [[ -n $found ]]; then
        note "$model $mode: batch $found"
        jsons+=("$json")
        [[ $mode == eager ]] && start=$found
      else
        fail "$model $mode: no batch ran (see $LAST_LOG)"
      fi
    done
  done
  ((DRY_RUN)) || merge_json "$OUT/bench_gpu.json" "${jsons[@]}"
  return 0
}

step_diffusers() {
  local name batch found json
  local -a jsons=()
  for name in dit-b dit-xl flux-b; do
    found=""
    for batch in 64 32; do
      json="$WORK/bench/diffusers_${name}_b$batch.json"
      if run_cmd "diffusers_${name}_b$batch" "${TREAD[@]}" bench --diffusers "$name" \
        --batch "$batch" --repeats 3 --json "$json"; then
        found=$batch
        break
      fi
      out_of_memory || break
    done
    ((DRY_RUN)) && echo "    (on CUDA out of memory: --batch 32)" && continue
    if [[ -n $found ]]; then
      note "$name: batch $found"
      jsons+=("$json")
    else
      fail "$name (see $LAST_LOG)"
    fi
  done
  ((DRY_RUN)) || merge_json "$OUT/bench_diffusers_gpu.json" "${jsons[@]}"
  return 0
}

step_actmem() {
  [[ -f benchmarks/activation_memory.py || $DRY_RUN == 1 ]] ||
    { fail "benchmarks/activation_memory.py is missing"; return 0; }
  run_cmd actmem "$PY" benchmarks/activation_memory.py --model DiT-XL/2 --batch 32 \
    --device cuda --json "$OUT/activation_memory_gpu.json" || fail "activation_memory.py"
  return 0
}

# One smoke training: $1 = arm name, $2 = minutes, then the launcher (empty or torchrun ...).
smoke_arm() {
  local arm=$1 minutes=$2 gpus=$3
  shift 3
  local run_dir="$WORK/smoke_$arm" accum=$((256 / gpus / 64))  # micro-batches of <= 64
  ((accum >= 1)) || accum=1
  local -a overrides=(
    "data.path=$WORK/latents" "train.run_dir=$run_dir" "train.max_minutes=$minutes"
    "train.grad_accum=$accum" train.ckpt_every=0 train.sample_every=0 train.log_every=5
    sample.grid_size=1 sample.steps=2 train.device=cuda
  )
  local sampler=""
  if ((!DRY_RUN)); then  # device memory as nvidia-smi sees it, twice a second
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 \
      >"$WORK/smoke_$arm.mem" 2>/dev/null &
    sampler=$!
  fi
  local rc=0
  run_cmd "smoke_$arm" "$@" train "$SMOKE_PRESET" "${overrides[@]}" || rc=$?
  if [[ -n $sampler ]]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true  # its status is that of the kill
  fi
  ((DRY_RUN)) && return 0
  if ((rc == 0)); then note "$arm: ok ($minutes min)"; else fail "$arm: exit $rc"; fi
  local mem_file="$WORK/smoke_$arm.mem" summary="$WORK/smoke.json"
  "$PY" - "$arm" "$run_dir" "$mem_file" "$rc" "$summary" <<'EOF' || fail "$arm: summary"
import json, os, statistics, sys
arm, run_dir, mem_file, rc, out = sys.argv[1:]
rows = []
path = os.path.join(run_dir, "metrics.jsonl")
if os.path.exists(path):
    rows = [json.loads(line) for line in open(path) if '"it_s"' in line]
timed = rows[1:] or rows  # the first row holds start-up and the first steps
mem = []  # MiB per sample and GPU
if os.path.exists(mem_file):
    mem = [int(x) for x in open(mem_file).read().split() if x.isdigit()]
summary = {
    "exit_status": int(rc),
    "steps": rows[-1]["step"] if rows else 0,
    "it_s_median": statistics.median(r["it_s"] for r in timed) if timed else None,
    "img_s_median": statistics.median(r["img_s"] for r in timed) if timed else None,
    "last_loss": rows[-1]["loss"] if rows else None,
    "peak_memory_used_mib_nvidia_smi": max(mem) if mem else None,
    # Peak allocated memory, if the training loop logs it (any *mem* key of its rows).
    "memory_from_metrics": {k: max(r[k] for r in rows if k in r)
                            for k in sorted({k for r in rows for k in r if "mem" in k})},
    "rows": rows,
}
data = json.load(open(out)) if os.path.exists(out) else {}
data[arm] = summary
json.dump(data, open(out, "w"), indent=2)
EOF
  rm -rf "$run_dir/checkpoints"  # ~11 GB of DiT-XL/2 weights and optimizer state
  return 0
}

step_smoke() {
  run_cmd smoke_latents "$PY" scripts/random_latents.py "$WORK/latents" --count 4096 ||
    { fail "random latents"; return 0; }
  local gpus=${GPUS:-1}
  ((gpus >= 1)) || gpus=1
  smoke_arm single 2 1 "${TREAD[@]}"
  smoke_arm torchrun 1 "$gpus" torchrun --standalone --nproc_per_node="$gpus" -m tread.cli
  ((DRY_RUN)) && return 0
  [[ -f $WORK/smoke.json ]] && cp "$WORK/smoke.json" "$OUT/smoke_${SMOKE_PRESET}_gpu.json"
  rm -rf "$WORK/latents"
  return 0
}

# Both arms share what the protocol has left (less the mamba step's time when it will run).
step_compare() {
  local left=${BUDGET[compare]} minutes
  if ((!DRY_RUN)); then
    left=$((DEADLINE - MARGIN - $(now)))
    [[ -n ${SELECTED[mamba]:-} ]] && left=$((left - BUDGET[mamba]))
  fi
  [[ -d $FASHION ]] || { fail "no Fashion-MNIST at $FASHION (apt-get install" \
    "dataset-fashion-mnist, or --fashion DIR)"; ((DRY_RUN)) || return 0; }
  STEP_END=$(($(now) + left))
  minutes=$(compare_minutes "$left")
  [[ -n $minutes ]] || { fail "only ${left}s left: too little for two arms"; return 0; }
  run_cmd compare "${TREAD[@]}" compare fashion_tread --minutes "$minutes" \
    --out "$WORK/compare" "data.path=$FASHION" || fail "tread compare (see $LAST_LOG)"
  ((DRY_RUN)) && return 0
  note "$minutes min per arm"
  if [[ -f $WORK/compare/compare.json ]]; then
    mkdir -p "$OUT/compare_fashion_gpu"
    local file
    for file in compare.json report.md fd.png acc_vs_steps.png samples_side_by_side.png; do
      [[ -f $WORK/compare/$file ]] && cp "$WORK/compare/$file" "$OUT/compare_fashion_gpu/"
    done
  fi
  rm -rf "$WORK/compare/dense/checkpoints" "$WORK/compare/tread/checkpoints"
  return 0
}

step_mamba() {
  ((MAMBA)) || { skip "mamba-ssm not installed (pip install 'tread[ssm]')"; return 0; }
  run_cmd mamba "$PY" -m pytest -q -m gpu tests/test_mamba.py || fail "pytest -m gpu"
  return 0
}

# Concatenate the JSON lists of bench results $2.. into $1 (nothing to merge: nothing written).
merge_json() {
  local out=$1
  shift
  (($# > 0)) || return 0
  "$PY" - "$out" "$@" <<'EOF' || fail "merging into $out"
import json, sys
rows = [row for path in sys.argv[2:] for row in json.load(open(path))]
json.dump(rows, open(sys.argv[1], "w"), indent=2)
EOF
}

# $OUT/gpu_manifest.json from $WORK/env.json and $WORK/steps.tsv, rewritten after every step.
# Steps of an earlier (partial, --steps) run into the same --out that this run did not redo are
# kept, each with its own end time and commit, so a protocol run in parts adds up to one file.
write_manifest() {
  "$PY" - "$WORK" "$OUT/gpu_manifest.json" "$TOTAL" "$STEPS_ARG" <<'EOF'
import json, os, sys
work, out, total, steps_arg = sys.argv[1:]
env_path = os.path.join(work, "env.json")
env = json.load(open(env_path)) if os.path.exists(env_path) else {}
steps = []
tsv = os.path.join(work, "steps.tsv")
for line in open(tsv) if os.path.exists(tsv) else []:
    name, status, seconds, budget, log, end, notes = line.rstrip("\n").split("\t")
    step = {"step": name, "status": status, "seconds": int(seconds), "budget_s": int(budget),
            "end": end, "commit": env.get("commit"), "notes": [n for n in notes.split("; ") if n]}
    if status != "ok" and log and os.path.exists(log):
        step["log_tail"] = open(log, errors="replace").read().splitlines()[-15:]
    steps.append(step)
order = ["env", "bench", "diffusers", "actmem", "smoke", "compare", "mamba"]
earlier = []
if os.path.exists(out):
    try:
        earlier = json.load(open(out)).get("steps", [])
    except (ValueError, AttributeError):
        earlier = []
done = {step["step"] for step in steps}
kept = [s for s in earlier if isinstance(s, dict) and s.get("step") in order]
steps += [s for s in kept if s["step"] not in done]
steps.sort(key=lambda s: order.index(s["step"]))
manifest = {**env, "budget_s": int(total), "steps_selected": steps_arg, "work_dir": work,
            "steps": steps}
json.dump(manifest, open(out, "w"), indent=2)
EOF
}

# ---------------------------------------------------------------------------- main
check_tools
plan_budgets
START=$(now)
DEADLINE=$((START + TOTAL))
if ((DRY_RUN)); then
  echo "plan: out=$OUT work=$WORK budget ${TOTAL}s (${MINUTES} min); nothing is run or written"
else
  [[ -n $WORK ]] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/tread_gpu_protocol.XXXXXX")
  mkdir -p "$OUT" "$WORK/logs" "$WORK/bench"
  : >"$WORK/steps.tsv"
  echo "gpu protocol: out=$OUT work=$WORK budget ${TOTAL}s, started $(date)"
fi

failed=0
planned=0
for index in "${!STEP_NAMES[@]}"; do
  STEP=${STEP_NAMES[index]}
  [[ -n ${SELECTED[$STEP]:-} ]] || continue
  STEP_NOTES=()
  STEP_FAILED=0
  STEP_SKIPPED=0
  LAST_LOG=""
  STEP_END=$(($(now) + BUDGET[$STEP]))
  planned=$((planned + BUDGET[$STEP]))
  ((DRY_RUN)) || echo "== step $((index + 1))/7 $STEP: budget ${BUDGET[$STEP]}s," \
    "$((DEADLINE - $(now)))s left =="
  began=$(now)
  "step_$STEP"
  ((DRY_RUN)) && continue
  status=ok
  ((STEP_SKIPPED)) && status=skipped
  ((STEP_FAILED)) && status=failed && failed=1
  record_step "$status" $(($(now) - began))
  write_manifest || echo "warning: could not write $OUT/gpu_manifest.json"
done

if ((DRY_RUN)); then
  echo "total: ${planned}s planned of ${TOTAL}s (margin ${MARGIN}s)"
  exit 0
fi
echo "done in $(($(now) - START))s; manifest: $OUT/gpu_manifest.json; scratch: $WORK"
awk -F'\t' '{ printf "  %-10s %-8s %5ss\n", $1, $2, $3 }' "$WORK/steps.tsv"
exit "$failed"
