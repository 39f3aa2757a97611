"""One entry point from a data config to a random-access sequence of text records.

Config keys read from `config.data` (docs/data.md describes each one):

  files                comma-separated globs of UTF-8 text files; when set, they are the source
  name                 "shakespeare" (bundled corpus, default) or a registered TFDS name
  documents            document mode for files: "paragraph" (default), "file" or "line"
  validation_files     globs of held-out files (default: hold out whole files)
  validation_fraction  share of files, or of a single file's documents, held out (0.1)
  text_key             text feature of a TFDS dataset ("text")
  decode_errors        invalid UTF-8: "strict" (default) raises a DataError, "replace" reads U+FFFD
  tfds_dir             folder of prepared datasets (~/.cache/diffusion_text/tfds)

Every source is prepared once as array_record files and read back through TFDS without
TensorFlow. A record is a dict with "id" and "text" (str).
"""

from collections.abc import Iterator, Mapping, Sequence
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds

from diffusion_text import errors
from diffusion_text.data import builders
from diffusion_text.data import text_files

BUNDLED_NAME = "shakespeare"
DEFAULT_TFDS_DIR = os.path.join("~", ".cache", "diffusion_text", "tfds")


class TextSource(Sequence):
  """Records of one split, each {"id": str, "text": str}, decoded from a TFDS data source."""

  def __init__(self, data_source: Sequence[Mapping[str, Any]], text_key: str, name: str,
               decode_errors: str = "strict"):
    self._data_source = data_source
    self._text_key = text_key
    self._decode_errors = decode_errors
    self.name = name

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict[str, str]:
    record = self._data_source[index]
    text = record[self._text_key]
    if isinstance(text, bytes):
      text = self._decode_text(text, index)
    record_id = record.get("id", index)
    if isinstance(record_id, bytes):
      record_id = record_id.decode("utf-8")
    return {"id": str(record_id), "text": text}

  def _decode_text(self, data: bytes, index: int) -> str:
    """Decode a record's text bytes under the decode_errors policy."""
    try:
      return data.decode("utf-8", errors=self._decode_errors)
    except UnicodeDecodeError as exc:
      raise errors.DataError(
          f"Record {index} of dataset {self.name!r} is not valid UTF-8: byte "
          f"0x{data[exc.start]:02x} at byte offset {exc.start} of its {self._text_key!r} "
          "feature is invalid. Set --config.data.decode_errors=replace to read each invalid "
          "sequence as U+FFFD.") from exc

  def __repr__(self) -> str:
    return f"TextSource({self.name!r}, {len(self)} records)"


def _setting(data_config: Any, key: str, default: Any) -> Any:
  """Read data_config.<key> from a ConfigDict or a dict; missing, None or "" gives `default`."""
  value = data_config.get(key, None)
  return default if value is None or value == "" else value


def tfds_dir(data_config: Any) -> str:
  """Return the folder of prepared datasets: data.tfds_dir or ~/.cache/diffusion_text/tfds."""
  return os.path.expanduser(_setting(data_config, "tfds_dir", DEFAULT_TFDS_DIR))


def get_source(data_config: Any, split: str, collective: bool = True) -> TextSource:
  """Prepare (once) and open the `split` ("train" or "validation") of the configured source.

  With `collective`, every process of a multi-process run makes this call together: process 0
  prepares the data first while the others wait at a barrier, then the others open process 0's
  copy (in a shared `tfds_dir`) or prepare their own. Two processes preparing one dataset in a
  shared folder at once can fail on TFDS's final rename. Pass `collective=False` when only some
  processes make the call.

  Raises:
    DataError: bad text files, an unknown TFDS name or a split the dataset lacks.
    ConfigError: an invalid document mode, validation fraction or decode_errors policy.
  """
  if not collective or jax.process_count() == 1:
    return _prepare_and_open(data_config, split)
  # The other processes create their builders only after the barrier, because a TFDS builder
  # reads the dataset's metadata (its splits) when it is created.
  barrier = f"diffusion_text: prepare the {split} split"
  if jax.process_index() == 0:
    try:
      return _prepare_and_open(data_config, split)
    finally:
      # Reached also when preparing fails, so the others go on and report their own error.
      multihost_utils.sync_global_devices(barrier)
  multihost_utils.sync_global_devices(barrier)
  return _prepare_and_open(data_config, split)


def _prepare_and_open(data_config: Any, split: str) -> TextSource:
  data_dir = tfds_dir(data_config)
  decode_errors = _setting(data_config, "decode_errors", "strict")
  if decode_errors not in text_files.DECODE_ERRORS:
    raise errors.ConfigError(
        f"Unknown --config.data.decode_errors={decode_errors!r}. Use one of "
        f"{text_files.DECODE_ERRORS}.")
  files = _setting(data_config, "files", "")
  if files:
    plan = text_files.plan_text_files(
        files,
        validation_files=_setting(data_config, "validation_files", None),
        documents=_setting(data_config, "documents", "paragraph"),
        validation_fraction=float(_setting(data_config, "validation_fraction", 0.1)),
        decode_errors=decode_errors,
    )
    builder = builders.TextFilesBuilder(plan, data_dir=data_dir)
    if not builder.is_prepared():
      # Reads and checks every file before TFDS writes anything.
      builder.set_parts(plan.split_parts())
    return _open(builder, split, "text", name=f"files {files}", decode_errors=decode_errors)

  name = _setting(data_config, "name", BUNDLED_NAME)
  if name == BUNDLED_NAME:
    return _open(builders.ShakespeareBuilder(data_dir=data_dir), split, "text", name=name)
  return _open(_registered_builder(name, data_dir), split,
               _setting(data_config, "text_key", "text"), name=name,
               decode_errors=decode_errors)


def get_texts(data_config: Any, split: str, max_chars: int | None = None) -> Iterator[str]:
  """Yield the texts of `split` in record order, stopping once max_chars characters are out.

  Waits for no other process, so one process of a multi-process run can call it alone (process
  0 trains the tokenizer this way, after the collective `get_source` calls prepared the data).
  """
  source = get_source(data_config, split, collective=False)
  total = 0
  for index in range(len(source)):
    if max_chars is not None and total >= max_chars:
      return
    text = source[index]["text"]
    total += len(text)
    yield text


def _registered_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Return the TFDS builder registered as `name`."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as exc:
    raise errors.DataError(
        f"Unknown dataset {name!r}: it is neither {BUNDLED_NAME!r} nor a registered TFDS "
        "dataset. For local text files use --config.data.files='path/*.txt'.") from exc


def _open(builder: tfds.core.DatasetBuilder, split: str, text_key: str, name: str,
          decode_errors: str = "strict") -> TextSource:
  """Prepare the builder if needed and open `split`, using "test" when "validation" is absent."""
  builders.prepare(builder)
  available = list(builder.info.splits.keys())
  if split == "validation" and split not in available and "test" in available:
    logging.info("Dataset %s has no validation split; using its test split.", name)
    split = "test"
  if split not in available:
    raise errors.DataError(
        f"Split {split!r} not found in dataset {name!r}. Available splits: {available}.")

  data_source = builder.as_data_source(split=split)
  features = builder.info.features
  if text_key not in features:
    raise errors.DataError(
        f"Dataset {name!r} has no feature {text_key!r}. Set --config.data.text_key to one of "
        f"{sorted(features.keys())}.")
  return TextSource(data_source, text_key, name, decode_errors)
