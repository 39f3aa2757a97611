"""grain input pipelines: packed training batches that resume exactly, and padded eval batches.

Training: each process takes every process_count-th record and shuffles the records with the seed,
in a new order every epoch, forever. Each document is tokenized and followed by EOS. The documents
are concatenated and cut into seq_len windows without padding. The windows are shuffled within a
buffer, so one batch mixes many documents, and then batched.

Evaluation: the documents are packed the same way in record order. The last window is padded
with pad_id and mask 0, so every real token is counted exactly once.

Both pipelines check that every token id is in [0, vocab_size), once per document and once per
batch, because the embedding lookup does not: with JAX 0.10.2, `jnp.take` returns the last rows
of the table for a negative id and NaN for an id of vocab_size or more.
"""

from collections.abc import Iterator, Sequence
import copy
from typing import Any

import grain
import numpy as np

from diffusion_text import errors
from diffusion_text.data.tokenizer import Tokenizer

# Number of windows in the window-shuffle buffer. At seq_len 128 a buffer of 1024 mixes about 50
# Shakespeare scenes, takes 0.5 MB and needs tens of milliseconds to refill after a restore.
DEFAULT_SHUFFLE_WINDOW = 1024


def _check_batching(seq_len: int, batch_size: int, process_count: int, batch_flag: str):
  """Reject a window length or batch size the pipeline cannot use, naming the config key."""
  if seq_len < 2:
    raise errors.ConfigError(
        f"--config.data.seq_len={seq_len} is too short. Use at least 2, for example 128.")
  if batch_size < process_count or batch_size % process_count:
    valid = max(process_count, batch_size // process_count * process_count)
    raise errors.ConfigError(
        f"{batch_flag}={batch_size} must be a positive multiple of the process count "
        f"{process_count}, for example {valid}.")


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
  """Raise a DataError unless every id in `tokens` is in [0, vocab_size).

  `where` names the record or batch in the message, for example "Record 'a.txt:3'".
  """
  if not tokens.size or (tokens.min() >= 0 and tokens.max() < vocab_size):
    return
  position = np.argwhere((tokens < 0) | (tokens >= vocab_size))[0]
  bad_id = int(tokens[tuple(position)])
  raise errors.DataError(
      f"{where} has token id {bad_id} at position {tuple(int(i) for i in position)}, outside "
      f"the vocabulary [0, {vocab_size}), so it cannot index the embedding table. The "
      "tokenizer does not match the model: delete the tokenizer file so that a new one is "
      "trained, or use a tokenizer trained by Tokenizer.train.")


def _encode_document(tokenizer: Tokenizer):
  """Return a function from a record to its checked token ids followed by EOS, int32 [length]."""

  def encode(record: dict[str, str]) -> np.ndarray:
    ids = np.array(tokenizer.encode(record["text"]) + [tokenizer.eos_id], dtype=np.int64)
    check_token_ids(ids, tokenizer.vocab_size, f"Record {record['id']!r}")
    return ids.astype(np.int32)

  return encode


def _stack_train_rows(vocab_size: int):
  """Return grain's batch_fn: rows to {"tokens": int32 [rows, seq_len]}, with checked ids."""

  def stack(rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    tokens = np.stack(rows)
    check_token_ids(tokens, vocab_size, "A training batch")
    return {"tokens": tokens}

  return stack


class PackIterDataset(grain.IterDataset):
  """Concatenate 1-D token arrays and cut the stream into windows of exactly seq_len tokens.

  A final partial window is dropped, so training batches contain no padding. The iterator state holds
  only ints and the parent's state. grain 0.2.18's ConcatThenSplitIterDataset keeps tuples in its
  state, and after a JSON round trip (grain's checkpoint handler writes JSON) it restored to the
  wrong position in a test here, so this small packer is used instead.
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len)


class _PackIterator(grain.DatasetIterator):
  """Iterator state: the parent's state before the current document, and tokens used of it."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._document_l = np.zeros(0, np.int32)
    self._offset = 0
    self._document_state = self._parent.get_state()

  def __next__(self) -> np.ndarray:
    pieces = []
    needed = self._seq_len
    while needed:
      if self._offset == len(self._document_l):
        self._document_state = self._parent.get_state()
        self._document_l = next(self._parent)
        self._offset = 0
      take = min(needed, len(self._document_l) - self._offset)
      pieces.append(self._document_l[self._offset:self._offset + take])
      self._offset += take
      needed -= take
    return np.concatenate(pieces)

  def get_state(self) -> dict[str, Any]:
    return {"document_state": copy.deepcopy(self._document_state), "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._document_state = copy.deepcopy(state["document_state"])
    self._parent.set_state(self._document_state)
    self._offset = state["offset"]
    # Every document contains at least its EOS token, so offset 0 means no document was read yet.
    if self._offset:
      self._document_l = next(self._parent)
    else:
      self._document_l = np.zeros(0, np.int32)


def make_train_iterator(
    source: Sequence[dict[str, str]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
) -> grain.DatasetIterator:
  """Return an endless iterator of {"tokens": int32 [global_batch_size // process_count, seq_len]}.

  The same seed gives the same batches. `get_state()` returns a JSON-serialisable dict, and
  `set_state(state)` on a new iterator built with the same arguments continues with the batch
  that would have come next.

  Raises:
    ConfigError: seq_len < 2, or the batch size is not a multiple of process_count.
    DataError: this process's records hold fewer tokens than one batch. Later, from `next()`:
      a record or batch contains a token id outside [0, tokenizer.vocab_size).
  """
  _check_batching(seq_len, global_batch_size, process_count, "--config.train.batch_size")
  local_batch_size = global_batch_size // process_count
  records = grain.MapDataset.source(source)[process_index::process_count]
  _check_enough_tokens(records, tokenizer, local_batch_size * seq_len, process_index)

  record_seed, window_seed = np.random.SeedSequence(seed).generate_state(2).tolist()
  documents = (
      records.shuffle(seed=record_seed)
      .repeat()  # Each epoch gets a new order, because shuffle reseeds per epoch.
      .map(_encode_document(tokenizer))
      # Threads tokenize ahead while the training step runs; the order stays deterministic.
      .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  )
  windows = grain.experimental.WindowShuffleIterDataset(
      PackIterDataset(documents, seq_len=seq_len), window_size=shuffle_window,
      seed=window_seed)
  batches = windows.batch(
      local_batch_size, drop_remainder=True, batch_fn=_stack_train_rows(tokenizer.vocab_size))
  return iter(batches)


def _check_enough_tokens(records: grain.MapDataset, tokenizer: Tokenizer, needed: int,
                         process_index: int) -> None:
  """Raise a DataError unless the records contain at least `needed` tokens."""
  encode = _encode_document(tokenizer)
  total = 0
  for index in range(len(records)):
    total += len(encode(records[index]))
    if total >= needed:
      return
  raise errors.DataError(
      f"The training records of process {process_index} contain {total} tokens (with EOS), fewer "
      f"than one batch of {needed}. Reduce --config.train.batch_size or "
      "--config.data.seq_len, or add training text.")


def _pack_for_eval(
    source: Sequence[dict[str, str]], tokenizer: Tokenizer, seq_len: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yield (tokens int32 [seq_len], mask float32 [seq_len]) windows in record order."""
  encode = _encode_document(tokenizer)
  buffer_l = np.zeros(0, np.int32)
  for index in range(len(source)):
    buffer_l = np.concatenate([buffer_l, encode(source[index])])
    while len(buffer_l) >= seq_len:
      yield buffer_l[:seq_len], np.ones(seq_len, np.float32)
      buffer_l = buffer_l[seq_len:]
  if len(buffer_l):
    tokens_l = np.full(seq_len, tokenizer.pad_id, np.int32)
    tokens_l[:len(buffer_l)] = buffer_l
    mask_l = np.zeros(seq_len, np.float32)
    mask_l[:len(buffer_l)] = 1.0
    yield tokens_l, mask_l


def make_eval_batches(
    source: Sequence[dict[str, str]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
) -> list[dict[str, np.ndarray]]:
  """Return eval batches {"tokens": int32 [b, seq_len], "mask": float32 [b, seq_len]}.

  `batch_size` is global and b = batch_size // process_count. Every process packs all records
  and keeps its own rows of each global batch, so all processes get the same number of batches
  (a jit step over a global batch needs every process to take part). Padding rows and positions
  have mask 0, so the sum of all masks over all processes equals the split's token count with
  one EOS per document. `max_batches` stops early for a quick estimate.

  Raises:
    ConfigError: seq_len < 2, or batch_size is not a multiple of process_count.
    DataError: the split contains no text, or a record or batch contains a token id outside
      [0, tokenizer.vocab_size).
  """
  _check_batching(seq_len, batch_size, process_count, "eval batch_size")
  local_batch_size = batch_size // process_count
  first_row = process_index * local_batch_size

  batches = []
  rows: list[tuple[np.ndarray, np.ndarray]] = []
  windows = _pack_for_eval(source, tokenizer, seq_len)
  while max_batches is None or len(batches) < max_batches:
    window = next(windows, None)
    if window is not None:
      rows.append(window)
    elif rows:
      padding = (np.full(seq_len, tokenizer.pad_id, np.int32), np.zeros(seq_len, np.float32))
      rows.extend([padding] * (batch_size - len(rows)))
    else:
      break
    if len(rows) == batch_size:
      local_rows = rows[first_row:first_row + local_batch_size]
      tokens = np.stack([tokens_l for tokens_l, _ in local_rows])
      check_token_ids(tokens, tokenizer.vocab_size, f"Evaluation batch {len(batches)}")
      batches.append({"tokens": tokens, "mask": np.stack([mask_l for _, mask_l in local_rows])})
      rows = []

  if not batches:
    raise errors.DataError("The evaluation split is empty: it contains no text to evaluate.")
  return batches
