"""Name -> implementation look-ups for models, losses, schedules and samplers.

Configs name their parts (`model.name`, `loss.name`, `sde.schedule`, `sample.sampler`). A user
module can add its own with `register` and be loaded with `--config.imports=my_module`, so
nothing in the core needs editing.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from diffusion_text.errors import ConfigError

KINDS = ("model", "loss", "schedule", "sampler")
_TABLES: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}

# Config field that names each kind of part.
_FIELDS = {"model": "model.name", "loss": "loss.name", "schedule": "sde.schedule",
           "sampler": "sample.sampler"}

T = TypeVar("T")


def register(kind: str, name: str) -> Callable[[T], T]:
  """Decorator that makes `obj` available as `name` for configs of this kind."""
  if kind not in _TABLES:
    raise ValueError(f"unknown registry kind {kind!r}; known: {KINDS}")

  def add(obj: T) -> T:
    _TABLES[kind][name] = obj
    return obj

  return add


def get(kind: str, name: str) -> Any:
  _load_builtins()
  table = _TABLES[kind]
  if name not in table:
    raise ConfigError(f"--config.{_FIELDS[kind]}={name!r} is not a registered {kind}; "
                      f"known: {', '.join(sorted(table))}.")
  return table[name]


def names(kind: str) -> list[str]:
  _load_builtins()
  return sorted(_TABLES[kind])


def import_user_modules(modules: str) -> None:
  """Import comma-separated module names so their `register` calls run."""
  for module in filter(None, (m.strip() for m in modules.split(","))):
    try:
      importlib.import_module(module)
    except ImportError as exc:
      raise ConfigError(f"--config.imports: cannot import {module!r}: {exc}") from exc


def check_names(config) -> None:
  import_user_modules(config.get("imports", ""))
  for kind, field in _FIELDS.items():
    section, key = field.split(".")
    get(kind, config[section][key])


def _load_builtins() -> None:
  # Importing these modules runs their register() calls.
  for module in ("sde", "losses", "samplers", "models.transformer", "models.autoregressive"):
    importlib.import_module(f"diffusion_text.{module}")
