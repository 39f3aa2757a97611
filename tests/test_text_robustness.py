"""Odd text through the data layer: line endings, separators, NUL, invalid UTF-8, huge lines,
arbitrary Unicode through the tokenizer, out-of-range token ids, and no network access."""

import io
import logging
import random
import socket
import time

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest
import sentencepiece as spm

from diffusion_text import errors
from diffusion_text.data import corpus
from diffusion_text.data import pipeline
from diffusion_text.data import sources
from diffusion_text.data import text_files
from diffusion_text.data import tokenizer as tokenizer_lib
from diffusion_text.data.tokenizer import Tokenizer

VOCAB_SIZE = 400


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
  texts = [scene["text"] for scene in corpus.scenes_for_split("validation")]
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
  return Tokenizer.train(texts, VOCAB_SIZE, path, max_chars=100_000, num_threads=1)


def _write_bytes(path, data: bytes):
  path.write_bytes(data)
  return path


def _texts(source) -> list[str]:
  # TFDS orders records by a hash of their ids, which contain the file path, so callers that
  # expect several records sort them.
  return [source[index]["text"] for index in range(len(source))]


# Line endings, separators and whitespace.


@pytest.mark.parametrize("text, documents, expected", [
    # CR LF and lone CR break lines like LF; a blank line between them separates paragraphs.
    ("one\r\ntwo\r\n\r\nthree\r\n", "paragraph", ["one\r\ntwo", "three"]),
    ("one\rtwo\r\rthree\r", "paragraph", ["one\rtwo", "three"]),
    ("one\r\ntwo\n\rthree", "paragraph", ["one\r\ntwo", "three"]),
    ("one\r\ntwo\rthree\n", "line", ["one", "two", "three"]),
    # CR LF is one line break, never an empty line between CR and LF.
    ("one\r\ntwo\r\n", "paragraph", ["one\r\ntwo"]),
    # Whitespace-only lines are blank: spaces, tabs, form feed, no-break space, U+0085.
    ("one\n \t\ntwo\n\x0c\nthree\n\u00a0\nfour\n\x85\nfive", "paragraph",
     ["one", "two", "three", "four", "five"]),
    ("one\n   \n\t\ntwo\n", "line", ["one", "two"]),
    # Form feed and U+0085 inside a line are ordinary characters.
    ("page\x0cbreak\x85here\n", "line", ["page\x0cbreak\x85here"]),
    # U+2028 breaks a line; U+2029 ends a paragraph.
    ("one\u2028two\u2028\u2028three", "paragraph", ["one\u2028two", "three"]),
    ("one\u2028two\u2029three\u2029\u2029four", "paragraph", ["one\u2028two", "three", "four"]),
    ("one\u2029\ntwo\n\u2029three", "paragraph", ["one", "two", "three"]),
    ("one\u2028two\u2029three", "line", ["one", "two", "three"]),
    ("one\u2029two\u2028", "file", ["one\u2029two"]),
    # Indentation and trailing spaces of content lines are kept.
    ("\n\n  indented\n  more  \n\n\n", "file", ["  indented\n  more  "]),
    # Emoji, skin tones, ZWJ sequences and combining marks pass unchanged.
    ("\U0001f600 \U0001f44d\U0001f3fd\n\n\U0001f468\u200d\U0001f469\u200d\U0001f467\n\n"
     "e\u0301 a\u0308\u0323", "paragraph",
     ["\U0001f600 \U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467",
      "e\u0301 a\u0308\u0323"]),
])
def test_split_documents_line_breaks(text, documents, expected):
  assert text_files.split_documents(text, documents) == expected


def test_split_documents_many_blank_lines_fast():
  # 100,000 empty lines between two words. Trimming them with a regex anchored at the end of the
  # text retried at every line break, which took about a minute here.
  text = "first" + "\n" * 100_000 + " \n" * 100_000 + "last"
  start = time.perf_counter()
  for documents in text_files.DOCUMENT_MODES:
    text_files.split_documents(text, documents)
  elapsed = time.perf_counter() - start

  assert text_files.split_documents(text, "file") == [text]
  assert text_files.split_documents(text, "paragraph") == ["first", "last"]
  assert elapsed < 5.0


def test_files_odd_text_survives_preparation(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  # A UTF-8 byte order mark, CR LF, a lone CR, U+2028, U+2029, emoji and combining marks.
  odd = ("\ufeffWindows line\r\nsecond line\r\n\r\nOld Mac\rline\r\r"
         "separated\u2028lines\u2029emoji \U0001f600\U0001f3fd e\u0301\n")
  _write_bytes(data / "a.txt", odd.encode("utf-8"))
  _write_bytes(data / "b.txt", b"held out\n")
  config = {"tfds_dir": str(tmp_path / "tfds"), "files": str(data / "*.txt")}

  train = sorted(_texts(sources.get_source(config, "train")))

  assert train == sorted(["Windows line\r\nsecond line", "Old Mac\rline",
                          "separated\u2028lines", "emoji \U0001f600\U0001f3fd e\u0301"])


def test_files_multi_megabyte_line(tmp_path):
  long_line = " ".join(f"word{index % 997}" for index in range(400_000))  # 3.6 MB.
  path = tmp_path / "long.txt"
  path.write_text(f"{long_line}\nshort line\n", encoding="utf-8")
  config = {"tfds_dir": str(tmp_path / "tfds"), "files": str(path), "documents": "line",
            "validation_fraction": 0.5}

  train = _texts(sources.get_source(config, "train"))
  validation = _texts(sources.get_source(config, "validation"))

  assert len(long_line.encode("utf-8")) > 3_000_000
  assert train == [long_line]
  assert validation == ["short line"]


# Files that are rejected.


def _prepare_error(tmp_path, data: bytes, **config) -> str:
  good = _write_bytes(tmp_path / "a.txt", b"some text\n")
  bad = _write_bytes(tmp_path / "b.txt", data)
  tfds_dir = tmp_path / "tfds"
  config = {"tfds_dir": str(tfds_dir), "files": f"{good},{bad}", **config}
  with pytest.raises(errors.DataError) as info:
    sources.get_source(config, "train")
  assert str(bad) in str(info.value)
  assert not tfds_dir.exists() or not list(tfds_dir.rglob("*.array_record*"))
  return str(info.value)


def test_files_nul_byte_rejected(tmp_path):
  data = b"line one\r\nline two\nline\rfour \x00 here\n"
  offset = data.index(b"\x00")
  message = _prepare_error(tmp_path, data)

  assert f"line 4 (byte offset {offset})" in message
  assert "NUL" in message


def test_files_nul_byte_rejected_under_replace(tmp_path):
  message = _prepare_error(tmp_path, b"text\x00\n", decode_errors="replace")

  assert "line 1 (byte offset 4)" in message


@pytest.mark.parametrize("text, encoding, fragment", [
    # ASCII characters in UTF-16 contain NUL bytes.
    ("hello\nworld\n", "utf-16", "NUL byte at line 1 (byte offset 3)"),
    ("hello\nworld\n", "utf-16-le", "NUL byte at line 1 (byte offset 1)"),
    # These have none, so the byte order mark is the first invalid UTF-8.
    ("\u65e5\u672c\u8a9e", "utf-16", "byte 0xff at line 1 (byte offset 0)"),
])
def test_files_utf16_rejected(tmp_path, text, encoding, fragment):
  message = _prepare_error(tmp_path, text.encode(encoding))

  assert fragment in message
  assert "iconv -f UTF-16 -t UTF-8" in message


def test_files_invalid_utf8_names_line_and_offset(tmp_path):
  data = "first\nsecond caf\u00e9\n".encode("utf-8") + b"third na\xefve\n"
  offset = data.index(b"\xef")
  message = _prepare_error(tmp_path, data)

  assert f"byte 0xef at line 3 (byte offset {offset})" in message
  assert "--config.data.decode_errors=replace" in message


def test_files_truncated_utf8_at_end(tmp_path):
  data = "text \U0001f600".encode("utf-8")[:-2]
  message = _prepare_error(tmp_path, data)

  assert f"byte offset {len(data) - 2}" in message


def test_files_byte_order_mark_only_rejected(tmp_path):
  message = _prepare_error(tmp_path, b"\xef\xbb\xbf\n")

  assert "only whitespace" in message


# The decode_errors policy.


def test_decode_errors_replace_reads_fffd(tmp_path, caplog):
  path = _write_bytes(tmp_path / "latin1.txt",
                     b"caf\xe9 one\n\nna\xefve \xff\xfe two\n\nvalid \xef\xbf\xbd three\n")
  config = {"tfds_dir": str(tmp_path / "tfds"), "files": str(path),
            "decode_errors": "replace", "validation_fraction": 0.34}

  with caplog.at_level(logging.WARNING):
    train = sorted(_texts(sources.get_source(config, "train")))
  validation = _texts(sources.get_source(config, "validation"))

  assert train == ["caf\ufffd one", "na\ufffdve \ufffd\ufffd two"]
  assert validation == ["valid \ufffd three"]
  warnings = [record.getMessage() for record in caplog.records
              if record.levelno == logging.WARNING and str(path) in record.getMessage()]
  assert len(warnings) == 1
  assert "4 invalid byte sequences" in warnings[0]
  assert "line 1 (byte offset 3)" in warnings[0]


def test_decode_errors_in_cache_key(tmp_path):
  path = _write_bytes(tmp_path / "mixed.txt", b"good one\n\nbad \xff two\n\nthree\n")
  base = {"tfds_dir": str(tmp_path / "tfds"), "files": str(path)}

  replaced = sorted(_texts(sources.get_source({**base, "decode_errors": "replace"}, "train")))
  # The strict policy must not reuse the dataset prepared with replacements.
  with pytest.raises(errors.DataError, match="byte offset 14"):
    sources.get_source({**base, "decode_errors": "strict"}, "train")

  assert replaced == ["bad \ufffd two", "good one"]
  strict_key = text_files.plan_text_files(str(path)).cache_key()
  replace_key = text_files.plan_text_files(str(path), decode_errors="replace").cache_key()
  assert strict_key != replace_key


def test_decode_errors_unknown_value(tmp_path):
  path = _write_bytes(tmp_path / "a.txt", b"text\n\nmore\n")
  config = {"tfds_dir": str(tmp_path / "tfds"), "files": str(path), "decode_errors": "ignore"}

  with pytest.raises(errors.ConfigError, match="--config.data.decode_errors='ignore'"):
    sources.get_source(config, "train")
  with pytest.raises(errors.ConfigError, match="--config.data.decode_errors='ignore'"):
    sources.get_source({"tfds_dir": str(tmp_path / "tfds"), "decode_errors": "ignore"}, "train")


@pytest.mark.parametrize("decode_errors, expected", [("strict", None), ("replace", "a\ufffdb")])
def test_text_source_decodes_bytes_by_policy(decode_errors, expected):
  records = [{"id": b"ok", "text": b"fine"}, {"id": b"bad", "text": b"a\xffb"}]
  source = sources.TextSource(records, "text", "in-memory", decode_errors)

  assert source[0] == {"id": "ok", "text": "fine"}
  if expected is None:
    with pytest.raises(errors.DataError, match=r"Record 1 of dataset 'in-memory'.*byte offset 1"):
      source[1]  # pylint: disable=pointless-statement
  else:
    assert source[1]["text"] == expected


# Tokenizer: exact round trip for any Unicode text.

_SPACES = st.integers(1, 300).map(lambda count: " " * count)
_CONTROLS = st.text(st.characters(categories=["Cc"]), min_size=1, max_size=20)
_SEPARATORS = st.text(st.sampled_from("\r\n\t\x0b\x0c\x85\u2028\u2029\u00a0\u2581\ufeff"),
                      min_size=1, max_size=20)
_ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)
_MIXED_TEXT = st.lists(st.one_of(_ANY_TEXT, _SPACES, _CONTROLS, _SEPARATORS),
                       max_size=8).map("".join)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=_MIXED_TEXT)
def test_tokenizer_round_trip_any_text(tokenizer, text):
  ids = tokenizer.encode(text)

  assert tokenizer.decode(ids) == text
  assert all(0 <= token_id < tokenizer.vocab_size for token_id in ids)


def test_tokenizer_rejects_lone_surrogate(tokenizer):
  with pytest.raises(UnicodeEncodeError, match="position 3"):
    tokenizer.encode("abc\ud800def")


def _raw_sentencepiece_model(**options) -> bytes:
  model = io.BytesIO()
  text = "the quick brown fox jumps over the lazy dog. " * 200
  # hard_vocab_limit=False lets the tiny text fill fewer pieces than vocab_size.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split(". ")), model_writer=model,
                                 hard_vocab_limit=False, minloglevel=2, **options)
  return model.getvalue()


_FIXED_IDS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)


@pytest.mark.parametrize("options, fragment", [
    # sentencepiece's defaults: pad -1, unk 0, bos 1, eos 2.
    (dict(vocab_size=40), "pad -1 (expected 0)"),
    (dict(vocab_size=40, **_FIXED_IDS), "missing the byte fallback pieces"),
    # Byte fallback but NFKC normalisation, a dummy prefix and whitespace clean-up.
    (dict(vocab_size=300, byte_fallback=True, **_FIXED_IDS), "does not round-trip"),
])
def test_tokenizer_rejects_incompatible_model(options, fragment):
  model = _raw_sentencepiece_model(**options)

  with pytest.raises(errors.DataError) as info:
    Tokenizer.from_bytes(model)
  assert fragment in str(info.value)


def test_tokenizer_trains_on_multi_megabyte_line(tmp_path):
  rng = random.Random(0)
  syllables = ["ka", "to", "ri", "mu", "sen", "lo", "pa", "qui", "dre", "vo", "ne", "shi"]
  words = ["".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(2000)]
  long_line = " ".join(rng.choice(words) for _ in range(400_000))  # About 3 MB, no line break.

  trained = Tokenizer.train([long_line], 500, tmp_path / "t.model", num_threads=1)
  sample = long_line[:5000]

  assert len(long_line.encode("utf-8")) > 3_000_000
  assert trained.decode(trained.encode(sample)) == sample
  # Were the line skipped, only bytes and single characters would be in the vocabulary.
  assert len(trained.encode(sample)) < len(sample) / 2


def test_tokenizer_training_chunks_wide_characters():
  line = "\U0001f600" * 5000 + "e\u0301" * 3000
  sentences = list(tokenizer_lib._training_sentences([line], 10**9))

  assert "".join(sentences) == line
  assert max(len(s.encode("utf-8")) for s in sentences) <= tokenizer_lib.MAX_SENTENCE_BYTES


# Token ids entering the model.


class _CorruptingTokenizer:
  """A tokenizer whose encode returns `bad_id` for the record whose text is "corrupt"."""

  def __init__(self, tokenizer: Tokenizer, bad_id: int):
    self._tokenizer = tokenizer
    self._bad_id = bad_id
    self.vocab_size = tokenizer.vocab_size
    self.pad_id = tokenizer.pad_id
    self.eos_id = tokenizer.eos_id

  def encode(self, text: str) -> list[int]:
    ids = self._tokenizer.encode(text)
    return ids[:2] + [self._bad_id] + ids[2:] if text == "corrupt" else ids


def _records(count: int) -> list[dict[str, str]]:
  records = [{"id": f"doc{index}", "text": f"good text number {index} " * 20}
             for index in range(count)]
  records[count // 2] = {"id": "the-bad-one", "text": "corrupt"}
  return records


@pytest.mark.parametrize("bad_id", [-1, VOCAB_SIZE, 2**31])
def test_eval_batches_reject_out_of_range_id(tokenizer, bad_id):
  corrupting = _CorruptingTokenizer(tokenizer, bad_id)

  with pytest.raises(errors.DataError) as info:
    pipeline.make_eval_batches(_records(9), corrupting, seq_len=16, batch_size=4)

  message = str(info.value)
  assert "Record 'the-bad-one'" in message
  assert f"token id {bad_id} at position (2,)" in message
  assert f"[0, {VOCAB_SIZE})" in message


@pytest.mark.parametrize("bad_id", [-1, VOCAB_SIZE])
def test_train_iterator_rejects_out_of_range_id(tokenizer, bad_id):
  corrupting = _CorruptingTokenizer(tokenizer, bad_id)

  with pytest.raises(errors.DataError, match=f"Record 'the-bad-one' has token id {bad_id}"):
    iterator = pipeline.make_train_iterator(
        _records(9), corrupting, seq_len=16, global_batch_size=2, seed=0, shuffle_window=4)
    for _ in range(100):
      next(iterator)


@pytest.mark.parametrize("bad_id", [-1, VOCAB_SIZE])
def test_train_batch_rejects_out_of_range_id(bad_id):
  rows = [np.arange(8, dtype=np.int32), np.arange(8, dtype=np.int32)]
  rows[1][5] = bad_id
  stack = pipeline._stack_train_rows(VOCAB_SIZE)

  with pytest.raises(errors.DataError,
                     match=rf"A training batch has token id {bad_id} at position \(1, 5\)"):
    stack(rows)
  assert stack(rows[:1])["tokens"].shape == (1, 8)


def test_check_token_ids_accepts_full_range():
  tokens = np.array([[0, 1, VOCAB_SIZE - 1]], np.int32)

  pipeline.check_token_ids(tokens, VOCAB_SIZE, "batch")
  pipeline.check_token_ids(np.zeros((0, 4), np.int32), VOCAB_SIZE, "empty batch")


# No network access.


@pytest.fixture
def network_attempts(monkeypatch) -> list[str]:
  """Make every Python-level socket connection and name lookup fail, and record each try.

  Recording catches attempts whose OSError a library swallows. A C extension that opens its
  own sockets is not covered.
  """
  attempts = []

  def blocked(name):
    def reject(*args, **kwargs):
      attempts.append(f"{name}{args[1:] if name.startswith('socket.socket') else args}")
      raise OSError(f"network access attempted during a test: {name}")
    return reject

  for name in ("connect", "connect_ex", "sendto"):
    monkeypatch.setattr(socket.socket, name, blocked(f"socket.socket.{name}"))
  for name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex"):
    monkeypatch.setattr(socket, name, blocked(f"socket.{name}"))
  return attempts


def test_network_blocker_records_attempts(network_attempts):
  with pytest.raises(OSError, match="network access attempted"):
    socket.getaddrinfo("localhost", 80)

  assert network_attempts == ["socket.getaddrinfo('localhost', 80)"]


def test_prepare_read_and_train_offline(tmp_path, network_attempts):
  data = tmp_path / "data"
  data.mkdir()
  scenes = [scene["text"] for scene in corpus.scenes_for_split("validation")][:9]
  for index in range(3):
    (data / f"part{index}.txt").write_text("\n\n".join(scenes[index::3]), encoding="utf-8")
  bundled = {"tfds_dir": str(tmp_path / "tfds")}
  files = {"tfds_dir": str(tmp_path / "tfds"), "files": str(data / "*.txt")}

  for config in (bundled, files):
    train = sources.get_source(config, "train")
    validation = sources.get_source(config, "validation")
    texts = sources.get_texts(config, "train", max_chars=50_000)
    trained = Tokenizer.train(texts, VOCAB_SIZE, tmp_path / "t.model", num_threads=1)
    iterator = pipeline.make_train_iterator(train, trained, seq_len=16, global_batch_size=2,
                                            seed=0, shuffle_window=4)
    batch = next(iterator)
    eval_batches = pipeline.make_eval_batches(validation, trained, seq_len=16, batch_size=2,
                                              max_batches=2)

    assert len(train) > 0
    assert len(validation) > 0
    assert batch["tokens"].shape == (2, 16)
    assert len(eval_batches) == 2
  prepared = {path.name for path in (tmp_path / "tfds").iterdir()}
  assert {"diffusion_text_files", "diffusion_text_shakespeare"} <= prepared
  # TFDS creates the folders downloads/ and downloads/extracted/; no file may appear in them.
  assert not [path for path in (tmp_path / "tfds").glob("downloads/**/*") if path.is_file()]
  assert network_attempts == []
