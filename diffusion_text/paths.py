"""Workdir paths: a local folder or a Cloud Storage URL (`gs://bucket/run`), both through epath.

`etils.epath` sends local paths to the `os` functions and, with TensorFlow not installed, opens
`gs://` URLs with fsspec's `gcsfs` (etils 1.15). Orbax opens the same URLs itself for
checkpoints. Cloud Storage has no append and no atomic rename, so writers check `is_url` where
the two differ.
"""

from __future__ import annotations

import os
import re

from etils import epath

from diffusion_text.errors import ConfigError

GCS_PREFIX = "gs://"
# A scheme followed by ":/", e.g. "s3://b/run" or the one-slash typo "gs:/b/run". The scheme is
# at least two letters long, so a Windows drive such as "C:/runs" is not taken for a URL.
_URL_START = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def is_url(path: epath.PathLike) -> bool:
  return "://" in os.fspath(path)


def check_workdir_url(workdir: str) -> None:
  """Raise ConfigError for a URL workdir that is not `gs://BUCKET[/PATH]`.

  Any other scheme would need a file system that the run does not install, and a typo such as
  `gs:/bucket` would be taken for a local folder named `gs:`.
  """
  if not _URL_START.match(workdir):
    return
  bucket = workdir[len(GCS_PREFIX):].split("/", 1)[0] if workdir.startswith(GCS_PREFIX) else ""
  if not bucket:
    raise ConfigError(
        f"--workdir={workdir} is not a supported workdir URL. Pass a Cloud Storage location "
        "written gs://BUCKET/PATH, or a local folder (a mounted bucket counts as one).")


def write_atomic(path: epath.Path, data: bytes) -> None:
  """Write `data` to `path` so that a reader finds either the old file or all of the new one.

  A local file is written under a temporary name and renamed over `path`. A Cloud Storage object
  becomes visible only when its upload completes, and a rename there is a copy and a delete, so
  a URL is written in place.
  """
  if is_url(path):
    path.write_bytes(data)
    return
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(data)
  tmp.replace(path)
