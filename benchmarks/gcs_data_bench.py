"""The loader's throughput from a GCS API server on 127.0.0.1 (fake-gcs-server, as in the tests).

  python benchmarks/gcs_data_bench.py --prepared_dir=/tmp/prep1 -- --batch=256 --batches=50

Uploads a local prepared dataset to an in-memory server started here, then runs
`python -m deberta_jax.data_bench --prepared_dir=gs://...` with the flags after `--`: every row
is a ranged GET over HTTP (no page cache in between), the path a pod takes to gs://.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import fsspec
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.gcs_server import GcsServer, point_clients_at  # noqa: E402  (after the path above)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prepared_dir", required=True)
  args, bench_flags = parser.parse_known_args()
  bench_flags = [f for f in bench_flags if f != "--"]
  server = GcsServer()
  server.start()
  mp = pytest.MonkeyPatch()
  try:
    point_clients_at(server, mp)
    remote = server.create_bucket("bench") + "/prepared"
    fs = fsspec.filesystem("gs")
    for name in sorted(os.listdir(args.prepared_dir)):
      fs.put_file(os.path.join(args.prepared_dir, name), f"{remote}/{name}")
    subprocess.run([sys.executable, "-m", "deberta_jax.data_bench", f"--prepared_dir={remote}",
                    *bench_flags], check=True)
  finally:
    mp.undo()
    server.stop()


if __name__ == "__main__":
  main()
