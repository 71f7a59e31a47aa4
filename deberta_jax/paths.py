"""Local paths and object-store URLs (gs://...), told apart in one place.

Object stores have no directories, permission bits, appends or atomic renames, so the code that
writes a run (the workdir checks, metrics.jsonl, the compilation cache) takes another route there.
"""

from __future__ import annotations

import os


def is_remote(path: str) -> bool:
  """An object-store URL such as gs://bucket/dir."""
  return "://" in path


def absolute(path: str) -> str:
  """A local path made absolute (~ expanded); a URL as it is."""
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))
