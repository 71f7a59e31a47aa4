"""What every command-line entry point shares, so that they behave alike.

* one log set-up (`setup_logging`): this project's INFO lines and everyone's warnings; the
  checkpoint library alone writes about 30 INFO lines per checkpoint it reads or writes;
* one way to fail on a bad command line (`run`): a bad or missing flag, an unknown config field or
  an unparsable value is one `error: ...` line and exit code 2, like every other bad input
  (errors.py), instead of absl's usage dump and code 1;
* `--print_config` on the entry points that take a config: every field, its value and its meaning.
"""

from __future__ import annotations

import inspect
import logging as std_logging
import re
import sys
from typing import Callable

from absl import app  # re-exported: entry points raise cli.app.UsageError
from absl import flags
from absl import logging

from deberta_jax import errors

# What the flag parser and ml-collections' config loader raise for a bad command line.
_FLAG_ERRORS = (flags.Error, KeyError, AttributeError, OSError, ValueError, TypeError)


class _ProjectInfoOnly(std_logging.Filter):
  def __init__(self, keep):
    super().__init__()
    self.keep = tuple(keep)

  def filter(self, record) -> bool:
    return (record.levelno >= std_logging.WARNING
            or any(k in record.pathname for k in self.keep))


def setup_logging(keep=("deberta_jax",)) -> None:
  """INFO records of this project (source paths holding one of `keep`) and every library's
  warnings, through absl's handler."""
  handler = logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, _ProjectInfoOnly)]:
    handler.removeFilter(old)
  handler.addFilter(_ProjectInfoOnly(keep))
  std_logging.getLogger("absl").setLevel(std_logging.INFO)
  logging.set_verbosity(logging.INFO)


def bad_command_line(error: BaseException):
  """One `error:` line naming the flag or config field, then exit code 2."""
  while error.__cause__ is not None:
    error = error.__cause__
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(..))
    error = error.args[0]
  if isinstance(error, (KeyError, AttributeError)):  # a field the locked config does not have
    text = str(error.args[0] if error.args else error)
    message = "unknown config field " + " ".join(text.split())
  else:
    message = " ".join(str(error).split())
  print(f"error: {message}", file=sys.stderr)
  sys.exit(errors.EXIT_BAD_INPUT)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    bad_command_line(e)


def load_config(config_flag):
  """The parsed config of a `config_flags.DEFINE_config_file` flag; ml-collections defers a
  config file's load error to its first access, which is made here."""
  try:
    config = config_flag.value
    config.keys()
    return config
  except _FLAG_ERRORS as e:
    bad_command_line(e)


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run with the parser above; a usage error is one line and exit code 2 too."""
  def guarded(argv):
    try:
      setup_logging()
      with errors.exit_on_error():
        main(argv)
    except app.UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(errors.EXIT_BAD_INPUT)
  app.run(guarded, flags_parser=_parse_flags)


def describe_config(config, meanings: dict[str, str]) -> str:
  """Every leaf field of `config` as `name = value  # meaning`, one per line, sorted."""
  lines = []

  def walk(node, prefix):
    for key in sorted(node.keys()):
      value = node[key]
      name = f"{prefix}{key}"
      if hasattr(value, "keys"):
        walk(value, name + ".")
        continue
      meaning = meanings.get(name, "")
      lines.append(f"{name} = {value!r}" + (f"  # {meaning}" if meaning else ""))

  walk(config, "")
  return "\n".join(lines)


def field_meanings(config_module) -> dict[str, str]:
  """The comments of a config file's `c.<field> = value  # meaning` lines, with the comment lines
  just above a field and the aligned continuation lines below it, keyed by dotted field name:
  the meanings live beside the defaults, in configs/common.py."""
  meanings, above, last, last_column = {}, [], None, -1
  for line in inspect.getsource(config_module).splitlines():
    stripped = line.strip()
    if stripped.startswith("#"):
      if last is not None and line.index("#") == last_column:  # continues the inline comment
        meanings[last] += " " + stripped.lstrip("# ").strip()
      else:
        above.append(stripped.lstrip("# ").strip())
        last = None
      continue
    match = re.match(r"c\.([\w.]+)\s*=\s*(?!ml_collections)[^#]*?(#\s*(.*))?$", stripped)
    last = None
    if match:
      inline = match.group(3).strip() if match.group(3) else ""
      text = " ".join(above + ([inline] if inline else []))
      if text:
        meanings[match.group(1)] = text
      if inline:
        last, last_column = match.group(1), line.index("#")
    above = []
  return meanings
