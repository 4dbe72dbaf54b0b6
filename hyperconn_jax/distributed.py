"""Multi-process start-up: jax.distributed.initialize() when (and only when) launched multi-process.

Called first thing by train.py / eval.py; never by library code or tests.
"""

import os
from typing import Callable

from absl import flags
from absl import logging
import jax


def _env_int(name: str) -> int:
  try:
    return int(os.environ.get(name, '1').split('(')[0])
  except ValueError:
    return 1


def cluster_environment() -> str | None:
  """The multi-process launcher this process runs under, or None for a single process.

  Recognised: JAX_COORDINATOR_ADDRESS (set by hand), a multi-host Cloud TPU slice
  (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with more than one host, or a multislice
  MEGASCALE_COORDINATOR_ADDRESS), SLURM with more than one task, Open MPI with more than one rank.
  JAX detects the coordinator, process count and index itself in all of these.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  for name in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):
    if len([h for h in os.environ.get(name, '').split(',') if h.strip()]) > 1:
      return f'Cloud TPU ({name})'
  if os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'Cloud TPU multislice'
  if 'SLURM_JOB_ID' in os.environ and _env_int('SLURM_NTASKS') > 1:
    return 'SLURM'
  if _env_int('OMPI_COMM_WORLD_SIZE') > 1:
    return 'Open MPI'
  return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Initialises jax.distributed for a multi-process launch; a no-op for a single process.

  Must run before any other JAX call.

  Args:
    coordinator_address: 'host:port' of process 0 (explicit launch), or None / ''.
    num_processes: total number of processes (explicit launch), or None / 0.
    process_id: this process's index (explicit launch), or None / -1.

  Returns:
    True if jax.distributed is initialised (now or before), False for a single process.
  """
  if jax.distributed.is_initialized():
    return True
  # Processes on CPU run their cross-process collectives over TCP with gloo (jax 0.10.2's default,
  # made explicit: without an implementation a multi-process CPU run has none).
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  explicit = {k: v for k, v in (('coordinator_address', coordinator_address or None),
                                ('num_processes', num_processes or None),
                                ('process_id', None if process_id in (None, -1) else process_id))
              if v is not None}
  if explicit:
    logging.info('Initialising jax.distributed with %s.', explicit)
    jax.distributed.initialize(**explicit)
    return True
  env = cluster_environment()
  if env is None:
    return False
  logging.info('Initialising jax.distributed (detected %s).', env)
  jax.distributed.initialize()
  return True


def define_flags() -> Callable[[], bool]:
  """Defines a launcher script's --coordinator_address, --num_processes and --process_id; returns
  a function that calls `maybe_initialize` with their values."""
  coordinator = flags.DEFINE_string(
      'coordinator_address', '', "Multi-process: 'host:port' of process 0 ('' = auto-detect).")
  num_processes = flags.DEFINE_integer(
      'num_processes', 0, 'Multi-process: number of processes (0 = auto-detect).')
  process_id = flags.DEFINE_integer(
      'process_id', -1, 'Multi-process: index of this process (-1 = auto-detect).')
  return lambda: maybe_initialize(coordinator.value, num_processes.value, process_id.value)
