#!/usr/bin/env bash
# Stop training on every worker. Steps after the last checkpoint (saved every
# train.checkpoint_every steps) are lost, and train.sh resumes from that checkpoint.
#
#   experiments/tpu/stop.sh NAME ZONE
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 NAME ZONE" >&2
  exit 2
fi
name=$1 zone=$2

# Matches only the training command this project starts, on the TPU workers.
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all \
  --command="pkill -INT -f 'python -m diffusion_text train' || true"
