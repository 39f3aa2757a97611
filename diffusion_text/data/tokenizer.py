"""A sentencepiece unigram tokenizer that round-trips any text exactly.

Exact round trip means `decode(encode(text)) == text` for every string that UTF-8 can encode (every
string without a lone surrogate): spaces, tabs, CR/LF, NUL,
emoji, combining marks and unseen scripts included. It comes from identity normalisation, no
dummy prefix, kept whitespace, and byte fallback for characters outside the vocabulary. The
model proto is small enough to store next to a checkpoint, so a run always decodes with the
tokenizer it was trained with.
"""

from collections.abc import Iterable, Iterator, Sequence
import io
import os
import re
import tempfile

import sentencepiece as spm

from diffusion_text import errors

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

# sentencepiece skips training sentences longer than this many bytes (its default); longer lines
# are cut into chunks of at most this many bytes instead.
MAX_SENTENCE_BYTES = 4192
# Characters of training text read by default. On a shared 2-core machine, 2 M characters of the
# bundled corpus trained in 2 to 7 s for vocab_size 500 to 8000 (smaller vocabularies are slower).
DEFAULT_MAX_CHARS = 2_000_000

# sentencepiece writes spaces as U+2581 inside pieces, so a literal U+2581 in the input would
# decode as a space. The tokenizer encodes that character through its UTF-8 byte pieces instead.
_SPACE_SYMBOL = "\u2581"
# Text that only a model with the settings of `Tokenizer.train` round-trips. A leading space
# fails with a dummy prefix, doubled spaces and a tab fail with whitespace clean-up, and a no-break
# space and a combining accent fail with NFKC. The last character needs byte fallback.
_ROUND_TRIP_PROBE = " a  b\t\u00a0e\u0301\r\n\U0001fab7 "


def _training_sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Yield the non-empty lines of `texts`, chunked to MAX_SENTENCE_BYTES, up to max_chars."""
  # Four bytes is the longest UTF-8 encoding of one character.
  chunk_chars = MAX_SENTENCE_BYTES // 4
  remaining = max_chars
  for text in texts:
    for line in text.splitlines():
      line = line[:remaining]
      for start in range(0, len(line), chunk_chars):
        yield line[start:start + chunk_chars]
      remaining -= len(line)
      if remaining <= 0:
        return


class Tokenizer:
  """Text to token ids and back, with fixed ids for pad 0, unk 1, bos 2 and eos 3."""

  pad_id = PAD_ID
  unk_id = UNK_ID
  bos_id = BOS_ID
  eos_id = EOS_ID

  def __init__(self, processor: spm.SentencePieceProcessor):
    """Wrap a loaded model after checking its special ids, byte pieces and round trip.

    Raises:
      DataError: the model was not trained with the settings of `Tokenizer.train`.
    """
    self._processor = processor
    self.vocab_size: int = processor.get_piece_size()
    _check_special_ids(processor)
    self._space_symbol_ids = [processor.piece_to_id(f"<0x{byte:02X}>")
                              for byte in _SPACE_SYMBOL.encode("utf-8")]
    self._skipped_ids = frozenset((PAD_ID, BOS_ID, EOS_ID))
    if self.decode(self.encode(_ROUND_TRIP_PROBE)) != _ROUND_TRIP_PROBE:
      raise errors.DataError(
          f"The tokenizer model does not round-trip {ascii(_ROUND_TRIP_PROBE)} exactly, so it was "
          "not trained by Tokenizer.train (identity normalisation, no dummy prefix, kept "
          "whitespace). Delete the tokenizer file so that a new one is trained.")

  @classmethod
  def train(
      cls,
      texts: Iterable[str],
      vocab_size: int,
      path: str | os.PathLike[str],
      *,
      max_chars: int = DEFAULT_MAX_CHARS,
      num_threads: int | None = None,
  ) -> "Tokenizer":
    """Train a unigram model on the lines of `texts`, write it to `path` and load it.

    Training reads at most `max_chars` characters. The model bytes are the same on every run
    with the same text and `num_threads` (default: the CPU count). With sentencepiece 0.2.3 a
    different thread count gives a different model, so a run stores its trained model.
    """
    num_threads = num_threads or os.cpu_count() or 1
    model_proto = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=_training_sentences(texts, max_chars),
          model_writer=model_proto,
          model_type="unigram",
          vocab_size=vocab_size,
          normalization_rule_name="identity",
          add_dummy_prefix=False,
          remove_extra_whitespaces=False,
          byte_fallback=True,
          split_digits=True,
          allow_whitespace_only_pieces=True,
          max_sentence_length=MAX_SENTENCE_BYTES,
          pad_id=PAD_ID,
          unk_id=UNK_ID,
          bos_id=BOS_ID,
          eos_id=EOS_ID,
          num_threads=num_threads,
          minloglevel=2,
      )
    except RuntimeError as exc:
      raise _training_error(exc, vocab_size) from exc

    serialized = model_proto.getvalue()
    _write_atomically(os.fspath(path), serialized)
    return cls.from_bytes(serialized)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> "Tokenizer":
    """Load a .model file written by `train`."""
    with open(path, "rb") as f:
      return cls.from_bytes(f.read())

  @classmethod
  def from_bytes(cls, serialized: bytes) -> "Tokenizer":
    """Load a model from the bytes returned by `serialized()`."""
    return cls(spm.SentencePieceProcessor(model_proto=serialized))

  def serialized(self) -> bytes:
    """Return the model proto, the same bytes as the .model file."""
    return self._processor.serialized_model_proto()

  def encode(self, text: str) -> list[int]:
    """Return the token ids of `text`, without bos or eos.

    Every id is in [0, vocab_size), because sentencepiece returns ids of its own pieces.
    `text` must be encodable as UTF-8, so a lone surrogate such as "\\ud800" raises
    UnicodeEncodeError.
    """
    if _SPACE_SYMBOL not in text:
      return self._encode_utf8(text)
    ids = []
    for index, part in enumerate(text.split(_SPACE_SYMBOL)):
      if index:
        ids.extend(self._space_symbol_ids)
      ids.extend(self._encode_utf8(part))
    return ids

  def _encode_utf8(self, text: str) -> list[int]:
    try:
      return self._processor.encode(text)
    except RuntimeError:
      # For a str that UTF-8 cannot encode, sentencepiece 0.2.3 raises a RuntimeError that names
      # neither the character nor its index; UnicodeEncodeError names both.
      text.encode("utf-8")
      raise

  def decode(self, ids: Sequence[int]) -> str:
    """Return the text of `ids`, skipping pad, bos and eos.

    Raises:
      ValueError: an id is negative or not below `vocab_size`.
    """
    ids = [int(token_id) for token_id in ids]
    for token_id in ids:
      if not 0 <= token_id < self.vocab_size:
        raise ValueError(
            f"Token id {token_id} is outside the vocabulary [0, {self.vocab_size}).")
    return self._processor.decode([i for i in ids if i not in self._skipped_ids])


def _check_special_ids(processor: spm.SentencePieceProcessor) -> None:
  """Raise a DataError unless the model has the fixed special ids and all 256 byte pieces."""
  special = {"pad": (processor.pad_id(), PAD_ID), "unk": (processor.unk_id(), UNK_ID),
             "bos": (processor.bos_id(), BOS_ID), "eos": (processor.eos_id(), EOS_ID)}
  wrong = [f"{name} {found} (expected {expected})"
           for name, (found, expected) in special.items() if found != expected]
  if wrong:
    # sentencepiece's default pad id is -1, which would index the embedding table from the end.
    raise errors.DataError(
        f"The tokenizer model has special ids {', '.join(wrong)}. diffusion_text needs pad 0, "
        "unk 1, bos 2 and eos 3: train the model with Tokenizer.train, or delete the tokenizer "
        "file so that a new one is trained.")
  byte_ids = [processor.piece_to_id(f"<0x{byte:02X}>") for byte in range(256)]
  if not all(processor.is_byte(piece_id) for piece_id in byte_ids):
    raise errors.DataError(
        "The tokenizer model is missing the byte fallback pieces <0x00> to <0xFF>, so characters "
        "outside its vocabulary would become unk and not round-trip. Train it with "
        "Tokenizer.train, or delete the tokenizer file so that a new one is trained.")


def _training_error(exc: RuntimeError, vocab_size: int) -> Exception:
  """Turn sentencepiece's vocabulary-size errors into a DataError that names the flag."""
  too_large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                        str(exc))
  if too_large:
    return errors.DataError(
        f"The training text is too small for a vocabulary of {vocab_size} pieces. Set "
        f"--config.tokenizer.vocab_size to at most {too_large.group(1)}, or train on more text.")
  # The minimum is 4 special pieces, 256 byte pieces and every character of the training text.
  too_small = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)",
                        str(exc))
  if too_small:
    return errors.DataError(
        f"A vocabulary of {vocab_size} pieces cannot hold the byte pieces, special pieces and "
        f"characters of the training text. Set --config.tokenizer.vocab_size to at least "
        f"{too_small.group(1)}.")
  return exc


def _write_atomically(path: str, data: bytes) -> None:
  """Write `data` to a temporary file next to `path`, then rename it over `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, prefix=".tokenizer-", delete=False) as f:
    f.write(data)
    temporary = f.name
  try:
    os.replace(temporary, path)
  except OSError:
    os.unlink(temporary)
    raise
