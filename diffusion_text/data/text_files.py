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

from absl import logging

from diffusion_text import errors

# Document modes: cut a file at blank lines, keep it whole, or cut it at every line break.
DOCUMENT_MODES = ("paragraph", "file", "line")
# Policies for bytes that are not valid UTF-8: "strict" raises a DataError, and "replace" decodes
# each invalid sequence as U+FFFD (Python's "replace" error handler).
DECODE_ERRORS = ("strict", "replace")

# One line break: LF, CR LF, a lone CR, U+2028 LINE SEPARATOR or U+2029 PARAGRAPH SEPARATOR.
# CR LF is one break, never two.
_BREAK = r"(?:\r\n|\n|\r(?!\n)|\u2028|\u2029)"
# Whitespace within a line: every whitespace character except the line breaks above. Form
# feed, vertical tab and U+0085 NEXT LINE are whitespace here, not line breaks.
_LINE_SPACE = r"[^\S\r\n\u2028\u2029]"
# Between two paragraphs: a line break followed by one or more lines that are empty or contain
# only whitespace, or a U+2029 PARAGRAPH SEPARATOR on its own.
_PARAGRAPH_BREAK = re.compile(_BREAK + r"(?:" + _LINE_SPACE + r"*" + _BREAK + r")+|\u2029")
_LINE_BREAK = re.compile(_BREAK)
# Line breaks as editors count them, for the line numbers in error messages.
_EDITOR_LINE_BREAK = re.compile(rb"\r\n|\n|\r")
_BYTE_ORDER_MARK = "\ufeff"


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
  # One of DECODE_ERRORS. It is part of the cache key because it changes the prepared text.
  decode_errors: str = "strict"

  def cache_key(self) -> str:
    """Return a hash of paths, sizes, mtimes, split settings and the decoding policy."""
    payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

  def split_parts(self) -> dict[str, list[FilePart]]:
    """Check every file, then return the file parts of "train" and "validation".

    With a single file and no validation files, the last `validation_fraction` of its
    documents (at least one) form the validation split.

    Raises:
      DataError: a file is missing, empty, whitespace-only, contains a NUL byte or (with
        decode_errors "strict") is not UTF-8, or a single file has fewer than two documents
        to split.
    """
    counts = {path: len(split_documents(read_text(path, self.decode_errors), self.documents))
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
    decode_errors: str = "strict",
) -> TextFilesPlan:
  """Choose the train and validation files without reading them.

  Without `validation_files`, the last files in sorted path order are held out: a
  `validation_fraction` of them, at least one, and at least one file stays for training.

  Raises:
    ConfigError: `documents`, `validation_fraction` or `decode_errors` is invalid.
    DataError: a glob matches nothing or a file is missing.
  """
  if documents not in DOCUMENT_MODES:
    raise errors.ConfigError(
        f"Unknown --config.data.documents={documents!r}. Use one of {DOCUMENT_MODES}.")
  if decode_errors not in DECODE_ERRORS:
    raise errors.ConfigError(
        f"Unknown --config.data.decode_errors={decode_errors!r}. Use one of {DECODE_ERRORS}.")
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
      decode_errors=decode_errors,
  )


def read_text(path: str, decode_errors: str = "strict", *, log_replacements: bool = True) -> str:
  """Read a UTF-8 text file, drop a leading byte order mark, and check that it contains text.

  With decode_errors "replace", each invalid UTF-8 sequence becomes U+FFFD, and a warning gives
  their number and the position of the first unless `log_replacements` is False.

  Raises:
    DataError: the file is missing, empty, whitespace-only or contains a NUL byte, or it is not
      valid UTF-8 and decode_errors is "strict".
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as exc:
    raise errors.DataError(f"Text file not found: {path}.") from exc
  if not data:
    raise errors.DataError(f"{path} is empty. Remove it or add text to it.")

  # In UTF-8 a zero byte is always the NUL character, never part of a longer sequence, so the
  # raw bytes can be searched whatever the decoding policy.
  nul = data.find(b"\0")
  if nul >= 0:
    raise errors.DataError(
        f"{path} contains a NUL byte at line {_line_number(data, nul)} (byte offset {nul}), so "
        "it is probably a binary or UTF-16 file. Convert UTF-16 text with "
        "`iconv -f UTF-16 -t UTF-8`, delete stray NUL bytes with `tr -d '\\000'`, or leave the "
        "file out of the globs.")

  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as exc:
    if decode_errors != "replace":
      raise _invalid_utf8_error(path, data, exc.start) from exc
    text = data.decode("utf-8", errors="replace")
    if log_replacements:
      # A valid U+FFFD in the file is the bytes EF BF BD; every other U+FFFD is a replacement.
      num_replaced = text.count("\ufffd") - data.count("\ufffd".encode("utf-8"))
      logging.warning(
          "%s is not valid UTF-8: %d invalid byte sequences were replaced with U+FFFD, the "
          "first at line %d (byte offset %d), because --config.data.decode_errors=replace.",
          path, num_replaced, _line_number(data, exc.start), exc.start)

  text = text.removeprefix(_BYTE_ORDER_MARK)
  if not text.strip():
    raise errors.DataError(f"{path} contains only whitespace. Remove it or add text to it.")
  return text


def _line_number(data: bytes, offset: int) -> int:
  """Return the 1-based line of byte `offset`, counting LF, CR LF and CR as line breaks."""
  # CR and LF bytes never occur inside a multi-byte UTF-8 sequence, so invalid UTF-8 before
  # `offset` does not change the count.
  return 1 + sum(1 for _ in _EDITOR_LINE_BREAK.finditer(data, 0, offset))


def _invalid_utf8_error(path: str, data: bytes, offset: int) -> errors.DataError:
  """Build the DataError for a file whose bytes at `offset` are not valid UTF-8."""
  if data.startswith((b"\xff\xfe", b"\xfe\xff")):
    fix = ("The file starts with a UTF-16 byte order mark: convert it with "
           "`iconv -f UTF-16 -t UTF-8`.")
  else:
    fix = ("Convert the file to UTF-8, for example with `iconv -f LATIN1 -t UTF-8` for Latin-1 "
           "text, or set --config.data.decode_errors=replace to read each invalid sequence as "
           "U+FFFD.")
  return errors.DataError(
      f"{path} is not valid UTF-8: byte 0x{data[offset]:02x} at line "
      f"{_line_number(data, offset)} (byte offset {offset}) is invalid. {fix}")


def split_documents(text: str, documents: str) -> list[str]:
  """Cut text into documents by mode, dropping empty ones.

  "paragraph" cuts at each run of blank or whitespace-only lines and at each U+2029, "line" at
  each line break (LF, CR LF, CR, U+2028 or U+2029), and "file" keeps the whole text. Blank
  lines at either end of a document are removed; line breaks and indentation inside it are kept
  as they are.
  """
  if documents == "file":
    parts = [text]
  elif documents == "paragraph":
    parts = _PARAGRAPH_BREAK.split(text)
  elif documents == "line":
    parts = _LINE_BREAK.split(text)
  else:
    raise errors.ConfigError(
        f"Unknown --config.data.documents={documents!r}. Use one of {DOCUMENT_MODES}.")
  trimmed = (_trim_blank_lines(part) for part in parts)
  return [part for part in trimmed if part]


def _trim_blank_lines(text: str) -> str:
  """Remove the empty or whitespace-only lines at both ends of `text`; "" if nothing is left.

  The line holding the first and the last non-whitespace character keeps its indentation and
  its trailing spaces.
  """
  # str.strip finds both ends in linear time. A regex anchored at the end of the text is retried
  # at every line break instead, and took minutes on a file of 200,000 empty lines.
  content_end = len(text.rstrip())
  if not content_end:
    return ""
  content_start = len(text) - len(text.lstrip())
  start = 0
  for match in _LINE_BREAK.finditer(text, 0, content_start):
    start = match.end()
  trailing_break = _LINE_BREAK.search(text, content_end)
  end = trailing_break.start() if trailing_break else len(text)
  return text[start:end]


def read_documents(part: FilePart, documents: str,
                   decode_errors: str = "strict") -> Iterator[tuple[int, str]]:
  """Yield (document index within the file, document) for the documents of `part`."""
  # The plan has read and checked the file already, so replacements were logged then.
  text = read_text(part.path, decode_errors, log_replacements=False)
  all_documents = split_documents(text, documents)
  stop = len(all_documents) if part.stop is None else part.stop
  for index in range(part.start, stop):
    yield index, all_documents[index]
