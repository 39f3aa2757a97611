"""The user's text files: glob expansion, input checks, document splitting and the split plan.

Planning is cheap (glob and stat only) and yields the cache key of the prepared dataset.
Reading and checking every file happens only when the dataset must be prepared, and it finishes
before anything is written, so bad input leaves no partial dataset behind.
"""

from collections.abc import Iterator
import dataclasses
import glob
import hashlib
import json
import os
import re

from diffusion_text import errors

# Document modes: cut a file at blank lines, keep it whole, or cut it at every line break.
DOCUMENT_MODES = ("paragraph", "file", "line")

# One line break; a lone CR counts, but CR LF is one break, never two.
_BREAK = r"(?:\r\n|\n|\r(?!\n))"
# A line break followed by one or more lines that are empty or hold only whitespace.
_BLANK_LINES = re.compile(_BREAK + r"(?:[^\S\r\n]*" + _BREAK + ")+")
_LINE_BREAK = re.compile(_BREAK)
_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\r\n]*" + _BREAK + ")+")
_TRAILING_BLANK_LINES = re.compile(_BREAK + r"\s*\Z")


@dataclasses.dataclass(frozen=True)
class FilePart:
  """Documents [start, stop) of one file; stop None means through the last document."""

  path: str
  start: int = 0
  stop: int | None = None


@dataclasses.dataclass(frozen=True)
class TextFilesPlan:
  """The files of each split and the settings that decide their documents."""

  documents: str
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]
  validation_fraction: float
  # (path, size in bytes, modification time in ns) of every file, in plan order.
  file_stats: tuple[tuple[str, int, int], ...]

  def cache_key(self) -> str:
    """Return a hash of paths, sizes, mtimes and split settings, naming the prepared folder."""
    payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

  def split_parts(self) -> dict[str, list[FilePart]]:
    """Check every file, then return the file parts of "train" and "validation".

    With a single file and no validation files, the last `validation_fraction` of its
    documents (at least one) form the validation split.

    Raises:
      DataError: a file is missing, empty, whitespace-only or not UTF-8, or a single file has
        fewer than two documents to split.
    """
    counts = {path: len(split_documents(read_text(path), self.documents))
              for path, _, _ in self.file_stats}
    if self.validation_files:
      return {
          "train": [FilePart(path) for path in self.train_files],
          "validation": [FilePart(path) for path in self.validation_files],
      }

    (path,) = self.train_files
    num_documents = counts[path]
    if num_documents < 2:
      raise errors.DataError(
          f"{path} contains a single document, so it cannot be split into train and validation. "
          "Add more text, use --config.data.documents=line, or name held-out files with "
          "--config.data.validation_files.")
    num_validation = min(num_documents - 1,
                         max(1, round(num_documents * self.validation_fraction)))
    stop = num_documents - num_validation
    return {"train": [FilePart(path, 0, stop)], "validation": [FilePart(path, stop, None)]}


def find_files(globs: str, flag: str) -> list[str]:
  """Expand comma-separated globs into sorted absolute paths of regular files.

  Raises:
    DataError: a glob matches no file, or a plain path does not exist.
  """
  paths = set()
  for pattern in (part.strip() for part in globs.split(",")):
    if not pattern:
      continue
    expanded = os.path.expanduser(pattern)
    matches = [path for path in glob.glob(expanded, recursive=True) if os.path.isfile(path)]
    if not matches and not glob.has_magic(expanded):
      raise errors.DataError(f"Text file not found: {pattern}. Check {flag}.")
    if not matches:
      raise errors.DataError(
          f"The glob {pattern!r} matches no files. Check {flag}, for example "
          f"{flag}='data/*.txt'.")
    paths.update(os.path.realpath(path) for path in matches)
  if not paths:
    raise errors.DataError(f"{flag} is empty. Set it to one or more comma-separated globs.")
  return sorted(paths)


def plan_text_files(
    files: str,
    *,
    validation_files: str | None = None,
    documents: str = "paragraph",
    validation_fraction: float = 0.1,
) -> TextFilesPlan:
  """Choose the train and validation files without reading them.

  Without `validation_files`, the last files in sorted path order are held out: a
  `validation_fraction` of them, at least one, and at least one file stays for training.

  Raises:
    ConfigError: `documents` or `validation_fraction` is invalid.
    DataError: a glob matches nothing or a file is missing.
  """
  if documents not in DOCUMENT_MODES:
    raise errors.ConfigError(
        f"Unknown --config.data.documents={documents!r}. Use one of {DOCUMENT_MODES}.")
  if not 0.0 < validation_fraction < 1.0:
    raise errors.ConfigError(
        f"--config.data.validation_fraction={validation_fraction} must be between 0 and 1 "
        "(exclusive), for example 0.1.")

  train_paths = find_files(files, "--config.data.files")
  if validation_files:
    held_out = find_files(validation_files, "--config.data.validation_files")
    train_paths = [path for path in train_paths if path not in held_out]
    if not train_paths:
      raise errors.DataError(
          "Every file of --config.data.files is also in --config.data.validation_files, "
          "so no file is left for training.")
  elif len(train_paths) >= 2:
    num_held_out = min(len(train_paths) - 1,
                       max(1, round(len(train_paths) * validation_fraction)))
    held_out = train_paths[-num_held_out:]
    train_paths = train_paths[:-num_held_out]
  else:
    held_out = []

  stats = []
  for path in train_paths + held_out:
    stat = os.stat(path)
    stats.append((path, stat.st_size, stat.st_mtime_ns))
  return TextFilesPlan(
      documents=documents,
      train_files=tuple(train_paths),
      validation_files=tuple(held_out),
      validation_fraction=validation_fraction,
      file_stats=tuple(stats),
  )


def read_text(path: str) -> str:
  """Read a file as strict UTF-8 and check that it contains non-whitespace text.

  Raises:
    DataError: the file is missing, empty, whitespace-only or not valid UTF-8.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as exc:
    raise errors.DataError(f"Text file not found: {path}.") from exc
  if not data:
    raise errors.DataError(f"{path} is empty. Remove it or add text to it.")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as exc:
    raise errors.DataError(
        f"{path} is not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
        "is invalid. Convert the file to UTF-8, for example with iconv.") from exc
  if not text.strip():
    raise errors.DataError(f"{path} contains only whitespace. Remove it or add text to it.")
  return text


def split_documents(text: str, documents: str) -> list[str]:
  """Cut text into documents by mode, dropping empty ones.

  "paragraph" cuts at each run of blank or whitespace-only lines, "line" at each line break,
  and "file" keeps the whole text. Blank lines at either end of a document are removed; line
  breaks and indentation inside it are kept as they are.
  """
  if documents == "file":
    parts = [text]
  elif documents == "paragraph":
    parts = _BLANK_LINES.split(text)
  elif documents == "line":
    parts = _LINE_BREAK.split(text)
  else:
    raise errors.ConfigError(
        f"Unknown --config.data.documents={documents!r}. Use one of {DOCUMENT_MODES}.")
  trimmed = (_TRAILING_BLANK_LINES.sub("", _LEADING_BLANK_LINES.sub("", part)) for part in parts)
  return [part for part in trimmed if part.strip()]


def read_documents(part: FilePart, documents: str) -> Iterator[tuple[int, str]]:
  """Yield (document index within the file, document) for the documents of `part`."""
  all_documents = split_documents(read_text(part.path), documents)
  stop = len(all_documents) if part.stop is None else part.stop
  for index in range(part.start, stop):
    yield index, all_documents[index]
