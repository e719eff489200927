"""Keep freed host memory in the process, so that each step does not fault its buffers in again.

XLA:CPU allocates a step's temporaries (2.5 GiB for CAV-MAE base at batch 4) and outputs with
posix_memalign on its worker threads. glibc serves an allocation that size with a fresh mmap
and unmaps it on free, and it creates and deletes per-thread arenas for YNNPACK's buffers: the
kernel then zeroes and maps every page again, each step (780,000 page faults a step at base).
With one arena, no mmap and no trimming, freed memory is reused: 700 faults a step, and the
base step 8.2-8.5 s -> 7.8 s on the 2-core machine (docs/speed.md). The price: the process
keeps its peak host memory until it exits, as a caching allocator does.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from absl import logging

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
  """Tells glibc's malloc to use one arena, never mmap, and never return memory to the OS.
  Call it before JAX starts its threads (before the first computation): a thread keeps the
  arena it first allocated from. Returns False, changing nothing, where the C library has no
  mallopt (not glibc)."""
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  if not hasattr(libc, "mallopt"):
    logging.info("host memory: the C library has no mallopt; freed memory goes back to the OS")
    return False
  # -1 as the trim threshold is SIZE_MAX to glibc: the heap's top is never trimmed.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
