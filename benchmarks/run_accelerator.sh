#!/usr/bin/env bash
# The benchmark runs behind the README's GPU numbers, for one machine with a GPU (or TPU).
#
#   benchmarks/run_accelerator.sh OUTDIR TAG [STEP...]
#   benchmarks/run_accelerator.sh benchmarks/results h100          # all steps
#   benchmarks/run_accelerator.sh /tmp/out h200 attention inference
#
# STEP: attention, contrastive, inference, train_step, demo (default: all, in that order). Each runs with the
# `python3` on the PATH (or $PYTHON), under its own time limit (seconds: $ATTENTION_S,
# $CONTRASTIVE_S, $INFERENCE_S, $TRAIN_STEP_S, $DEMO_S), so that one that hangs or fails leaves the others their
# time; a step's JSON is written only when it finishes. Writes OUTDIR/attention_TAG.json and .png,
# contrastive_TAG.json (the term alone, 'select' and 'top_k', 16x48² and 4x96², authors' and paper's
# counts), contrastive_blocks_48_TAG.json and _96_ (the ENLCA block with and without the term, both
# methods, 16x48² and 4x96²),
# inference_TAG.json (LR 128², 256², 512², untiled and tiled), inference_1024_TAG.json (untiled),
# train_step_TAG.json, and everything printed to OUTDIR/run_TAG.log. `demo` runs the README's
# main job (configs/demo.py) into $DEMO_WORKDIR (default runs/demo_TAG) and prints its validation
# PSNR. On an H100 the attention step takes about 3 minutes and inference 128²–512² 2.5.
# attention and inference need jax (with the accelerator's plugin), flax, psutil and matplotlib
# (`pip install ".[experiments]"`); train_step and demo need the training extra too
# (`pip install ".[train,experiments]"`; requirements.txt has the tested versions).
# Sizes for a quick check: ATTENTION_SIZES, INFERENCE_SIZES, INFERENCE_1024 (e.g. "64").
set -u
out=${1:?usage: benchmarks/run_accelerator.sh OUTDIR TAG [STEP...]}
tag=${2:?usage: benchmarks/run_accelerator.sh OUTDIR TAG [STEP...]}
shift 2
steps=${*:-attention contrastive inference train_step demo}
py=${PYTHON:-python3}
for step in $steps; do
  case $step in
    attention | contrastive | inference | train_step | demo) ;;
    *) echo "unknown step '$step': choose from attention, contrastive, inference, train_step, demo" >&2; exit 2 ;;
  esac
done
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1  # absolute: the steps run from the repo root
cd "$(dirname "$0")/.."
log="$out/run_$tag.log"
export PYTHONUNBUFFERED=1

run() {  # run LIMIT_SECONDS COMMAND...: one step, its output appended to the log
  local limit=$1
  shift
  echo "=== $(date -u +%H:%M:%S) $* (limit ${limit} s)" | tee -a "$log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  echo "=== exit $status after $((SECONDS - start)) s" | tee -a "$log"
}

{
  echo "=== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  "$py" - <<'EOF'
import importlib.metadata as m
import jax
import jax.numpy as jnp
print("jax", jax.__version__, "devices", jax.devices())
for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "tensorflow-datasets"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
# Which float32 matmul the references measure: XLA's default precision against full float32.
a = jax.random.normal(jax.random.key(0), (512, 512))
exact = jnp.dot(a, a, precision="highest")
default = jnp.dot(a, a)
print("float32 matmul, default precision against 'highest': rel. error",
      float(jnp.linalg.norm(default - exact) / jnp.linalg.norm(exact)))
EOF
} 2>&1 | tee -a "$log"

for step in $steps; do
  case $step in
    attention)
      run "${ATTENTION_S:-240}" "$py" benchmarks/attention.py --sizes "${ATTENTION_SIZES:-32,48,64,96,128,192}" \
        --min_seconds 1 --max_exact_gib 20 --json "$out/attention_$tag.json" --plot "$out/attention_$tag.png" ;;
    contrastive)
      run "${CONTRASTIVE_S:-240}" "$py" benchmarks/contrastive.py --cases 16x48,4x96 --paper --min_seconds 1 \
        --json "$out/contrastive_$tag.json"
      run "${CONTRASTIVE_S:-240}" "$py" benchmarks/attention.py --blocks_only --sizes 48 --batch 16 --min_seconds 1 \
        --json "$out/contrastive_blocks_48_$tag.json"
      run "${CONTRASTIVE_S:-240}" "$py" benchmarks/attention.py --blocks_only --sizes 96 --batch 4 --min_seconds 1 \
        --json "$out/contrastive_blocks_96_$tag.json" ;;
    inference)
      run "${INFERENCE_S:-240}" "$py" benchmarks/inference.py --sizes "${INFERENCE_SIZES:-128,256,512}" \
        --repeats 5 --json "$out/inference_$tag.json"
      # Untiled only: the tiled mode passes every stage through host memory (it exists for CPU RAM),
      # and at 1024² it outran 170 s on an H100.
      run "${INFERENCE_S:-240}" "$py" benchmarks/inference.py --sizes "${INFERENCE_1024:-1024}" --modes untiled \
        --repeats 3 --json "$out/inference_1024_$tag.json" ;;
    train_step)
      run "${TRAIN_STEP_S:-240}" "$py" benchmarks/train_step.py --no-breakdown --repeats 5 \
        --json "$out/train_step_$tag.json" ;;
    demo)
      run "${DEMO_S:-300}" "$py" train.py --config configs/demo.py --workdir "${DEMO_WORKDIR:-runs/demo_$tag}" ;;
  esac
done
