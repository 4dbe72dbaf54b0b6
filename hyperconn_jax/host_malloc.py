"""How the process's glibc malloc serves XLA:CPU's buffers (config.train.host_malloc).

XLA:CPU allocates the temporaries of one step as a single buffer (hundreds of MiB for a d = 256,
batch 8 x 256 train step) with malloc, from one of its runtime threads. glibc serves a request
that large with a fresh mmap: it is above the mmap threshold (128 KiB, raised dynamically to at
most 32 MiB) and above the 64 MiB a thread's own arena can grow to. The kernel then zero-fills
every page of it on first touch, in every step: about 87,000 page faults and a fifth of a d = 256
CPU step (docs/performance.md). 'reuse' serves such buffers from the main heap instead (one arena,
no request served by its own mmap, no trimming of freed memory), so each step reuses the pages
the previous step freed. The cost: the process keeps its peak heap instead of returning freed memory
to the system, and all threads share one arena (contention only matters for threads that malloc
heavily; those of an accelerator host's input pipeline might).

The settings hold for the whole process and must be made before JAX creates its threads (before
the backend is first used): a thread that already has an arena keeps it. train.py applies
config.train.host_malloc first thing; eval.py, analyze.py, sweep.py and the benchmarks apply the
default.
"""

import ctypes
import glob
import os
import platform

MODES = ('auto', 'reuse', 'system')

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NO_TRIM = 2 ** 31 - 1  # The largest value (an int): freed memory stays in the heap.

# Device files of accelerators whose buffers are not host memory: TPU (accel: v4/v5e/v6e, vfio:
# v5p), NVIDIA and AMD GPUs.
_ACCELERATOR_FILES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd')


def validate(mode) -> None:
  """Raises ValueError naming train.host_malloc unless `mode` is one of MODES."""
  if mode not in MODES:
    raise ValueError(f'train.host_malloc must be one of {MODES}, got {mode!r}')


def resolve(mode: str) -> str:
  """'auto' -> 'reuse' on a glibc host where JAX computes on the CPU (JAX_PLATFORMS=cpu, or no
  TPU / GPU device files), else 'system'; 'reuse' without glibc -> 'system'."""
  validate(mode)
  if platform.libc_ver()[0] != 'glibc':
    return 'system'
  if mode != 'auto':
    return mode
  if os.environ.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
    return 'reuse'
  accelerator = any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)
  return 'system' if accelerator else 'reuse'


def configure(mode: str) -> str:
  """Applies `mode` (MODES) to this process's malloc; returns what was applied."""
  applied = resolve(mode)
  if applied == 'reuse':
    libc = ctypes.CDLL(None)  # The process's own C library (glibc, checked by resolve).
    # No request gets its own mmap (M_MMAP_MAX 0; glibc still maps more heap when it cannot
    # grow it), whatever its size: the temporaries of a d = 1024 step exceed any threshold.
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIM)):
      if not libc.mallopt(param, value):
        raise OSError(f'mallopt({param}, {value}) failed')
  return applied
