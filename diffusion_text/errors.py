"""Exceptions that stop a run before any training time is spent.

Each message names the file, line, flag or shape to fix. The command-line entry point prints
them without a traceback.
"""


class UserInputError(ValueError):
  """Base class for problems the user can fix in their command, config or data."""


class ConfigError(UserInputError):
  """An unknown, invalid or contradictory config value, or a workdir that does not match."""


class DataError(UserInputError):
  """A data file or dataset that is missing, empty, unreadable or not UTF-8."""


class TrainingStopped(RuntimeError):
  """Training cannot go on (for example, non-finite steps in a row); a checkpoint was saved."""
