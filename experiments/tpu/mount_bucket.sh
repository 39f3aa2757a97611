#!/usr/bin/env bash
# Mount a Cloud Storage bucket at /gcs/BUCKET on every worker, so all workers share one workdir.
#
#   experiments/tpu/mount_bucket.sh NAME ZONE BUCKET
#
# Uses Cloud Storage FUSE (gcsfuse) from Google's apt repository. The TPU VM's service account
# needs read and write access to the bucket.
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 NAME ZONE BUCKET" >&2
  exit 2
fi
name=$1 zone=$2 bucket=$3

gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  if ! command -v gcsfuse > /dev/null; then
    echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main' \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
    sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
  fi
  sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket
  # orbax renames each finished checkpoint folder, which gcsfuse allows only up to this many files.
  mountpoint -q /gcs/$bucket || gcsfuse --implicit-dirs --rename-dir-limit=200000 $bucket /gcs/$bucket
"
