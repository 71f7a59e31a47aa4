"""When and how long a failed object-store read is tried again.

gcsfs already retries each request (6 attempts over 31-36 s on 408, 429, 5xx and connection
errors). That bound is short for a pod run: a regional GCS incident or a bucket still ramping up
its request rate lasts minutes, and a loader read that fails ends a run that burns a pod-hour a
minute. The loader therefore retries a range that still failed, with exponential backoff and
jitter, until `config.data.read_retry_minutes` have passed since its first attempt. Only
transient failures are retried: a missing object or a refused permission will not heal, and a
short read means the object is shorter than its manifest says (truncated or replaced).
"""

from __future__ import annotations

import asyncio
import random

# Backoff before the n-th retry (n = 1, 2, ...): min(FIRST * 2^(n-1), LONGEST) seconds, times a
# uniform jitter in [0.5, 1] so that the hosts of a pod that failed together do not retry together.
FIRST_DELAY_S = 1.0
LONGEST_DELAY_S = 60.0
# HTTP codes that mean "try again": request timeout, too many requests, and server errors.
_TRANSIENT_CODES = frozenset({408, 429})


def is_transient(error: BaseException) -> bool:
  """Whether a failed request may succeed when tried again."""
  if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
    return False
  code = getattr(error, "code", None)  # gcsfs.retry.HttpError and friends carry the HTTP status
  if isinstance(code, int) and 400 <= code < 600:
    return code >= 500 or code in _TRANSIENT_CODES
  # Connection resets, timeouts and the client library's own exceptions (aiohttp.ClientError,
  # asyncio.TimeoutError, OSError) are transient; a programming error is not.
  return isinstance(error, (OSError, asyncio.TimeoutError, ConnectionError)) or (
      type(error).__module__.split(".")[0] in ("aiohttp", "gcsfs", "google"))


def delay_before(retry: int, rng: random.Random | None = None) -> float:
  """Seconds to wait before retry number `retry` (1-based)."""
  base = min(FIRST_DELAY_S * 2 ** (retry - 1), LONGEST_DELAY_S)
  return base * (rng or random).uniform(0.5, 1.0)
