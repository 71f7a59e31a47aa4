"""The loader's throughput from a GCS API server on 127.0.0.1 (fake-gcs-server, as in the tests),
optionally behind the tests' proxy that adds latency to every request.

  python benchmarks/gcs_data_bench.py --prepared_dir=/tmp/prep1 -- --batch=256 --batches=50
  python benchmarks/gcs_data_bench.py --prepared_dir=/tmp/prep1 --delay_ms=0,30,60,100 --runs=3 \
      --settings='--read_block_rows=1;--read_block_rows=64' -- --batch=256 --batches=30

Uploads a local prepared dataset to an in-memory server started here, then runs
`python -m deberta_jax.data_bench --prepared_dir=gs://...` with the flags after `--`: every
request is a ranged GET over HTTP (no page cache in between), the path a pod takes to gs://.
With `--delay_ms`, the clients go through tests/gcs_proxy.py, which delays each request by that
much (a VM's round trip to GCS is 20-60 ms, with tails past 100 ms); each delay and each of the
`;`-separated `--settings` is run `--runs` times, and a table of the medians of tokens/s,
requests per row and CPU per row is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import fsspec
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.gcs_proxy import FaultProxy  # noqa: E402  (after the path above)
from tests.gcs_server import GcsServer, point_clients_at  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prepared_dir", required=True)
  parser.add_argument("--delay_ms", default="", help="comma-separated delays; '' = no proxy")
  parser.add_argument("--runs", type=int, default=1)
  parser.add_argument("--settings", default="", help="';'-separated data_bench flag sets")
  args, bench_flags = parser.parse_known_args()
  bench_flags = [f for f in bench_flags if f != "--"]
  server = GcsServer()
  server.start()
  mp = pytest.MonkeyPatch()
  proxy = None
  try:
    point_clients_at(server, mp)
    remote = server.create_bucket("bench") + "/prepared"
    fs = fsspec.filesystem("gs")
    for name in sorted(os.listdir(args.prepared_dir)):
      fs.put_file(os.path.join(args.prepared_dir, name), f"{remote}/{name}")
    command = [sys.executable, "-m", "deberta_jax.data_bench", f"--prepared_dir={remote}",
               *bench_flags]
    if not args.delay_ms:
      subprocess.run(command, check=True)
      return
    proxy = FaultProxy(server.endpoint).start()
    env = dict(os.environ, **proxy.env())
    table = []
    for delay in [float(d) for d in args.delay_ms.split(",")]:
      proxy.set_faults(delay_s=delay / 1000)
      for setting in (args.settings.split(";") if args.settings else [""]):
        results = []
        for _ in range(args.runs):
          out = subprocess.run(command + setting.split(), check=True, env=env,
                               capture_output=True, text=True).stdout
          results.append(json.loads(out.strip().splitlines()[-1]))
          print(json.dumps({"delay_ms": delay, "setting": setting, **results[-1]}), flush=True)
        table.append((delay, setting, *(statistics.median(r[k] for r in results) for k in (
            "tokens_per_second", "requests_per_row", "cpu_ms_per_row"))))
    print(f"\n| delay per request | setting | tokens/s (median of {args.runs}) | requests per "
          f"row | CPU ms per row |\n| --- | --- | --- | --- | --- |")
    for delay, setting, tps, rpr, cpu in table:
      print(f"| {delay:g} ms | `{setting or 'defaults'}` | {tps / 1e6:.2f}M | {rpr:.4f} | "
            f"{cpu:.3f} |")
  finally:
    if proxy is not None:
      proxy.stop()
    mp.undo()
    server.stop()


if __name__ == "__main__":
  main()
