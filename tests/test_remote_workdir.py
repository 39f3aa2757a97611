"""A `gs://` workdir on a fake Cloud Storage: train, resume, sample and evaluate.

The fake bucket is a local folder behind the layers a real bucket goes through. Epath's fsspec
backend, where gcsfs would be, gets an fsspec file system rooted at that folder. Orbax's
TensorStore spec for `gs://` points at the same folder with the `file` driver. Orbax still takes
its Cloud Storage code paths (commit files instead of renames, its bucket rmtree). Every socket
connection fails during these tests, so nothing can reach the network.
"""

import json
import os
import socket
import struct

from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
import pytest
from tensorboardX.proto import event_pb2

from diffusion_text import config as config_lib
from diffusion_text import inference
from diffusion_text import train
from diffusion_text.errors import ConfigError

WORKDIR = "gs://fake-bucket/runs/tiny"


class LocalBucketFileSystem(DirFileSystem):
  """fsspec file system for `gs://` URLs kept in a local folder: `gs://b/x` is `<root>/b/x`.

  Append mode raises, because a Cloud Storage object cannot be appended to (gcsfs warns and
  overwrites the object instead, which would silently drop earlier metrics).
  """

  protocol = ("gs", "gcs")

  def open(self, path, mode="rb", *args, **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"append mode on {path}: Cloud Storage objects cannot be appended")
    return super().open(path, mode, *args, **kwargs)


@pytest.fixture
def bucket_root(tmp_path, monkeypatch):
  """Route `gs://` through a local folder and block all sockets. Return that folder."""
  root = tmp_path / "buckets"
  root.mkdir()
  fake = LocalBucketFileSystem(path=str(root), fs=LocalFileSystem())
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: fake)

  def file_kvstore(url):
    bucket, path = gcs_utils.parse_gcs_path(url, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(str(root), bucket, path)}

  def no_cloud(*args, **kwargs):
    raise AssertionError(f"a Cloud Storage API call was made with {args}")

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", file_kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setattr(gcs_utils, "get_bucket", no_cloud)
  monkeypatch.setattr(gcs_utils, "cleanup_hns_folders", no_cloud)

  def no_network(sock, address, *args):
    raise AssertionError(f"network connection attempted to {address}")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket.socket, "connect_ex", no_network)

  # A URL mistaken for a local path would show up in the working directory as `gs:`.
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  return root


def tiny_config(tmp_path, steps):
  c = config_lib.base_config()
  c.data.tfds_dir = str(tmp_path / "tfds")
  c.data.seq_len = 32
  c.tokenizer.vocab_size = 400
  c.tokenizer.max_chars = 200_000
  c.model.embed_dim, c.model.width, c.model.num_layers = 8, 32, 1
  c.model.num_heads, c.model.mlp_dim = 2, 64
  c.mesh.data = -1
  c.train.batch_size = 8
  c.train.steps = steps
  c.train.warmup_steps = 2
  c.train.log_every = 3
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.sample_every = 6
  c.train.checkpoint_every = 3
  c.sample.steps = 3
  return c


def event_tags(data: bytes) -> list[str]:
  """Tags of every summary value in a TensorBoard event file (TFRecord framing)."""
  tags, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    tags.extend(value.tag for value in event.summary.value)
    offset += 12 + length + 4
  return tags


def test_gs_workdir_trains_resumes_samples_evaluates(bucket_root, tmp_path):
  run = bucket_root / "fake-bucket" / "runs" / "tiny"

  first = train.train_and_evaluate(tiny_config(tmp_path, steps=6), WORKDIR)
  assert first["step"] == 6
  for name in ("config.json", "tokenizer.model", "metrics.jsonl", "samples/step_6.txt",
               "plots/loss.png"):
    assert (run / name).is_file(), name
  assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]
  # Orbax marks a finished checkpoint on Cloud Storage with a commit file, not a rename.
  assert (run / "checkpoints" / "6" / "commit_success.txt").is_file()
  first_config = (run / "config.json").read_bytes()

  second = train.train_and_evaluate(tiny_config(tmp_path, steps=9), WORKDIR)
  assert second["step"] == 9
  assert (run / "config.json").read_bytes() == first_config  # Written once, never replaced.
  assert sorted(os.listdir(run / "checkpoints")) == ["6", "9"]  # keep_checkpoints=2.
  records = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line]
  train_steps = [r["step"] for r in map(json.loads, records) if "train/loss" in r]
  assert train_steps == [3, 6, 9]  # The resumed run added to the first run's records.
  event_files = sorted(os.listdir(run / "events"))
  assert len(event_files) == 2, event_files  # One per run.
  for name in event_files:
    tags = event_tags((run / "events" / name).read_bytes())
    assert "train/loss" in tags, name
    assert "eval/loss" in tags, name

  texts = inference.sample(WORKDIR, num_samples=8, sampler=None, steps=3, seed=0)
  assert len(texts) == 8
  result = inference.evaluate(WORKDIR, split="validation", max_batches=2)
  assert result["step"] == 9
  assert np.isfinite(result["total_bits_per_token"])

  assert os.listdir(tmp_path / "cwd") == []
  assert os.listdir(bucket_root) == ["fake-bucket"]


@pytest.mark.parametrize("workdir", ["s3://bucket/run", "gs:/bucket/run", "gs:///run"])
def test_unsupported_url_workdir_rejected(bucket_root, tmp_path, workdir):
  with pytest.raises(ConfigError, match=rf"--workdir={workdir} is not a supported workdir URL"):
    train.train_and_evaluate(tiny_config(tmp_path, steps=3), workdir)
  with pytest.raises(ConfigError, match="gs://BUCKET/PATH"):
    inference.sample(workdir, num_samples=8, sampler=None, steps=None, seed=0)
  assert os.listdir(tmp_path / "cwd") == []
