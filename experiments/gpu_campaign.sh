#!/usr/bin/env bash
# The GPU campaign in one device call (docs/gpu/README.md):
#   run(command="bash experiments/gpu_campaign.sh", carry=[".whl"], timeout_s=600)
# Results go to $OUT (the device tool's folder; ./campaign_out when unset), scratch to
# /tmp/campaign_work. Extra arguments go to experiments/gpu_campaign.py, e.g. --head=integral,
# --config_overrides=--config.dtype=bfloat16, or --smoke for the CPU smoke run of `make test`.
# Campaign 2 (issue 29) adds the torch peers, the engine stage and the training variants;
# the same one call runs them.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/campaign_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
wheels=()
[ -d .whl ] && wheels=(--wheels=.whl)
# A pipeline, not `exec > >(tee ...)`: the script's status is the campaign's, and nothing
# waits on a process substitution.
"${PYTHON:-python3}" experiments/gpu_campaign.py --out="$out" --work="${CAMPAIGN_WORK:-/tmp/campaign_work}" \
  ${wheels[@]+"${wheels[@]}"} "$@" 2>&1 | tee -a "$out/campaign.log"
