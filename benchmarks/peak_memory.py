"""Runs a command and reports the peak resident memory of its whole process tree (Linux).

  python benchmarks/peak_memory.py -- python -m deberta_jax.prepare --config=... --num_workers=2

`/usr/bin/time -v` reports the largest single process; a command with worker processes needs
the sum over the tree, sampled here every 0.2 s from /proc. Prints the command's output, then
one JSON line: wall seconds, exit code, peak total RSS and the peak of the largest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _children() -> dict[int, list[int]]:
  tree: dict[int, list[int]] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    tree.setdefault(ppid, []).append(int(name))
  return tree


def _rss_kib(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def tree_rss(root: int) -> tuple[int, int]:
  """(sum, max) of the RSS in KiB of `root` and all its descendants."""
  tree, stack, sizes = _children(), [root], []
  while stack:
    pid = stack.pop()
    sizes.append(_rss_kib(pid))
    stack += tree.get(pid, [])
  return sum(sizes), max(sizes)


def main() -> None:
  argv = sys.argv[1:]
  if argv[:1] == ["--"]:
    argv = argv[1:]
  start = time.time()
  proc = subprocess.Popen(argv)
  peak_total = peak_single = 0
  while proc.poll() is None:
    total, single = tree_rss(proc.pid)
    peak_total, peak_single = max(peak_total, total), max(peak_single, single)
    time.sleep(0.2)
  print(json.dumps({"command": " ".join(argv), "exit_code": proc.returncode,
                    "wall_seconds": round(time.time() - start, 1),
                    "peak_rss_total_mib": round(peak_total / 1024, 1),
                    "peak_rss_largest_process_mib": round(peak_single / 1024, 1)}))


if __name__ == "__main__":
  main()
