#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a multi-host slice) and install diffusion_text on every worker.
#
#   [RUNTIME_VERSION=IMAGE] experiments/tpu/create.sh NAME ZONE ACCELERATOR_TYPE REPO_URL
#   experiments/tpu/create.sh dt-v4 us-central2-b v4-32 https://github.com/OWNER/diffusion_text.git
#
# Needs gcloud with a project set (`gcloud config set project ...`) and TPU quota in ZONE.
set -euo pipefail

if [[ $# -ne 4 ]]; then
  echo "usage: $0 NAME ZONE ACCELERATOR_TYPE REPO_URL" >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3 repo=$4

# tpu-ubuntu2204-base is the image of Google's JAX quickstart; some TPU generations document
# their own image, which RUNTIME_VERSION selects.
gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
  --accelerator-type="$accelerator" --version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}" \
  --scopes=https://www.googleapis.com/auth/cloud-platform

# Every worker gets the same clone and install. `jax[tpu]` installs libtpu from PyPI.
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv git
  test -d diffusion_text || git clone $repo diffusion_text
  cd diffusion_text && python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e . 'jax[tpu]'
  .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'
"
