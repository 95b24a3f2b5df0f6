#!/usr/bin/env bash
# The follow-up to a GPU campaign, for the device time one campaign leaves (about 5 minutes):
#   run(command="bash experiments/gpu_followup.sh", carry=[".whl"], timeout_s=290)
# The paper-scale run again (the campaign's data, seed and split; ResNet34 at 512 px in bf16)
# with all the time left, then thresholds tuned on validation and the test split scored. The
# accuracy targets are what the campaign's short run left unmet (recall: CP at the field's
# edge), so this is where the follow-up's minutes go; the log ends with recall per point.
# Campaign 2 leaves its training stage about a minute of steps (its other stages grew), so
# run this right after it, on the same warm machine, when the device time allows. (The first follow-up also timed batch-1
# latency with CUDA graphs: no gain, docs/gpu/README.md; not repeated.)
# FOLLOWUP=train_variants instead times the training variants the campaign's limit did not
# reach (TRAIN_VARIANTS, bench_train --variants; results in bench_train_variants.json).
# Each step has its own limit; results in $OUT (./followup_out when unset). docs/gpu/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/followup_out}"
work=/tmp/followup_work
mkdir -p "$out" "$work"
py="${PYTHON:-python3}"
train_s="${TRAIN_S:-170}"  # the run's time_budget_s (the first ~40 s compile)
# The H200 ran 25-47 steps/s of batch 32 (the first follow-up and the campaign): 3,000 steps
# end the schedule within the ~130 s left after compiling even at the lower rate.
steps="${STEPS:-3000}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="$work/jax_cache"
exec > >(tee -a "$out/followup.log") 2>&1

step() {  # step LIMIT_S NAME CMD...: one command under its own limit; its status is logged
  local limit=$1 name=$2
  shift 2
  echo "\$ $*   [limit ${limit} s]"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@"
  echo "== $name: exit $? ($((SECONDS - t0)) s)"
}

if [ -d .whl ]; then
  step 60 wheels "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/followup_site .whl/*.whl
  export PYTHONPATH="/tmp/followup_site:$PYTHONPATH"
fi
nvidia-smi -L || true
step 40 simulate "$py" experiments/make_tavr_data.py --out="$work/sim" --cases=150 --frames=40 \
  --size=512 --seed=0 --workers=0
if [ "${FOLLOWUP:-paper_scale}" = train_variants ]; then
  # The training variants a campaign's limit did not reach (docs/gpu/README.md), in order of
  # value, each rate net of its compilation (~47 s a row on the H200); then the loader.
  variants="${TRAIN_VARIANTS:-float32:64,bfloat16:128,bfloat16:64:bf16_state,bfloat16:64:noaug,bfloat16:256}"
  step "${VARIANTS_S:-230}" train_variants "$py" experiments/bench_train.py \
    --config=experiments/configs/tavr_gpu_campaign.py --backbones=resnet34 --image_size=512 \
    --variants="$variants" --steps=10 --repeats=3 --out="$out/bench_train_variants.json"
  echo "followup done in $SECONDS s"
  exit 0
fi
step $((train_s + 40)) train "$py" experiments/tavr_train.py \
  --config=experiments/configs/tavr.py --config.dtype=bfloat16 \
  --config.data.test_fraction=0.15 --config.time_budget_s="$train_s" \
  --config.num_steps="$steps" --config.eval_every=1500 --config.checkpoint_every=1500 \
  --workdir="$work/run" --data="$work/sim"
cp "$work/run/config.json" "$out/train_config.json" 2>/dev/null
step 45 evaluate "$py" experiments/tavr_eval.py --tune_thresholds --workdir="$work/run" \
  --data="$work/sim" --split=test --batch_size=32 --out="$out/test_metrics.json"
# recall per point, CP first (the point the first paper-scale runs missed), into the log
"$py" -c 'import json, sys
from experiments.benchmarks.campaign import per_point_recall
print(json.dumps({"per_point_recall": per_point_recall(json.load(open(sys.argv[1])))}))' \
  "$out/test_metrics.json" || true
echo "followup done in $SECONDS s"
