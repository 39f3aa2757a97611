#!/usr/bin/env bash
# Start (or resume) the same training command on every worker of a TPU VM slice.
#
#   experiments/tpu/train.sh NAME ZONE WORKDIR [CONFIG] [--config.a.b=value ...]
#   experiments/tpu/train.sh dt-v4 us-central2-b gs://my-bucket/runs/large experiments/large.py \
#       --config.mesh.fsdp=8
#
# WORKDIR must be one directory that every worker can read and write: a gs://BUCKET/PATH URL, or a
# bucket mounted with Cloud Storage FUSE (see docs/tpu.md). Rerunning this script after a preemption resumes from the newest
# checkpoint in WORKDIR. Output goes to ~/diffusion_text/train.log on each worker.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 NAME ZONE WORKDIR [CONFIG] [--config.a.b=value ...]" >&2
  exit 2
fi
name=$1 zone=$2 workdir=$3
config=${4:-experiments/large.py}
shift $(( $# < 4 ? $# : 4 ))
overrides=$(printf ' %q' "$@")

# jax.distributed.initialize() finds the other workers itself on a TPU VM, so every worker runs
# the identical command. nohup keeps training alive when the ssh session closes.
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  cd diffusion_text && nohup .venv/bin/python -m diffusion_text train \
    --config=$config --workdir=$workdir $overrides > train.log 2>&1 &
"
echo "started on all workers of $name; follow worker 0 with:"
echo "  gcloud compute tpus tpu-vm ssh $name --zone=$zone --worker=0 --command='tail -f diffusion_text/train.log'"
