"""Where deberta_jax keeps what it can make again: the embedded corpus, trained spm models,
automatically prepared datasets and compiled programs.

One home for the rule, below both the data path and the runtime that use it (arrows point here,
never sideways between `data` and `runtime`).
"""

from __future__ import annotations

import os
from typing import Any

from deberta_jax import paths

DEFAULT = "~/.cache/deberta_jax"
ENV_VAR = "DEBERTA_JAX_CACHE"


def directory(config: Any) -> str:
  """config.data.cache_dir, else $DEBERTA_JAX_CACHE, else ~/.cache/deberta_jax; a local path is
  made absolute, a gs:// URL kept (hosts of a pod can then share one cache)."""
  data = config.get("data", None) if hasattr(config, "get") else getattr(config, "data", None)
  try:
    configured = data["cache_dir"] if data is not None else ""
  except (KeyError, TypeError):
    configured = ""
  path = configured or os.environ.get(ENV_VAR) or DEFAULT
  return paths.absolute(path)


def local_directory(config: Any) -> str:
  """The cache directory when it is local, else the default local one: what must be on local
  disk (the embedded corpus's tfds files, which array_record reads with local file calls) goes
  there even when config.data.cache_dir is a gs:// URL."""
  path = directory(config)
  return path if not paths.is_remote(path) else paths.absolute(DEFAULT)
