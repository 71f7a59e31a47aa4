"""JAX's persistent compilation cache, so that a restarted run does not compile its step again.

A preempted or requeued job restarts the same program on the same mesh: the compiled training
step (tens of seconds for base on a GPU, minutes for large on a pod slice, more with the
micro-batch search's extra compilations) is the same executable as before. XLA keys the cache on
the program, the compile options and the backend version, so a changed config, mesh or jax simply
misses it. Runs on several hosts may share one gs:// directory (etils epath does the I/O).
"""

from __future__ import annotations

import os

from absl import logging
import jax

from deberta_jax import caches
from deberta_jax import paths


def resolve_dir(config) -> str | None:
  """config.compilation_cache_dir: 'auto' = <cache dir>/xla (the corpus cache's directory:
  data.cache_dir, $DEBERTA_JAX_CACHE or ~/.cache/deberta_jax), '' = off, else the path as given
  (a local path or gs://)."""
  value = str(config.get("compilation_cache_dir", "auto"))
  if not value:
    return None
  if value == "auto":
    return os.path.join(caches.directory(config), "xla")
  return paths.absolute(value)


def enable(config) -> str | None:
  """Points jax at the cache directory (before the first compilation); returns it, or None."""
  path = resolve_dir(config)
  if path is None:
    return None
  # jax stores only programs that took over a second to compile; the training step always does.
  jax.config.update("jax_compilation_cache_dir", path)
  logging.info("Compilation cache: %s", path)
  return path
