#!/usr/bin/env bash
# llmprune's statistics and evaluation passes on a GPU, at the size people prune: one script, nothing
# downloaded. See --help, and docs/benchmarks.md ("GPU check").
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash benches/gpu_check.sh [options] [RESULTS_DIR]

On a machine with an NVIDIA GPU and llmprune installed (torch, transformers, the built-in text),
nothing downloaded:

 1. writes a LLaMA-7B-shaped checkpoint of random bf16 weights (benches/make_checkpoint.py) and a
    BPE tokenizer trained on the built-in calibration text;
 2. runs `llmprune stats` (32 x 512 tokens), `llmprune stats --gram` and `llmprune eval` (the first
    16,384 tokens in windows of 2048) on the GPU, each in a fresh process, and the same tokens
    through the whole model loaded by transformers with forward hooks summing x and x*x per input
    channel (as stats does) and a plain forward for the perplexity: wall time, tokens/s, peak GPU
    memory (torch's, in the process, and nvidia-smi's);
 3. takes `llmprune stats` of a tiny float32 LLaMA on the GPU and on the CPU, on the same windows,
    and checks every weight's act_sum and act_sqsum agree (cosine >= 0.9999; a bfloat16 GPU run is
    compared too, and only reported);
 4. prints one table and writes it to RESULTS_DIR/gpu_check.md and RESULTS_DIR/gpu_check.json
    (RESULTS_DIR: the argument, else $OUT when set, else ./gpu-check-results).

Without a CUDA device (or with --cpu) it runs steps 1, 2 and 4 on the CPU at a tiny shape with tiny
protocols, in well under a minute, and skips step 3 with a line saying so.

Exit status: 0 when every step ran and every check passed, 1 otherwise (the table says which), 2 for
a usage error.

options:
  --cpu             the CPU fallback even when a GPU is present
  --shape S         checkpoint shape of benches/make_checkpoint.py: tiny, 1b, 7b, 13b
                    (default: 7b on a GPU, tiny on the CPU)
  --layers N        decoder blocks (default: the shape's)
  --nsamples N      stats windows (default: 32 on a GPU, 4 on the CPU)
  --seqlen N        stats window length (default: 512 on a GPU, 64 on the CPU)
  --max-tokens N    eval tokens (default: 16384 on a GPU, 512 on the CPU)
  --eval-seqlen N   eval window length (default: 2048 on a GPU, 128 on the CPU)
  --work-dir DIR    where the work folder (checkpoint, sidecars, records) is made (default:
                    ${TMPDIR:-/tmp}); the 7B shape needs about 36 GB there: 12.6 GB of weights and
                    22 GB of Gram sidecar
  --keep            keep the work folder and the checkpoint (default: removed at the end)
  -h, --help        this text

The Python used is $PYTHON, else python, else python3.
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
helper="$here/gpu_check.py"
command_line="bash benches/gpu_check.sh${*:+ $*}"

force_cpu=0 keep=0 shape="" layers="" nsamples="" seqlen="" max_tokens="" eval_seqlen="" work="" results=""
need() { [[ $# -ge 2 && -n $2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --cpu) force_cpu=1 ;;
    --keep) keep=1 ;;
    --shape) need "$@"; shape=$2; shift ;;
    --layers) need "$@"; layers=$2; shift ;;
    --nsamples) need "$@"; nsamples=$2; shift ;;
    --seqlen) need "$@"; seqlen=$2; shift ;;
    --max-tokens) need "$@"; max_tokens=$2; shift ;;
    --eval-seqlen) need "$@"; eval_seqlen=$2; shift ;;
    --work-dir) need "$@"; work=$2; shift ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [[ -z $results ]] || { echo "error: one RESULTS_DIR only (see --help)" >&2; exit 2; }; results=$1 ;;
  esac
  shift
done
for v in layers nsamples seqlen max_tokens eval_seqlen; do
  [[ -z ${!v} || ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "error: --${v//_/-} takes a positive integer, not '${!v}'" >&2; exit 2; }
done
case ${shape:-7b} in tiny|1b|7b|13b) ;; *) echo "error: --shape takes tiny, 1b, 7b or 13b, not '$shape'" >&2; exit 2 ;; esac

PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

results=${results:-${OUT:-$PWD/gpu-check-results}}
mkdir -p "$results"
results=$(cd "$results" && pwd)
[[ -z $work ]] || mkdir -p "$work"
work=$(mktemp -d "${work:-${TMPDIR:-/tmp}}/llmprune-gpu-check.XXXXXX")
work=$(cd "$work" && pwd)
smi_pid=""
cleanup() {
  if [[ -n $smi_pid ]]; then kill "$smi_pid" 2>/dev/null || true; fi
  if [[ $keep == 1 ]]; then echo "kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

say() { printf '\n== %s (%d s so far)\n' "$*" "$SECONDS"; }

# What this machine has: CUDA or not, the GPU's name, the versions.
"$PY" - "$work/env.json" "$here/.." <<'EOF'
import json, subprocess, sys
from pathlib import Path
import torch
import llmprune
cuda = torch.cuda.is_available()
doc = {"cuda": cuda, "device_name": torch.cuda.get_device_name(0) if cuda else "CPU",
       "provenance": f"llmprune {llmprune.__version__}, torch {torch.__version__}"}
try:
    git = ["git", "-C", sys.argv[2]]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    doc["provenance"] += f", git {rev}{' with uncommitted changes' if dirty else ''}"
except (OSError, subprocess.CalledProcessError):
    pass
Path(sys.argv[1]).write_text(json.dumps(doc))
print(f"device: {doc['device_name']}; {doc['provenance']}")
EOF
cuda=$("$PY" -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["cuda"]))' "$work/env.json")

if [[ $force_cpu == 1 || $cuda == 0 ]]; then
  mode=cpu device=cpu
  no_gpu_reason=$([[ $force_cpu == 1 ]] && echo "--cpu given" || echo "no CUDA device")
  echo "CPU fallback ($no_gpu_reason): tiny shape, tiny protocols; the GPU-vs-CPU statistics comparison is skipped"
  shape=${shape:-tiny} nsamples=${nsamples:-4} seqlen=${seqlen:-64} max_tokens=${max_tokens:-512} eval_seqlen=${eval_seqlen:-128}
else
  mode=gpu device=cuda no_gpu_reason=""
  shape=${shape:-7b} nsamples=${nsamples:-32} seqlen=${seqlen:-512} max_tokens=${max_tokens:-16384} eval_seqlen=${eval_seqlen:-2048}
fi
model="$work/model"

# A step that is no CLI run: its exit status and wall time in NAME.json.
timed() {
  local name=$1 rc=0 t0 t1; shift
  t0=$(date +%s.%N)
  "$@" || rc=$?
  t1=$(date +%s.%N)
  printf '{"rc": %d, "wall_s": %s}\n' "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" > "$work/$name.json"
  return "$rc"
}

# `llmprune ARGS` through the helper (wall time, torch's peak GPU memory in NAME.record.json), its JSON
# summary in NAME.out.json, nvidia-smi's memory.used every 100 ms in NAME.smi.
run_cli() {
  local name=$1 rc=0; shift
  if [[ $mode == gpu ]] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$work/$name.smi" 2>/dev/null &
    smi_pid=$!
  fi
  "$PY" "$helper" cli "$work/$name.record.json" -- "$@" --json > "$work/$name.out.json" || rc=$?
  if [[ -n $smi_pid ]]; then
    kill "$smi_pid" 2>/dev/null || true
    wait "$smi_pid" 2>/dev/null || true
    smi_pid=""
  fi
  [[ $rc == 0 ]] || echo "llmprune $1 exited with status $rc" >&2
  return 0
}

if [[ $mode == gpu ]] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits > "$work/smi-idle.txt" 2>/dev/null || true
fi

say "1. checkpoint: benches/make_checkpoint.py --shape $shape${layers:+ --layers $layers}, and a tokenizer"
make_model() {
  "$PY" "$here/make_checkpoint.py" "$model" --shape "$shape" ${layers:+--layers "$layers"} &&
    "$PY" "$helper" tokenizer "$model"
}
built=1
timed make_checkpoint make_model || built=0
checkpoint_gib=$(du -sb "$model" 2>/dev/null | awk '{ printf "%.3f", $1 / 2^30 }')
checkpoint_gib=${checkpoint_gib:-0}
n_layers=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"])' "$model/config.json" 2>/dev/null || echo "?")

if [[ $built == 1 ]]; then
  say "2a. llmprune stats --device $device --nsamples $nsamples --seqlen $seqlen"
  run_cli stats stats "$model" --device "$device" --nsamples "$nsamples" --seqlen "$seqlen" --seed 0 --out "$work/stats.safetensors"

  say "2b. llmprune stats --gram (same windows)"
  run_cli gram stats "$model" --device "$device" --nsamples "$nsamples" --seqlen "$seqlen" --seed 0 --gram \
    --out "$work/stats-gram.safetensors" --gram-out "$work/gram.safetensors"
  rm -f "$work/gram.safetensors"  # 22 GB at 7B: measured, not kept

  say "2c. llmprune eval --max-tokens $max_tokens --seqlen $eval_seqlen"
  run_cli eval eval "$model" --device "$device" --max-tokens "$max_tokens" --seqlen "$eval_seqlen"

  say "2d. the same tokens through transformers (whole model, forward hooks; plain forward for the perplexity)"
  against=()
  [[ -f $work/stats.safetensors ]] && against=(--against "$work/stats.safetensors")
  timed baseline.rc "$PY" "$helper" baseline "$model" --device "$device" --nsamples "$nsamples" --seqlen "$seqlen" \
    --max-tokens "$max_tokens" --eval-seqlen "$eval_seqlen" --out "$work/baseline.json" "${against[@]}" || true
fi
[[ $keep == 1 ]] || rm -rf "$model"  # not needed any more (12.6 GB at 7B)

if [[ $mode == gpu ]]; then
  say "3. statistics of a tiny float32 LLaMA on the GPU and on the CPU, same windows"
  tiny="$work/tiny"
  if "$PY" "$helper" tiny-model "$tiny"; then
    for run in "cuda float32 gpu-fp32" "cuda bfloat16 gpu-bf16" "cpu float32 cpu-fp32"; do
      read -r dev dt name <<<"$run"
      run_cli "tiny-$name" stats "$tiny" --device "$dev" --dtype "$dt" --nsamples 8 --seqlen 256 --seed 0 --out "$work/tiny-$name.safetensors"
    done
    "$PY" "$helper" compare "$work/tiny-gpu-fp32.safetensors" "$work/tiny-cpu-fp32.safetensors" --name "GPU vs CPU, float32" \
      --min-cosine 0.9999 --out "$work/compare-fp32.json" || true
    "$PY" "$helper" compare "$work/tiny-gpu-bf16.safetensors" "$work/tiny-cpu-fp32.safetensors" --name "GPU bfloat16 vs CPU float32" \
      --out "$work/compare-bf16.json" || true
  fi
else
  say "3. skipped: the GPU-vs-CPU statistics comparison needs a CUDA device ($no_gpu_reason)"
fi

say "4. summary"
COMMAND=$command_line MODE=$mode NO_GPU_REASON=$no_gpu_reason SHAPE=$shape LAYERS=$n_layers CKPT_GIB=$checkpoint_gib \
NSAMPLES=$nsamples SEQLEN=$seqlen MAX_TOKENS=$max_tokens EVAL_SEQLEN=$eval_seqlen TOTAL_S=$SECONDS \
  "$PY" - "$work/env.json" "$work/meta.json" <<'EOF'
import json, os, sys
env, e = json.load(open(sys.argv[1])), os.environ
json.dump({"command": e["COMMAND"], "mode": e["MODE"], "device_name": env["device_name"], "no_gpu_reason": e["NO_GPU_REASON"],
           "provenance": env["provenance"], "shape": e["SHAPE"], "layers": e["LAYERS"], "checkpoint_gib": float(e["CKPT_GIB"]),
           **{k.lower(): int(e[k]) for k in ("NSAMPLES", "SEQLEN", "MAX_TOKENS", "EVAL_SEQLEN", "TOTAL_S")}},
          open(sys.argv[2], "w"), indent=2)
EOF
"$PY" "$helper" summary "$work" "$results"
