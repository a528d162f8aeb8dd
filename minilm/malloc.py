"""Keep freed memory in the process: glibc's allocator set so that XLA:CPU's per-step buffers are reused.

XLA:CPU allocates each execution's buffers (the default model's train step: 146 MB of temporaries)
with posix_memalign from its worker threads. glibc serves a block that large from a fresh mmap (a
thread's arena cannot hold it) and unmaps it when freed, so every step faults in and zeroes those
pages again: 36k page faults per step, a third of the step's time on a 2-core CPU. One arena, no
mmap and no trimming keep the freed block in the heap for the next step. It must be set before the
first jax computation starts XLA's threads (their arenas are chosen then), hence at `import minilm`.
Allocation addresses never change results. MINILM_MALLOC=system leaves glibc as it is (for A/B
timing); on other C libraries this does nothing.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8   # glibc's malloc.h
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))   # -1: SIZE_MAX (mallopt takes an int)


def keep_freed_memory() -> bool:
  """Apply SETTINGS through mallopt; True where glibc accepted all of them."""
  if os.environ.get("MINILM_MALLOC") == "system":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version   # glibc only
  except (OSError, AttributeError):
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
