"""Config defaults, validation messages and the user-facing field list."""

import os
import re

import pytest

from diffusion_text import config as config_lib
from diffusion_text import registry
from diffusion_text.errors import ConfigError

DOCS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "configs.md")


def all_fields(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from all_fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def test_docs_list_every_field_with_its_default():
  with open(DOCS, encoding="utf-8") as f:
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \| ([^|]+) \|", f.read(),
                                                      re.MULTILINE)}
  for field, value in all_fields(config_lib.base_config()):
    assert field in rows, f"{field} is missing from docs/configs.md"
    if isinstance(value, (int, float, str)) and field != "mesh.axis_rules":
      documented = rows[field].strip().strip("`").strip('"')
      assert documented == str(value) or float(documented) == value, (field, documented, value)


def test_default_config_is_valid():
  config_lib.validate(config_lib.base_config())


@pytest.mark.parametrize("field, value, message", [
    ("model.width", 250, r"model\.width=250 is not divisible by --config\.model\.num_heads=4; "
                         r"try num_heads=2"),
    ("tokenizer.vocab_size", 100, r"tokenizer\.vocab_size=100 is too small"),
    ("sde.t_min", 0.5, r"sde\.t_min=0\.5"),
    ("sde.schedule", "cosin", r"sde\.schedule='cosin' is not a registered schedule; known: "),
    ("sample.sampler", "ddim", r"sample\.sampler='ddim'"),
    ("data.documents", "pages", r"data\.documents='pages'"),
    ("loss.self_cond_prob", 1.5, r"loss\.self_cond_prob"),
    ("mesh.data", 0, r"mesh\.data=0"),
    ("imports", "no_such_module_xyz", r"imports.*no_such_module_xyz"),
])
def test_invalid_values_name_the_flag(field, value, message):
  config = config_lib.base_config()
  section, _, key = field.rpartition(".")
  (config[section] if section else config)[key] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_resume_check_names_every_changed_field():
  saved = config_lib.base_config().to_dict()
  config = config_lib.base_config()
  config.model.width = 512
  config.data.seq_len = 64
  config.train.steps = 99  # Allowed to change between restarts.
  with pytest.raises(ConfigError) as info:
    config_lib.check_resume_compatible(config, saved, "/runs/x/config.json")
  text = str(info.value)
  assert "model.width: saved 192, now 512" in text
  assert "data.seq_len: saved 128, now 64" in text
  assert "train.steps" not in text
  assert "/runs/x/config.json" in text


def test_registry_accepts_user_parts():
  @registry.register("loss", "test_only_loss")
  def my_loss(*args, **kwargs):
    raise NotImplementedError

  config = config_lib.base_config()
  config.loss.name = "test_only_loss"
  config_lib.validate(config)
  assert registry.get("loss", "test_only_loss") is my_loss
